"""DIST: match the teacher's inter-class and intra-class relations (Pearson correlations)."""

import torch
import torch.nn.functional as F

from kd_experiments.losses import dist_loss
from kd_experiments.methods.base import DistillationMethod, linear_warmup
from kd_experiments.models.features import NetworkOutput


class RelationKD(DistillationMethod):
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022); math in
    `losses.dist_loss`. Terms: `ce` and `dist` = warm-up * T^2 * (beta * inter + gamma * intra), with the
    ND repository's DIST++ settings by default (beta = gamma = 1, T = 4, 20-epoch warm-up counted from 0).
    """

    loss_terms = ("ce", "dist")

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        warmup_epoch_base: int = 0,
    ):
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature
        self.warmup_epochs, self.warmup_epoch_base = warmup_epochs, warmup_epoch_base

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        warmup = linear_warmup(self.epoch, self.warmup_epochs, self.warmup_epoch_base)
        relation = dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.temperature)
        return {"ce": F.cross_entropy(student.logits, targets), "dist": warmup * relation}
