"""Several objectives trained together, e.g. the ND paper's "++" variants (a base loss plus ND)."""

import torch
from torch import nn

from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class Compose(DistillationMethod):
    """The union of the objectives' loss terms; each term keeps its own weight in the method YAML.

    Built from YAML as a list, e.g. KD++ = [HintonKD, NormDirection]. Term names must not collide, except
    `ce`, which several objectives may return: it is computed by the first one only, so it is counted once.
    """

    def __init__(self, objectives: list[DistillationMethod]):
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        names: list[str] = []
        for objective in objectives:
            for term in objective.loss_terms:
                if term in names and term != "ce":
                    raise ValueError(f"two composed objectives both return the loss term {term!r}")
                if term not in names:
                    names.append(term)
        self.loss_terms = tuple(names)
        self.student_features = frozenset().union(*(o.student_features for o in objectives))
        self.teacher_features = frozenset().union(*(o.teacher_features for o in objectives))

    def adapt_student(
        self, student: nn.Module, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None
    ) -> nn.Module:
        for objective in self.objectives:
            student = objective.adapt_student(student, student_probe, teacher_probe)
        return student

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        for objective in self.objectives:
            objective.setup(student_probe, teacher_probe)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            for name, value in objective(student, teacher, targets).items():
                terms.setdefault(name, value)
        return terms
