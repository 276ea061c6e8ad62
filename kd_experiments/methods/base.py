"""The contract between a distillation method and the training module."""

import torch
from torch import nn

from kd_experiments.models.features import NetworkOutput


class DistillationMethod(nn.Module):
    """Base class of every objective.

    Subclasses set
      - `loss_terms`: the names of the terms `forward` returns (each gets a weight in the method YAML);
      - `student_features` / `teacher_features`: which of `logits`, `embedding`, `stages` they read from each
        network (an empty `teacher_features` means the teacher is not run during training);
    and implement `forward(student, teacher, targets) -> {term: scalar tensor}`. Trainable parts (projectors)
    are ordinary submodules: they reach the optimizer and move with the model; build them in `__init__` or,
    when their shape depends on the networks, in `setup`.
    """

    loss_terms: tuple[str, ...] = ()
    student_features: frozenset[str] = frozenset({"logits"})
    teacher_features: frozenset[str] = frozenset({"logits"})

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        """Called once before the optimizer is built, with both networks' features for one small batch."""

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
