"""The student alone, trained with cross-entropy: the baseline every method is compared to."""

import torch
import torch.nn.functional as F

from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class CrossEntropy(DistillationMethod):
    """L = CE(z_s, y). Targets may be class indices or class probabilities (Mixup/CutMix)."""

    loss_terms = ("ce",)
    teacher_features = frozenset()

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(student.logits, targets)}
