"""Decoupled KD: target-class and non-target-class KD with separate weights."""

import torch

from kd_experiments.losses import dkd_loss
from kd_experiments.methods.base import DistillationMethod, require_class_targets
from kd_experiments.methods.kd import check_temperature, logit_tap_features
from kd_experiments.models.features import NetworkOutput


class DecoupledKD(DistillationMethod):
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), Eq. 7: T² · (α · TCKD + β · NCKD)
    (`losses.dkd_loss`); official code mdistiller `mdistiller/distillers/DKD.py`, which names this term
    `loss_kd`, as the method YAMLs do (`kd`). mdistiller's CIFAR-100 defaults: α 1, β 8, T 4, a 20-epoch
    warm-up counted from 1 (`method.warmup.kd`). `student_logits` as in `HintonKD`.
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, student_logits: str = "logits"
    ):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.temperature = check_temperature(temperature)
        self.student_logits = student_logits
        self.student_features = logit_tap_features(student_logits)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        require_class_targets(targets, "DKD")  # its target/non-target split indexes by the label
        student_logits = getattr(student, self.student_logits)
        return dkd_loss(student_logits, teacher.logits, targets, self.alpha, self.beta, self.temperature)
