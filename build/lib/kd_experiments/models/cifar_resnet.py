"""CIFAR-style ResNets of the CRD/mdistiller lineage (resnet8 ... resnet110, resnet8x4, resnet32x4).

Parameter names and shapes match the published mdistiller CIFAR-100 checkpoints, so those state dicts load
with `strict=True`. The models expose a timm-like feature API (`forward_features`, `forward_head`,
`forward_intermediates`) so the framework can tap zoo models and timm models the same way.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.models.positions import GlobalPoolHead, init_like_mdistiller, positions_to_take
from kd_experiments.models.registry import register_model

NARROW_WIDTHS = (16, 16, 32, 64)
WIDE_WIDTHS = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN `downsample`) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Branch output plus shortcut, before the final ReLU (mdistiller's pre-activation feature)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum is a fresh tensor nobody else holds, so the in-place ReLU is safe here.
        return F.relu(self.residual_sum(x), inplace=True)


class CifarResNet(GlobalPoolHead, nn.Module):
    """3x3 stem, three stages of BasicBlocks (strides 1, 2, 2), global average pool, linear classifier."""

    def __init__(
        self,
        depth: int,
        widths: Sequence[int] = NARROW_WIDTHS,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must list the stem and three stage widths, got {list(widths)}")
        blocks_per_stage = (depth - 2) // 6
        stem_width, *stage_widths = widths

        self.num_classes = num_classes
        self.num_features = stage_widths[-1]
        self.stage_channels = list(widths)

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.layer1 = self._make_stage(stem_width, stage_widths[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(stage_widths[0], stage_widths[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(stage_widths[1], stage_widths[2], blocks_per_stage, stride=2)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_like_mdistiller(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)), inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map: the post-ReLU output of layer3 (B x num_features x H/4 x W/4)."""
        x = self.forward_stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        preact: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Features at positions 0 (stem), 1..3 (stages), returned in network order.

        `indices`: None for all four, an int n for the last n, or a list of positions (negatives allowed).
        With `preact`, stage entries are the pre-ReLU residual sums of each stage's last block; the stem
        entry is always post-ReLU. Returns `(final_map, intermediates)`, or only the list when
        `intermediates_only` (then computation stops after the last requested position).
        """
        take = positions_to_take(indices, 1 + len(self.stages))
        intermediates: list[torch.Tensor] = []

        x = self.forward_stem(x)
        if 0 in take:
            intermediates.append(x)
        last_needed = max(take) if intermediates_only else len(self.stages)
        for position, stage in enumerate(self.stages[:last_needed], start=1):
            if preact and position in take:
                *leading_blocks, last_block = stage
                for block in leading_blocks:
                    x = block(x)
                stage_preact = last_block.residual_sum(x)
                intermediates.append(stage_preact)
                x = F.relu(stage_preact)
            else:
                x = stage(x)
                if position in take:
                    intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_intermediates_preact(self, x: torch.Tensor):
        """(final map, stages with pre-ReLU stage entries, post-ReLU stages): the feature API's
        `preact_stages` kind. The stem entry is post-ReLU in both lists."""
        final_map, preact = self.forward_intermediates(x, preact=True)
        return final_map, preact, [preact[0], *(F.relu(stage) for stage in preact[1:])]


def _build(
    name: str, depth: int, widths: Sequence[int], num_classes: int, in_chans: int, extra_kwargs: dict
) -> CifarResNet:
    if extra_kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments: {sorted(extra_kwargs)}")
    return CifarResNet(depth, widths, num_classes=num_classes, in_chans=in_chans)


@register_model("resnet8")
def resnet8(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet8", 8, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet14")
def resnet14(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet14", 14, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet20")
def resnet20(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet20", 20, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet32")
def resnet32(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet32", 32, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet44")
def resnet44(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet44", 44, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet56")
def resnet56(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet56", 56, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet110")
def resnet110(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet110", 110, NARROW_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet8x4")
def resnet8x4(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet8x4", 8, WIDE_WIDTHS, num_classes, in_chans, kwargs)


@register_model("resnet32x4")
def resnet32x4(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("resnet32x4", 32, WIDE_WIDTHS, num_classes, in_chans, kwargs)
