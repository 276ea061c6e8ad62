"""VkD: an orthogonal projection of the student embedding onto the normalised teacher embedding."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from kd_experiments.losses import kd_loss, vkd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, LOGIT_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


class OrthogonalProjection(DistillationMethod):
    """Miles, Elezi & Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections" (CVPR
    2024), the classification form of the official code (methods.md f.1).

    A DeiT student reads as in the official DeiT code: `student_embedding="patch_mean"` (the mean of the
    patch tokens) for the feature term and `kd_logits="distill_logits"` (the second head) for the KL term;
    the CE term always trains the class head.

    Terms:
      - `ce` = CE(z_s, y);
      - `kd` = KL(softmax(z_t) || softmax(z_s)) at T = 1 (batchmean);
      - `vkd` = SmoothL1(P f_s, LN(f_t)) (`losses.vkd_loss`), with P a D_t x D_s matrix on the Stiefel
        manifold: orthonormal columns (P^T P = I) when D_t >= D_s, orthonormal rows (P P^T = I)
        otherwise. With `normalize_teacher=False` the target is the raw f_t (an ablation).
    The official total is L_ce + L_kl + L_rep, all weights 1 (the YAML holds them).

    `projector="linear"` replaces P by an unconstrained Linear without bias (the ablation of the
    orthogonality constraint); `projector="mlp"` by Linear -> BN -> ReLU -> Linear (hidden width
    max(D_s, D_t); the issue's ablation names an MLP projector, its exact form is this project's choice).
    The projector is a side branch, discarded after training.
    """

    loss_terms = ("ce", "kd", "vkd")
    teacher_features = frozenset({"logits", "embedding"})

    def __init__(
        self,
        projector: Literal["orthogonal", "linear", "mlp"] = "orthogonal",
        normalize_teacher: bool = True,
        temperature: float = 1.0,
        student_embedding: str = "embedding",
        kd_logits: str = "logits",
    ):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.kd_logits = check_tap(kd_logits, LOGIT_TAPS, "kd_logits")
        self.student_features = frozenset({"logits", student_embedding, kd_logits})
        if projector not in ("orthogonal", "linear", "mlp"):
            raise ValueError(f"VkD projector must be 'orthogonal', 'linear' or 'mlp', got {projector!r}")
        self.projector_kind = projector
        self.normalize_teacher, self.temperature = normalize_teacher, temperature
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
    ) -> dict[str, torch.Tensor]:
        projected = self.projector(getattr(student, self.student_embedding))
        if self.normalize_teacher:
            representation = vkd_loss(projected, teacher.embedding)
        else:
            representation = F.smooth_l1_loss(projected, teacher.embedding.detach(), beta=1.0)
        return {
            "ce": F.cross_entropy(student.logits, targets),
            "kd": kd_loss(getattr(student, self.kd_logits), teacher.logits, self.temperature),
            "vkd": representation,
        }
