"""Decoupled KD: target-class and non-target-class KD with separate weights."""

import torch
import torch.nn.functional as F

from kd_experiments.losses import dkd_loss
from kd_experiments.methods.base import DistillationMethod, linear_warmup, require_class_targets
from kd_experiments.models.features import NetworkOutput


class DecoupledKD(DistillationMethod):
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022); math in `losses.dkd_loss`.

    Terms: `ce` = CE(z_s, y) and `dkd` = warm-up * T^2 * (alpha * TCKD + beta * NCKD), the warm-up
    min((epoch + warmup_epoch_base) / warmup_epochs, 1) multiplying the whole DKD term (mdistiller:
    20 epochs on CIFAR-100, counted from 1).
    """

    loss_terms = ("ce", "dkd")

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        warmup_epoch_base: int = 1,
    ):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs, self.warmup_epoch_base = warmup_epochs, warmup_epoch_base

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        require_class_targets(targets, "DKD")  # its target/non-target split indexes by the label
        warmup = linear_warmup(self.epoch, self.warmup_epochs, self.warmup_epoch_base)
        return {
            "ce": F.cross_entropy(student.logits, targets),
            "dkd": warmup
            * dkd_loss(student.logits, teacher.logits, targets, self.alpha, self.beta, self.temperature),
        }
