"""Model creation by name: the project's own zoo (CIFAR ResNets, small digits nets) and every timm model."""

import re

import torch
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

__all__ = [
    "FEATURE_KINDS",
    "ZOO",
    "NetworkOutput",
    "built_name",
    "create_model",
    "extract_features",
    "fitted_patch_size",
    "register_model",
]

SMALL_IMAGE_PATCH = 4  # the usual ViT patch for CIFAR-sized images (32 px: an 8×8 token grid)
TOKEN_GRID = 8  # tokens per side above that
PATCH_IN_NAME = re.compile(r"patch(\d+)_(\d+)")


def fitted_patch_size(
    image_size: int, default_image_size: int, default_patch_size: int, multiple: int = 1
) -> int:
    """A ViT's patch size for `image_size`: its own at its own input size; otherwise max(4, image_size / 8)
    (the CIFAR-ViT patch 4 up to 32 px, an 8×8 token grid above), at most half the image (a 2×2 grid at
    least: patch 4 on the 8 px digits), never above its own patch size, and a `multiple` of what the stem
    needs (the conv-stem DeiT: even patches)."""
    if image_size == default_image_size:
        return default_patch_size
    patch = max(SMALL_IMAGE_PATCH, image_size // TOKEN_GRID)
    patch = min(patch, max(1, image_size // 2), default_patch_size)
    return max(multiple, patch // multiple * multiple)


def create_model(
    name: str, num_classes: int, pretrained: bool | str = False, image_size: int | None = None, **kwargs
) -> nn.Module:
    """Build a model whose forward returns logits.

    `name` is a zoo name (`resnet20`, `resnet32x4`, `convnet_wide`, ...) or any timm model name. For timm,
    `pretrained` may be True (the default tag) or a tag string (`"deit_in1k"` -> `name.deit_in1k`).

    `image_size` is the data's input size. A model built for one input size (a ViT: its positional
    embedding covers a fixed patch grid) is built for this size instead, with `fitted_patch_size`, unless
    `img_size` / `patch_size` are given in `kwargs`; models that take any size (CNNs) ignore it.
    """
    make = _zoo_builder if name in ZOO else _timm_builder
    build, default_size, default_patch, patch_multiple = make(name, num_classes, pretrained, kwargs)
    if image_size is None or default_size is None or image_size == default_size or "img_size" in kwargs:
        return build()
    fitted = {"img_size": image_size}
    if default_patch is not None and "patch_size" not in kwargs:
        fitted["patch_size"] = fitted_patch_size(image_size, default_size, default_patch, patch_multiple)
    try:
        model = build(**fitted)
    except TypeError as error:  # a model without a fixed input size (or without patches) takes no such key
        if "patch_size" in str(error) and "patch_size" in fitted:
            del fitted["patch_size"]
            return _fitted(build(**fitted), fitted)
        if "img_size" not in str(error):
            raise
        return build()
    return _fitted(model, fitted)


def _zoo_builder(name: str, num_classes: int, pretrained, kwargs: dict) -> tuple:
    """A builder for a CIFAR-zoo model, its default input size, patch size and patch multiple."""
    if pretrained:
        raise UserError(
            f"model {name!r} is from the project's CIFAR zoo and has no pretrained tags; "
            "load weights with teacher.checkpoint=PATH instead"
        )

    def build(**extra):
        return ZOO[name](num_classes=num_classes, **kwargs, **extra)

    cls = ZOO[name]
    return (
        build,
        getattr(cls, "default_image_size", None),
        getattr(cls, "default_patch_size", None),
        getattr(cls, "patch_multiple", 1),
    )


def _timm_builder(name: str, num_classes: int, pretrained, kwargs: dict) -> tuple:
    """A builder for a timm model (`pretrained`: True or a tag), its default input and patch size."""
    import timm

    timm_name = name.split(".")[0]
    if not timm.is_model(timm_name):
        raise UserError(
            f"unknown model {name!r}: not in the zoo ({', '.join(sorted(ZOO))}) "
            "and not a timm model (see timm.list_models())"
        )
    full_name, use_pretrained = name, pretrained
    if isinstance(pretrained, str):
        full_name, use_pretrained = f"{timm_name}.{pretrained}", True

    def build(**extra):
        return timm.create_model(
            full_name, pretrained=use_pretrained, num_classes=num_classes, **kwargs, **extra
        )

    in_name = PATCH_IN_NAME.search(timm_name)
    return build, _timm_default_image_size(timm_name), int(in_name.group(1)) if in_name else None, 1


def _fitted(model: nn.Module, fitted: dict) -> nn.Module:
    model.fitted_input = dict(fitted)  # read by built_name: the summary names the model as built
    return model


def _timm_default_image_size(timm_name: str) -> int | None:
    import timm

    try:
        config = timm.models.get_pretrained_cfg(timm_name)
    except (RuntimeError, KeyError):
        config = None
    input_size = getattr(config, "input_size", None) if config is not None else None
    return int(input_size[-1]) if input_size else None


def built_name(name: str, model: nn.Module) -> str:
    """`name` as the model was built: a ViT fitted to other images says so (`deit_tiny_distilled_patch16_224`
    on 8 px digits with patch 1 -> `deit_tiny_distilled_patch1_8`)."""
    fitted = getattr(model, "fitted_input", None)
    if not fitted:
        return name
    size = fitted["img_size"]
    patch_embed = getattr(model, "patch_embed", None)
    patch = fitted.get("patch_size") or _first(getattr(patch_embed, "patch_size", None))
    if patch is not None and PATCH_IN_NAME.search(name):
        return PATCH_IN_NAME.sub(f"patch{patch}_{size}", name, count=1)
    return f"{name} ({size} px" + (f", patch {patch})" if patch is not None else ")")


def _first(value):
    if isinstance(value, tuple | list | torch.Size):
        return int(value[0])
    return value
