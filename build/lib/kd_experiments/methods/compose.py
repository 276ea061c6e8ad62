"""A method = named objectives (one loss term each) + the weight and warm-up of every term.

`method.objectives` maps term names to objectives and `method.weights` gives each term its weight; the same
shape serves a single method (KD: `{kd: HintonKD}`) and a composed one (KD++: `{kd: HintonKD, nd:
NormDirection}`), so one override such as `method.objectives.kd.temperature=2` reaches the same objective in
kd, kd++ and dkd++. The cross-entropy term `ce` is shared: it is added here whenever `method.weights` weights
it, instead of being computed by every objective.
"""

import math
from collections.abc import Mapping

import torch
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.models.features import NetworkOutput

SHARED_CE = "ce"


def linear_warmup(epoch: int, warmup_epochs: int, epoch_base: int = 1) -> float:
    """Warm-up factor of a term in (0-based, Lightning) epoch `epoch`: min((epoch + base) / W, 1).

    `epoch_base` fixes the counting convention of the paper's code: 1 reproduces mdistiller (epochs count
    from 1, so the first epoch already has factor 1/W), 0 reproduces the ND and ReviewKD scripts (the first
    epoch has factor 0). `warmup_epochs=0` means no warm-up.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + epoch_base) / warmup_epochs, 1.0)


class LossWeights:
    """`method.weights` ({term: number}) and `method.warmup` ({term: {epochs: W, epoch_base: 0|1}}).

    The weight of a term in epoch e is weight * linear_warmup(e, W, epoch_base); the module applies it, so
    objectives hold no epoch. Warm-ups live beside the weights, not inside them, so that overriding a
    weight (`method.weights.kd=2`) can never drop its warm-up.
    """

    def __init__(self, weights: Mapping[str, float], warmup: Mapping[str, Mapping] | None = None):
        self.weights: dict[str, float] = {}
        for term, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"method.weights.{term} must be a finite number, got {value!r}")
            self.weights[term] = float(value)
        self.warmup: dict[str, tuple[int, int]] = {}
        for term, schedule in (warmup or {}).items():
            if term not in self.weights:
                raise UserError(
                    f"method.warmup.{term} warms up a term that method.weights does not weight "
                    f"({', '.join(self.weights)}); remove it or add a weight"
                )
            valid = isinstance(schedule, Mapping) and not set(schedule) - {"epochs", "epoch_base"}
            epochs = schedule.get("epochs", 0) if valid else None
            base = schedule.get("epoch_base", 1) if valid else None
            if not (_is_int(epochs) and epochs >= 0 and _is_int(base) and base in (0, 1)):
                raise UserError(
                    f"method.warmup.{term} must be {{epochs: N >= 0, epoch_base: 0 or 1}}, got {schedule!r}"
                )
            self.warmup[term] = (epochs, base)

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def at(self, epoch: int) -> dict[str, float]:
        """Every term's weight in (0-based) epoch `epoch`."""
        return {
            term: weight * linear_warmup(epoch, *self.warmup.get(term, (0, 1)))
            for term, weight in self.weights.items()
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Objectives(nn.Module):
    """The objectives of one method, by term name; `forward` returns {term: scalar tensor}.

    The networks run once per step for the union of the features the objectives read.
    """

    def __init__(self, objectives: Mapping[str, DistillationMethod]):
        super().__init__()
        for name, objective in objectives.items():
            if not isinstance(objective, DistillationMethod):
                raise UserError(
                    f"method.objectives.{name} builds a {type(objective).__name__}, not a DistillationMethod"
                )
        self.objectives = nn.ModuleDict(dict(objectives))
        self.terms: tuple[str, ...] = tuple(objectives)
        features = [(o.student_features, o.teacher_features) for o in objectives.values()]
        self.student_features = frozenset().union(*(s for s, _ in features))
        self.teacher_features = frozenset().union(*(t for _, t in features))

    def adapt_student(
        self, student: nn.Module, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None
    ) -> nn.Module:
        """Each objective's `adapt_student` in turn; each sees the probe of the student as given (the
        framework probes again after adapting, before `setup`)."""
        for objective in self.objectives.values():
            student = objective.adapt_student(student, student_probe, teacher_probe)
        return student

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        for objective in self.objectives.values():
            objective.setup(student_probe, teacher_probe)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {name: objective(student, teacher, targets) for name, objective in self.objectives.items()}


def assemble(objectives: Mapping[str, DistillationMethod], weights: LossWeights) -> Objectives:
    """The method's objectives plus the shared `ce` term when the weights name it; every term must have
    exactly one weight."""
    objectives = dict(objectives)
    if SHARED_CE in weights.weights and SHARED_CE not in objectives:
        objectives = {SHARED_CE: CrossEntropy(), **objectives}
    if set(objectives) != set(weights.terms):
        raise UserError(
            f"method.objectives defines the terms {sorted(objectives)} (with the shared ce when "
            f"weighted) but method.weights weights {sorted(weights.terms)}; give exactly one weight per term"
        )
    return Objectives(objectives)
