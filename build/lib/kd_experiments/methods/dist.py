"""DIST: match the teacher's inter-class and intra-class relations (Pearson correlations)."""

import torch

from kd_experiments.losses import dist_loss
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.methods.kd import check_temperature, logit_tap_features
from kd_experiments.models.features import NetworkOutput


class RelationKD(DistillationMethod):
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022), Eq. 8-10:
    T² · (β · inter + γ · intra) (`losses.dist_loss`), with the ND repository's DIST++ settings by default
    (WangYZ1608/Knowledge-Distillation-via-ND `CIFAR/DIST++/utils.py`, `train_dist.py`: β = γ = 1, T = 4;
    its 20-epoch warm-up counted from 0 is `method.warmup.kd`). `student_logits` as in `HintonKD`.
    """

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0, student_logits: str = "logits"
    ):
        super().__init__()
        self.beta, self.gamma = beta, gamma
        self.temperature = check_temperature(temperature)
        self.student_logits = student_logits
        self.student_features = logit_tap_features(student_logits)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        student_logits = getattr(student, self.student_logits)
        return dist_loss(student_logits, teacher.logits, self.beta, self.gamma, self.temperature)
