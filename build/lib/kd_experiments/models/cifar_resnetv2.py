"""CIFAR variants of ResNet18 and ResNet50 (mdistiller's `resnetv2`), plus the feature-API base that the
CIFAR MobileNetV2 and ShuffleNets share.

The "v2" in mdistiller's file name only tells it apart from the narrow 6n+2 CIFAR ResNets: these are the
ImageNet ResNet-18/50 layouts (four stages, BasicBlock or Bottleneck) with a 3x3 stride-1 stem and no
max-pool, so the stages run at 32, 16, 8 and 4 px on CIFAR. Parameter names and shapes match the published
mdistiller CIFAR-100 checkpoints (`ResNet50_vanilla/ckpt_epoch_240.pth` loads with `strict=True`).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.models.positions import init_like_mdistiller, positions_to_take
from kd_experiments.models.registry import register_model

STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class CifarStagedNet(nn.Module):
    """timm-like feature API for a stem, a list of stages, an optional neck, global pooling and a classifier.

    Feature positions are 0 (the stem output, mdistiller's f0) and 1..n (the stage outputs f1..fn), in
    network order. Subclasses provide `forward_stem`, the `stages` (each an `nn.Sequential` of blocks whose
    last block has `forward_with_preact(x) -> (out, preact)`), `forward_neck` (the layers between the last
    stage and pooling; identity by default) and `get_classifier`, and set `num_classes`, `num_features`
    (the pooled dim) and `stage_channels` (the channels of positions 0..n).
    """

    num_classes: int
    num_features: int
    stage_channels: list[int]

    @property
    def stages(self) -> list[nn.Sequential]:
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map before pooling: the last stage's output passed through the neck."""
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.forward_neck(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool + flatten, then the classifier; `pre_logits` returns the pooled embedding.

        mdistiller pools with a fixed window (avg_pool 4, or AvgPool2d(2) for MobileNetV2) that covers the
        whole final map of a 32x32 input, so global pooling gives the same embedding there and stays
        well-defined for other input sizes.
        """
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return embedding if pre_logits else self.get_classifier()(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        preact: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Features at positions 0 (stem) and 1..n (stages), returned in network order.

        `indices`: None for all, an int k for the last k, or a list of positions (negatives allowed). With
        `preact`, stage entries are the model's pre-activation stage features (see `forward_with_preact` of
        its blocks); the stem entry is always the ordinary one. Returns `(final_map, intermediates)`, where
        `final_map` is what `forward_features` returns, or only the list when `intermediates_only` (then
        computation stops after the last requested position).
        """
        take = positions_to_take(indices, 1 + len(self.stages))
        final_map, post, pre = self._run(x, take, preact=preact, stop_early=intermediates_only)
        intermediates = pre if preact else post
        if intermediates_only:
            return intermediates
        return final_map, intermediates

    def forward_intermediates_preact(self, x: torch.Tensor):
        """(final map, pre-activation stage list, ordinary stage list): the feature API's `preact_stages`
        kind, from one forward pass. The stem entry is the ordinary (post-ReLU) stem in both lists."""
        take = set(range(1 + len(self.stages)))
        final_map, post, pre = self._run(x, take, preact=True, stop_early=False)
        return final_map, pre, post

    def _run(self, x: torch.Tensor, take: set[int], preact: bool, stop_early: bool):
        """One pass; returns (final map or None when stopped early, ordinary features, preact features)."""
        post: list[torch.Tensor] = []
        pre: list[torch.Tensor] = []
        x = self.forward_stem(x)
        if 0 in take:
            post.append(x)
            pre.append(x)
        stages = self.stages
        last_needed = max(take) if stop_early else len(stages)
        for position, stage in enumerate(stages[:last_needed], start=1):
            if preact and position in take:
                *leading_blocks, last_block = stage
                for block in leading_blocks:
                    x = block(x)
                x, stage_preact = last_block.forward_with_preact(x)
                pre.append(stage_preact)
            else:
                x = stage(x)
            if position in take:
                post.append(x)
        if stop_early:
            return None, post, pre
        return self.forward_neck(x), post, pre


def _projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """1x1 conv + BN where shape changes; an empty Sequential (identity, no parameters) otherwise."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers (stride on the first) and a shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection_shortcut(in_channels, planes, stride)

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Branch plus shortcut before the final ReLU (mdistiller's pre-activation feature)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return self.bn2(self.conv2(out)) + self.shortcut(x)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.residual_sum(x)
        return F.relu(preact), preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum is a fresh tensor nobody else holds, so the in-place ReLU is safe here.
        return F.relu(self.residual_sum(x), inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each with BN; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection_shortcut(in_channels, out_channels, stride)

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Branch plus shortcut before the final ReLU (mdistiller's pre-activation feature)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.residual_sum(x)
        return F.relu(preact), preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_sum(x), inplace=True)


class CifarResNetV2(CifarStagedNet):
    """3x3 stride-1 stem (64 ch), four stages (strides 1, 2, 2, 2), global average pool, `linear` classifier.

    Features: f0 = stem (post-ReLU), f1..f4 = the post-ReLU stage outputs; the final map is f4. Pre-activation
    features (mdistiller's `preact_feats`) are each stage's last residual sum before its ReLU, so
    relu(preact) == post for every stage.

    mdistiller's `get_stage_channels()` reports the Bottleneck widths [256, 512, 1024, 2048] even for
    ResNet18; `stage_channels` here lists the real channels of positions 0..4.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must list four stages, got {list(num_blocks)}")
        stem_width = STAGE_PLANES[0]
        self.num_classes = num_classes
        self.num_features = STAGE_PLANES[-1] * block.expansion
        self.stage_channels = [stem_width, *(planes * block.expansion for planes in STAGE_PLANES)]

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_channels = stem_width
        for index, (planes, count, stride) in enumerate(
            zip(STAGE_PLANES, num_blocks, STAGE_STRIDES, strict=True), start=1
        ):
            blocks = []
            for block_stride in [stride] + [1] * (count - 1):
                blocks.append(block(in_channels, planes, block_stride))
                in_channels = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.linear = nn.Linear(self.num_features, num_classes)
        # As mdistiller: no zero-init of the last BN in each block; PyTorch's default classifier init.
        init_like_mdistiller(self)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)), inplace=True)

    def get_classifier(self) -> nn.Module:
        return self.linear


def _build(name: str, block, num_blocks, num_classes: int, in_chans: int, extra_kwargs: dict) -> nn.Module:
    if extra_kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments: {sorted(extra_kwargs)}")
    return CifarResNetV2(block, num_blocks, num_classes=num_classes, in_chans=in_chans)


@register_model("ResNet18")
def resnet18_cifar(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("ResNet18", BasicBlock, (2, 2, 2, 2), num_classes, in_chans, kwargs)


@register_model("ResNet50")
def resnet50_cifar(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("ResNet50", Bottleneck, (3, 4, 6, 3), num_classes, in_chans, kwargs)
