"""VkD: an orthogonal projection of the student embedding onto the normalised teacher embedding."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from kd_experiments.losses import vkd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


class OrthogonalProjection(DistillationMethod):
    """Miles, Elezi & Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections" (CVPR
    2024), the representation term of the official classification code (roymiles/VkD `engine.py`,
    `train.py`):

        vkd = SmoothL1(P f_s, LN(f_t))   (`losses.vkd_loss`)

    with P a D_t x D_s matrix on the Stiefel manifold: orthonormal columns (P^T P = I) when D_t >= D_s,
    orthonormal rows (P P^T = I) otherwise (`torch.nn.utils.parametrizations.orthogonal`, as `train.py`).
    With `normalize_teacher=False` the target is the raw f_t (an ablation). The official total is L_ce +
    L_kl + L_rep, all weights 1: the method YAML adds the shared `ce` and a `kd` term (`HintonKD` at T = 1).

    `student_embedding` as in `SimpleRecipeDistillation` (`patch_mean` for a DeiT student, as VkD's DeiT
    code). `projector="linear"` replaces P by an unconstrained Linear without bias (the ablation of the
    orthogonality constraint); `projector="mlp"` by Linear -> BN -> ReLU -> Linear (hidden width
    max(D_s, D_t); this project's choice of an MLP projector for the ablation). The projector is a side
    branch, discarded after training.
    """

    teacher_features = frozenset({"embedding"})

    def __init__(
        self,
        projector: Literal["orthogonal", "linear", "mlp"] = "orthogonal",
        normalize_teacher: bool = True,
        student_embedding: str = "embedding",
    ):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.student_features = frozenset({student_embedding})
        if projector not in ("orthogonal", "linear", "mlp"):
            raise ValueError(f"VkD projector must be 'orthogonal', 'linear' or 'mlp', got {projector!r}")
        self.projector_kind = projector
        self.normalize_teacher = normalize_teacher
        self.projector: nn.Module = nn.Identity()

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_dim = getattr(student_probe, self.student_embedding).shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        if self.projector_kind == "mlp":  # the ablation's non-linear projector: Linear-BN-ReLU-Linear
            hidden = max(student_dim, teacher_dim)
            self.projector = nn.Sequential(
                nn.Linear(student_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, teacher_dim),
            )
            return
        linear = nn.Linear(student_dim, teacher_dim, bias=False)
        # torch's default map (Householder for non-square weights) keeps the smaller Gram matrix exactly I.
        self.projector = orthogonal(linear) if self.projector_kind == "orthogonal" else linear

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        projected = self.projector(getattr(student, self.student_embedding))
        if self.normalize_teacher:
            return vkd_loss(projected, teacher.embedding)
        return F.smooth_l1_loss(projected, teacher.embedding.detach(), beta=1.0)
