"""Model creation by name: the project's own zoo (CIFAR ResNets, small digits nets) and every timm model."""

from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.models import (  # noqa: F401  (registers the zoo)
    cifar_resnet,
    cifar_resnetv2,
    convnet,
    deit_convstem,
    mobilenetv2,
    shufflenet,
    vgg,
    wrn,
)
from kd_experiments.models.features import FEATURE_KINDS, NetworkOutput, extract_features
from kd_experiments.models.registry import ZOO, register_model

__all__ = ["FEATURE_KINDS", "ZOO", "NetworkOutput", "create_model", "extract_features", "register_model"]


def create_model(name: str, num_classes: int, pretrained: bool | str = False, **kwargs) -> nn.Module:
    """Build a model whose forward returns logits.

    `name` is a zoo name (`resnet20`, `resnet32x4`, `convnet_wide`, ...) or any timm model name. For timm,
    `pretrained` may be True (the default tag) or a tag string (`"deit_in1k"` -> `name.deit_in1k`).
    """
    if name in ZOO:
        if pretrained:
            raise UserError(
                f"model {name!r} is from the project's CIFAR zoo and has no pretrained tags; "
                "load weights with teacher.checkpoint=PATH instead"
            )
        return ZOO[name](num_classes=num_classes, **kwargs)

    import timm

    timm_name = name.split(".")[0]
    if not timm.is_model(timm_name):
        raise UserError(
            f"unknown model {name!r}: not in the zoo ({', '.join(sorted(ZOO))}) "
            "and not a timm model (see timm.list_models())"
        )
    if isinstance(pretrained, str):
        name, pretrained = f"{timm_name}.{pretrained}", True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
