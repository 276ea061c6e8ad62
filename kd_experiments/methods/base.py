"""The contract between a distillation objective and the training module."""

from collections.abc import Iterable

import torch
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.models.features import NetworkOutput

EMBEDDING_TAPS = ("embedding", "patch_mean", "class_token")
LOGIT_TAPS = ("logits", "distill_logits")


def check_tap(value: str, allowed: tuple[str, ...], option: str) -> str:
    """Validate an objective option naming the feature it reads (e.g. a DeiT student's `patch_mean`)."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def require_class_targets(targets: torch.Tensor, method: str) -> None:
    """Stop with one line when an objective that indexes by the label gets mixed (soft) targets."""
    if targets.dim() != 1 or targets.is_floating_point():
        raise UserError(
            f"{method} needs class-index targets, but the batch has soft targets of shape "
            f"{tuple(targets.shape)} (Mixup/CutMix or label smoothing); set dataset.mixup=null"
        )


class DistillationMethod(nn.Module):
    """Base class of every objective: one loss term.

    A method YAML maps term names to objectives (`objectives: {kd: {_target_: ...HintonKD}, nd: ...}`); the
    framework gathers them in `compose.Objectives`, adds the shared cross-entropy term `ce`, and weights
    each term (and warms it up) with `method.weights` / `method.warmup`. An objective knows nothing of its
    weight, its name or the epoch.

    Subclasses set `student_features` / `teacher_features`, which of `models.FEATURE_KINDS` they read from
    each network (an empty `teacher_features` means the teacher is not run for this objective), and
    implement `forward(student, teacher, targets) -> scalar tensor`. Trainable parts (projectors) are
    ordinary submodules: they reach the optimizer and move with the model; build them in `__init__` or,
    when their shape depends on the networks, in `setup`.

    Optional hooks:
      - `adapt_student(student, student_probe, teacher_probe) -> student`: once, before `setup`, for an
        objective that changes the deployed student itself (LSHFM puts a projection before the classifier);
      - `setup(student_probe, teacher_probe)`: once before the optimizer is built, with one small batch's
        features from both networks (eval mode), to size projectors and check shapes;
      - `statistics_name` + `compute_teacher_statistics` + `set_teacher_statistics`: statistics of the
        teacher over the training split (ND's class centres, LSHFM's hash bias), computed once and cached by
        the framework beside the teacher, keyed by the teacher's sha256, the data config and this name;
        `statistics_features` names the teacher features the statistics pass hands them.
    """

    student_features: frozenset[str] = frozenset({"logits"})
    teacher_features: frozenset[str] = frozenset({"logits"})
    statistics_name: str | None = None
    statistics_features: frozenset[str] = frozenset({"embedding"})  # what the statistics pass reads

    def adapt_student(
        self, student: nn.Module, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None
    ) -> nn.Module:
        """Return the network to train and deploy as the student; by default the student unchanged."""
        return student

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        """Called once before the optimizer is built, with both networks' features for one small batch."""

    def compute_teacher_statistics(
        self, teacher: nn.Module, batches: Iterable[tuple[NetworkOutput, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The statistics, from `batches`: (the teacher's `statistics_features`, labels) per batch of one
        plain pass over the training split, on the teacher's device. The framework runs the teacher (eval
        mode, no gradients) or reads its outputs from the teacher-output cache; `teacher` is there for its
        weights (LSHFM's hash std is the classifier's)."""
        raise NotImplementedError(f"{type(self).__name__} sets statistics_name but computes no statistics")

    def set_teacher_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets statistics_name but takes no statistics")

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError
