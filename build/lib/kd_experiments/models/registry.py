"""Name -> builder registry for the project's own models (the CIFAR zoo and the small digits nets).

timm models need no registration: `create_model` falls back to `timm.create_model` for any name that is
not registered here.
"""

from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

ZOO: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register `builder(num_classes, in_chans=3, **kwargs) -> nn.Module` under `name`."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in ZOO:
            raise ValueError(f"model name {name!r} is registered twice")
        ZOO[name] = builder
        return builder

    return decorate
