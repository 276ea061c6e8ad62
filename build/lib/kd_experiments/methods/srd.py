"""SRD: a linear side-branch projector, batch-normalised features and a soft-maximum distance."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.losses import srd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


def _srd_correlation_loss(
    projected_student: torch.Tensor, teacher_emb: torch.Tensor, exponent: float, eps: float
) -> torch.Tensor:
    """The earlier SRD distance (roymiles/Simple-Recipe-Distillation `deit/models.py`,
    `DistillationLoss.forward`):

        rho_j = (1/B) sum_b bn(s)_bj * bn(t)_bj,   L = log( sum_j |rho_j - 1|^p + 1e-5 )

    bn standardises each dimension over the batch (biased variance plus `eps`), a separate one per side;
    the teacher side carries no gradient.
    """
    if projected_student.shape != teacher_emb.shape or projected_student.shape[0] < 2:
        raise ValueError(
            f"SRD correlation loss: needs two B×D embeddings of the same shape with B >= 2, got "
            f"{tuple(projected_student.shape)} and {tuple(teacher_emb.shape)}"
        )
    student_normalised = F.batch_norm(projected_student, None, None, training=True, eps=eps)
    teacher_normalised = F.batch_norm(teacher_emb.detach(), None, None, training=True, eps=eps)
    correlation = (student_normalised * teacher_normalised).mean(dim=0)
    return torch.log((correlation - 1).abs().pow(exponent).sum() + 1e-5)


class SimpleRecipeDistillation(DistillationMethod):
    """Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI 2024),
    the representation term of the official ImageNet code's final commit (roymiles/Simple-Recipe-Distillation
    `imagenet/torchdistill/losses/single.py`, `OurDistillationLoss`):

        srd = log sum_{b,j} |bn(W f_s + c)_bj - bn(f_t)_bj|^p   (`losses.srd_loss`, p = 4)

    or, with `distance="correlation"`, the earlier form of the first commit and of the DeiT code
    (`deit/models.py`, `DistillationLoss.forward`): log sum_j |rho_j - 1|^p. The official total is 1 * CE +
    1 * KL(T=1) + 2 * srd: the method YAML adds the shared `ce` and a `kd` term (`HintonKD` at T = 1) and
    holds the weights.

    `student_embedding` names the student feature: `embedding` (the pooled vector), or for a DeiT student
    `patch_mean` (the mean of the patch tokens, as SRD's DeiT code); the YAML takes it from the student
    config (`student.taps.feature`). The projector Linear(D_s, D_t) with bias is a side branch: the
    student's classifier reads the raw embedding, and the projector is discarded after training.
    """

    teacher_features = frozenset({"embedding"})

    def __init__(
        self,
        exponent: float = 4.0,
        eps: float = 1e-4,
        distance: Literal["logsum", "correlation"] = "logsum",
        student_embedding: str = "embedding",
    ):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.student_features = frozenset({student_embedding})
        if distance not in ("logsum", "correlation"):
            raise ValueError(f"SRD distance must be 'logsum' or 'correlation', got {distance!r}")
        self.exponent, self.eps, self.distance = exponent, eps, distance
        self.projector: nn.Module = nn.Identity()

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_dim = getattr(student_probe, self.student_embedding).shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        # Always built, even for equal dims: SRD credits the linear projector itself for the gain.
        self.projector = nn.Linear(student_dim, teacher_dim, bias=True)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        projected = self.projector(getattr(student, self.student_embedding))
        if self.distance == "logsum":
            return srd_loss(projected, teacher.embedding, self.exponent, self.eps)
        return _srd_correlation_loss(projected, teacher.embedding, self.exponent, self.eps)
