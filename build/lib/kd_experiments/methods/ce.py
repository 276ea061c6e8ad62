"""Cross-entropy with the labels: the baseline every method is compared to, and the `ce` term every method
shares (`compose.assemble` adds it whenever `method.weights.ce` is set)."""

import torch
import torch.nn.functional as F

from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class CrossEntropy(DistillationMethod):
    """CE(z_s, y), mean over the batch. Targets may be class indices or class probabilities
    (Mixup/CutMix, label smoothing). For a two-headed DeiT whose distillation head another term trains,
    z_s is the class head (see `models.features`)."""

    teacher_features = frozenset()

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(student.logits, targets)
