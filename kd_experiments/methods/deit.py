"""DeiT's distillation token: a second head trained to match the teacher (hard labels or soft targets)."""

from typing import Literal

import torch
import torch.nn.functional as F

from kd_experiments.methods.base import DistillationMethod, linear_warmup
from kd_experiments.models.features import NetworkOutput


class DistillationToken(DistillationMethod):
    """Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML
    2021), Sec. 5, the distillation token (methods.md i). The student is a two-headed DeiT (timm's
    `deit_*_distilled_*`): `head` reads the class token, `head_dist` the distillation token; inference
    averages both heads' logits (timm's eval forward), which is what validation reports.

    Terms, with z_cls / z_dist the two heads' logits and z_t the teacher's:
      - `ce` = CE(z_cls, y);
      - `distill`, `kind="hard"` (the DeiT⚗ default): CE(z_dist, argmax z_t);
        `kind="soft"`: T² · KL(softmax(z_t/T) || softmax(z_dist/T)) summed and divided by B·K (the official
        code's reduction, not batchmean).
    The paper's total is (1 − α) CE + α distill with α = 0.5; the YAML holds both weights.

    `warmup_epochs` / `warmup_epoch_base` warm the `distill` term up (never `ce`), see `linear_warmup`: DeiT
    itself has none; the ND paper's DeiT++ (`conf/method/deit++.yaml`) uses 5 epochs counted from 0
    (`min(epoch / 5, 1)` in ND's ImageNet/DeiT/train_launch_distilled.py).
    """

    loss_terms = ("ce", "distill")
    student_features = frozenset({"logits", "distill_logits"})
    teacher_features = frozenset({"logits"})

    def __init__(
        self,
        kind: Literal["hard", "soft"] = "hard",
        temperature: float = 1.0,
        warmup_epochs: int = 0,
        warmup_epoch_base: int = 0,
    ):
        super().__init__()
        if kind not in ("hard", "soft"):
            raise ValueError(f"DeiT distillation kind must be 'hard' or 'soft', got {kind!r}")
        self.kind, self.temperature = kind, temperature
        self.warmup_epochs, self.warmup_epoch_base = warmup_epochs, warmup_epoch_base

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        teacher_logits = teacher.logits.detach()
        if self.kind == "hard":
            distill = F.cross_entropy(student.distill_logits, teacher_logits.argmax(dim=1))
        else:
            t = self.temperature
            distill = (
                F.kl_div(
                    F.log_softmax(student.distill_logits / t, dim=1),
                    F.log_softmax(teacher_logits / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * t**2
                / student.distill_logits.numel()
            )
        warmup = linear_warmup(self.epoch, self.warmup_epochs, self.warmup_epoch_base)
        return {"ce": F.cross_entropy(student.logits, targets), "distill": warmup * distill}
