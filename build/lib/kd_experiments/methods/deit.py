"""DeiT's distillation token: a second head trained to match the teacher (hard labels or soft targets)."""

from typing import Literal

import torch
import torch.nn.functional as F

from kd_experiments.methods.base import DistillationMethod
from kd_experiments.methods.kd import check_temperature
from kd_experiments.models.features import NetworkOutput


class DistillationToken(DistillationMethod):
    """Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML
    2021), Sec. 5.2, the distillation token; official code facebookresearch/deit `losses.py`
    (`DistillationLoss`). The student is a two-headed DeiT (timm's `deit_*_distilled_*`): `head` reads the
    class token, `head_dist` the distillation token; inference averages both heads' logits (timm's eval
    forward), which is what validation reports.

    The term (`distill`), with z_dist the distillation head's logits and z_t the teacher's:
      - `kind="hard"` (the DeiT⚗ default): CE(z_dist, argmax z_t);
      - `kind="soft"`: T² · KL(softmax(z_t/T) ‖ softmax(z_dist/T)) summed and divided by B·K (the official
        code's reduction, not batchmean).
    The paper's total is (1 − α) CE(z_cls, y) + α distill with α = 0.5: the shared `ce` term (on the class
    head) and this one, weighted 0.5 each in the YAML. DeiT has no warm-up; the ND paper's DeiT++ warms
    this term over 5 epochs counted from 0 (`method.warmup.distill`).
    """

    student_features = frozenset({"logits", "distill_logits"})
    teacher_features = frozenset({"logits"})

    def __init__(self, kind: Literal["hard", "soft"] = "hard", temperature: float = 1.0):
        super().__init__()
        if kind not in ("hard", "soft"):
            raise ValueError(f"DeiT distillation kind must be 'hard' or 'soft', got {kind!r}")
        self.kind, self.temperature = kind, check_temperature(temperature)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        teacher_logits = teacher.logits.detach()
        if self.kind == "hard":
            return F.cross_entropy(student.distill_logits, teacher_logits.argmax(dim=1))
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(student.distill_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="sum",
            log_target=True,
        )
        return kl * t**2 / student.distill_logits.numel()
