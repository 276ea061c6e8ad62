"""Hinton KD: the student matches the teacher's temperature-softened class distribution."""

import torch
import torch.nn.functional as F

from kd_experiments.losses import kd_loss
from kd_experiments.methods.base import DistillationMethod, linear_warmup
from kd_experiments.models.features import NetworkOutput


class HintonKD(DistillationMethod):
    """Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015).

    Terms: `ce` = CE(z_s, y) and `kd` = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) (batchmean, see
    `losses.kd_loss`); the YAML weights them (mdistiller's CIFAR defaults: 0.1 and 0.9, T = 4, no warm-up;
    the ND paper's KD++ warms the KD term up over 20 epochs counted from 0, see `linear_warmup`).
    """

    loss_terms = ("ce", "kd")

    def __init__(self, temperature: float = 4.0, warmup_epochs: int = 0, warmup_epoch_base: int = 1):
        super().__init__()
        self.temperature = temperature
        self.warmup_epochs, self.warmup_epoch_base = warmup_epochs, warmup_epoch_base

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "ce": F.cross_entropy(student.logits, targets),
            "kd": linear_warmup(self.epoch, self.warmup_epochs, self.warmup_epoch_base)
            * kd_loss(student.logits, teacher.logits, self.temperature),
        }
