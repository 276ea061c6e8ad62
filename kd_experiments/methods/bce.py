"""Binary cross-entropy with multi-hot labels: the multi-label task's counterpart of the shared `ce` term
(a multi-label method YAML weights it as `bce`)."""

import torch
import torch.nn.functional as F

from kd_experiments.errors import UserError
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class MultiLabelBCE(DistillationMethod):
    """BCEWithLogits(z_s, y), the mean over the B x K entries whose target is 0 or 1 (an entry of -1 is
    left out): the multi-label classification loss of LSHFM's multi-label code
    (DoctorKey/LSHFM.multiclassification `src/multilabel/baseline.py`, `nn.BCEWithLogitsLoss()`, mean over
    batch and classes; its training targets have no -1)."""

    teacher_features = frozenset()

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        if not targets.is_floating_point() or targets.shape != student.logits.shape:
            raise UserError(
                f"the bce term needs multi-hot targets shaped like the logits {tuple(student.logits.shape)}, "
                f"got {tuple(targets.shape)} {targets.dtype}; use a multi-label data set (dataset.task: "
                "multilabel), or the ce term for single-label data"
            )
        known = targets >= 0
        losses = F.binary_cross_entropy_with_logits(student.logits, targets.clamp_min(0), reduction="none")
        return (losses * known).sum() / known.sum().clamp_min(1)
