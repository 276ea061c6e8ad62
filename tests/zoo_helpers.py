"""Helpers shared by the CIFAR-zoo tests: build a model, its state-dict shapes and their digest, the
reference JSON of mdistiller's CIFAR-100 checkpoints."""

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from kd_experiments.models.registry import ZOO

REFERENCE_JSON_CANDIDATES = [
    os.environ.get("KD_CIFAR_ZOO_REFERENCE", ""),
    # CI and developers have the shared folder beside the repository.
    str(Path(__file__).resolve().parents[2] / "shared/reference/cifar_zoo_state_dicts.json"),
]


def build(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    return ZOO[name](num_classes=num_classes, **kwargs).eval()


def state_dict_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def shapes_digest(shapes: dict[str, list[int]]) -> str:
    """sha256 (first 16 hex digits) of the sorted "name:shape" list, so the check runs without the JSON."""
    text = ";".join(f"{key}:{'x'.join(map(str, shape))}" for key, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def load_reference_shapes() -> dict[str, dict[str, list[int]]] | None:
    for candidate in REFERENCE_JSON_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return json.loads(Path(candidate).read_text())
    return None
