"""Hinton KD: the student matches the teacher's temperature-softened class distribution."""

import torch

from kd_experiments.losses import kd_loss
from kd_experiments.methods.base import LOGIT_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


def logit_tap_features(student_logits: str) -> frozenset[str]:
    """The student features a logit-distillation term reads: its logits tap (and the class head, which the
    shared CE trains, is always there)."""
    return frozenset({"logits", check_tap(student_logits, LOGIT_TAPS, "student_logits")})


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature


class HintonKD(DistillationMethod):
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531, 2015),
    Sec. 2: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean (`losses.kd_loss`).

    mdistiller's CIFAR-100 defaults (`mdistiller/distillers/KD.py`, `configs/cifar100/kd.yaml`): T = 4, CE
    0.1, KD 0.9. The ND paper's KD++ warms this term up (`method.warmup.kd`). SRD and VkD use it at T = 1
    as their logit term (SRD `imagenet/torchdistill/losses/single.py`, VkD `engine.py`).

    `student_logits` names the student head it trains: `logits`, or `distill_logits`, the second head of a
    two-headed DeiT (DeiT's soft distillation; SRD's and VkD's DeiT code). The method YAMLs take it from the
    student config (`student.taps.kd_logits`).
    """

    def __init__(self, temperature: float = 4.0, student_logits: str = "logits"):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.student_logits = student_logits
        self.student_features = logit_tap_features(student_logits)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(getattr(student, self.student_logits), teacher.logits, self.temperature)
