"""One way to read logits, embeddings, stage maps and ViT tokens from any model.

Zoo models implement timm's feature API (`forward_features`, `forward_head(pre_logits=)`,
`get_classifier`, `forward_intermediates`), so the same code serves the CIFAR zoo and every timm model. A
method declares the features it needs; asking only for logits costs exactly one plain forward.

Feature kinds:
  - `logits`: B x K, the class head. For a two-headed DeiT: the class-token head when the caller also reads
    `distill_logits` (the DeiT / SRD / VkD protocol: CE trains the class head, distillation the second
    one); otherwise the deployed output, the mean of both heads, so that a method that reads only `logits`
    (CE, DKD on a one-head tap, ...) trains what validation scores and leaves no head untrained.
  - `embedding`: B x D, the pooled vector the classifier reads (timm's `pre_logits`).
  - `stages`: the stem and each stage's output map (B x C x H x W), shallow to deep, as the model's
    mdistiller counterpart taps them (`feats`: post-activation, except WRN's raw residual sums).
  - `preact_stages`: the same list with each stage's map taken before its final ReLU (mdistiller's
    `preact_feats`; the stem stays post-activation), as ReviewKD's teacher needs; for the zoo and timm
    ResNets.
  - `class_token`, `patch_mean`: a ViT's class token and the mean of its patch tokens after the final norm.
  - `distill_logits`: the second head of a two-headed ViT (timm's distilled DeiT, `head_dist` on token 1).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kd_experiments.errors import UserError

FEATURE_KINDS = frozenset(
    {"logits", "embedding", "stages", "preact_stages", "class_token", "patch_mean", "distill_logits"}
)
TOKEN_KINDS = frozenset({"class_token", "patch_mean", "distill_logits"})


@dataclass
class NetworkOutput:
    """What one network produced for one batch; kinds nobody asked for stay None."""

    logits: torch.Tensor
    embedding: torch.Tensor | None = None
    stages: list[torch.Tensor] | None = None
    preact_stages: list[torch.Tensor] | None = None
    class_token: torch.Tensor | None = None
    patch_mean: torch.Tensor | None = None
    distill_logits: torch.Tensor | None = None

    def to(self, device: torch.device) -> "NetworkOutput":
        """The same outputs on `device` (tensors and lists of tensors; None stays None)."""

        def move(value):
            if isinstance(value, list):
                return [item.to(device, non_blocking=True) for item in value]
            return value.to(device, non_blocking=True) if value is not None else None

        return NetworkOutput(**{name: move(value) for name, value in vars(self).items()})


def has_distill_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "head_dist", None), nn.Module)


# The attribute under which `fast_path.install` keeps a network's `FeatureRoute` (channels_last, compile).
ROUTE_ATTRIBUTE = "_kd_feature_route"


def extract_features(model: nn.Module, images: torch.Tensor, needs: frozenset[str]) -> NetworkOutput:
    """Run `model` once and return the features in `needs` (a subset of FEATURE_KINDS). A network given a
    fast-path route (`fast_path.FeatureRoute`: channels_last, torch.compile) runs through it."""
    route = model.__dict__.get(ROUTE_ATTRIBUTE)
    if route is not None:
        return route(model, images, needs)
    return extract_features_eager(model, images, needs)


def extract_features_eager(model: nn.Module, images: torch.Tensor, needs: frozenset[str]) -> NetworkOutput:
    """`extract_features` as plain PyTorch, whatever the network's route (what a compiled route traces)."""
    unknown = needs - FEATURE_KINDS
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; known: {sorted(FEATURE_KINDS)}")
    two_heads = has_distill_head(model)
    if "distill_logits" in needs and not two_heads:
        raise UserError(
            f"the method trains a distillation head (distill_logits), but {type(model).__name__} has one "
            "head; use a two-headed DeiT student (student=deit_ti, deit_s, deit_b or deit_ti_convstem)"
        )
    if needs <= {"logits"} and not two_heads:
        return NetworkOutput(logits=model(images))

    output = NetworkOutput(logits=None)
    if "preact_stages" in needs:
        final_map, output.preact_stages, post_stages = _preact_intermediates(model, images)
        if "stages" in needs:
            output.stages = post_stages
    elif "stages" in needs:
        final_map, output.stages = model.forward_intermediates(images)
    else:
        final_map = model.forward_features(images)

    if needs & TOKEN_KINDS or two_heads:
        _read_tokens(model, final_map, needs, output)
    if two_heads:
        # timm's distilled DeiT: pre_logits is the mean of both tokens; each head reads its own token.
        output.embedding = model.forward_head(final_map, pre_logits=True)
        if "distill_logits" in needs:
            output.logits = model.head(final_map[:, 0])
        else:
            output.logits = (model.head(final_map[:, 0]) + model.head_dist(final_map[:, 1])) / 2
    else:
        output.embedding = model.forward_head(final_map, pre_logits=True)
        output.logits = model.get_classifier()(output.embedding)
    return output


def _read_tokens(model: nn.Module, final_map: torch.Tensor, needs: frozenset[str], output: NetworkOutput):
    if final_map.dim() != 3:
        asked = sorted(needs & TOKEN_KINDS)
        raise UserError(
            f"{type(model).__name__} produces a B x C x H x W feature map, not ViT tokens, so it has no "
            f"{', '.join(asked)}; use a ViT/DeiT model or a method option that reads `embedding`"
        )
    prefix = getattr(model, "num_prefix_tokens", 1)
    output.class_token = final_map[:, 0]
    output.patch_mean = final_map[:, prefix:].mean(dim=1)
    if "distill_logits" in needs:
        output.distill_logits = model.head_dist(final_map[:, 1])


def _preact_intermediates(model: nn.Module, images: torch.Tensor):
    """(final map, pre-activation stage list, post-activation stage list)."""
    if hasattr(model, "forward_intermediates_preact"):  # the project's zoo
        return model.forward_intermediates_preact(images)
    activations = _timm_stage_final_activations(model)
    captured: list[torch.Tensor] = []

    def keep_input(module, inputs):
        # clone: timm's ReLUs are in place and would overwrite the pre-activation values
        captured.append(inputs[0].clone())

    with _hooks(activations, keep_input):
        final_map, post_stages = model.forward_intermediates(images)
    if len(captured) != len(post_stages) - 1:
        raise UserError(
            f"pre-activation taps of {type(model).__name__} fired {len(captured)} times for "
            f"{len(post_stages) - 1} stages; use the method's post-activation option"
        )
    # Position 0 (the stem, or the first stage for timm MobileNets) stays post-activation, as in the zoo.
    return final_map, [post_stages[0], *captured], post_stages


def _timm_stage_final_activations(model: nn.Module) -> list[nn.Module]:
    """The activation that ends each feature stage (after position 0) of a timm ResNet (the last block's
    act2 / act3) or a timm MobileNet-V1-style network (the last depthwise-separable block's bn2.act)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv
    from timm.models.resnet import ResNet

    unsupported = UserError(
        f"pre-activation stage features are available for the CIFAR zoo, timm ResNets and timm "
        f"MobileNet-V1-style networks, not for {type(model).__name__}; use the method's post-activation "
        "option (e.g. teacher_preact=false)"
    )
    info = getattr(model, "feature_info", None)
    if info is None:
        raise unsupported
    names = [entry["module"] for entry in info]
    activations = []
    for name in names[1:]:
        stage = model.get_submodule(name)
        block = stage[-1] if isinstance(stage, nn.Sequential) else stage
        if isinstance(model, ResNet):
            final_act = getattr(block, "act3", None) or getattr(block, "act2", None)
        elif (
            isinstance(block, DepthwiseSeparableConv)
            and not block.has_skip  # with a skip the activation would not end the block
            and not isinstance(block.bn2.act, nn.Identity)
        ):
            final_act = block.bn2.act
        else:
            raise unsupported
        if final_act is None:
            raise unsupported
        activations.append(final_act)
    return activations


@contextmanager
def _hooks(modules: list[nn.Module], pre_hook):
    handles = [module.register_forward_pre_hook(pre_hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
