"""SRD: a linear side-branch projector, batch-normalised features and a soft-maximum distance."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.losses import kd_loss, srd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, LOGIT_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


def _srd_correlation_loss(
    projected_student: torch.Tensor, teacher_emb: torch.Tensor, exponent: float, eps: float
) -> torch.Tensor:
    """The earlier SRD distance (methods.md e.2; SRD `deit/models.py` `DistillationLoss.forward`):

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
    in the form of the official ImageNet code's final commit (methods.md e.1).

    A DeiT student reads as in the official DeiT code: `student_embedding="patch_mean"` (the mean of the
    patch tokens) for the feature term and `kd_logits="distill_logits"` (the second head) for the KL term;
    the CE term always trains the class head.

    Terms:
      - `ce` = CE(z_s, y);
      - `kd` = KL(softmax(z_t) || softmax(z_s)) at T = 1 (batchmean);
      - `srd` = log sum_{b,j} |bn(W f_s + c)_bj - bn(f_t)_bj|^p (`losses.srd_loss`), or with
        `distance="correlation"` the earlier form log sum_j |rho_j - 1|^p (methods.md e.2).
    The official total is 1 * CE + 1 * KL + 2 * log-sum; the YAML holds those weights.

    The projector Linear(D_s, D_t) with bias is a side branch: the student's classifier reads the raw
    embedding, and the projector is discarded after training.
    """

    loss_terms = ("ce", "kd", "srd")
    teacher_features = frozenset({"logits", "embedding"})

    def __init__(
        self,
        exponent: float = 4.0,
        eps: float = 1e-4,
        distance: Literal["logsum", "correlation"] = "logsum",
        temperature: float = 1.0,
        student_embedding: str = "embedding",
        kd_logits: str = "logits",
    ):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.kd_logits = check_tap(kd_logits, LOGIT_TAPS, "kd_logits")
        self.student_features = frozenset({"logits", student_embedding, kd_logits})
        if distance not in ("logsum", "correlation"):
            raise ValueError(f"SRD distance must be 'logsum' or 'correlation', got {distance!r}")
        self.exponent, self.eps, self.distance, self.temperature = exponent, eps, distance, temperature
        self.projector: nn.Module = nn.Identity()

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_dim = getattr(student_probe, self.student_embedding).shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        # Always built, even for equal dims: SRD credits the linear projector itself for the gain.
        self.projector = nn.Linear(student_dim, teacher_dim, bias=True)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        projected = self.projector(getattr(student, self.student_embedding))
        if self.distance == "logsum":
            representation = srd_loss(projected, teacher.embedding, self.exponent, self.eps)
        else:
            representation = _srd_correlation_loss(projected, teacher.embedding, self.exponent, self.eps)
        return {
            "ce": F.cross_entropy(student.logits, targets),
            "kd": kd_loss(getattr(student, self.kd_logits), teacher.logits, self.temperature),
            "srd": representation,
        }
