"""CIFAR ShuffleNet V1 (groups 3) and V2 (1x) of the CRD/mdistiller lineage, registered as `ShuffleV1` and
`ShuffleV2`.

Parameter names and shapes match the published mdistiller CIFAR-100 checkpoints, so those state dicts load
with `strict=True`. Both use a 1x1 stem conv to 24 channels with no down-sampling, then three stages that
each halve the resolution (16, 8, 4 px on a 32x32 input).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.models.cifar_resnetv2 import CifarStagedNet
from kd_experiments.models.registry import register_model

STEM_WIDTH = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups: (B, g*c, H, W) -> group-major to channel-major."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


# --- ShuffleNet V1 -------------------------------------------------------------------------------------


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 reduce + BN + ReLU, channel shuffle, 3x3 depthwise (carrying the stride) + BN, grouped 1x1
    expand + BN; then the shortcut is added (stride 1) or a 3x3 stride-2 average pool of the input is
    concatenated (stride 2), followed by ReLU.

    `branch_channels` is the width of the conv branch (for stride 2, the block output minus the input
    width); the bottleneck is a quarter of it. `first_group_conv` False makes the first 1x1 conv ungrouped
    (the block that reads the 24-channel stem).
    """

    def __init__(
        self, in_channels: int, branch_channels: int, stride: int, groups: int, first_group_conv: bool = True
    ) -> None:
        super().__init__()
        mid_channels = branch_channels // 4
        self.stride = stride
        self.shuffle_groups = groups if first_group_conv else 1
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=stride, padding=1, groups=mid_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """The block output before its ReLU (mdistiller's pre-activation feature)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1)
        return out + x

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.preact(x)
        return F.relu(preact), preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.preact(x), inplace=True)


class CifarShuffleNetV1(CifarStagedNet):
    """ShuffleNet V1: 1x1 stem (24 ch, 32x32), three stages whose first block has stride 2, global average
    pool of the last stage, `linear` classifier.

    Features: f0 = stem (post-ReLU), f1..f3 = post-ReLU stage outputs (240x16^2, 480x8^2, 960x4^2); the
    final map is f3 and the pooled embedding is 960-dim. Pre-activation features (mdistiller's
    `preact_feats`) are the last block's output before its ReLU: branch + identity, since each stage's last
    block has stride 1. relu(preact) == post for every stage.
    """

    def __init__(
        self,
        stage_widths: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = stage_widths[-1]
        self.stage_channels = [STEM_WIDTH, *stage_widths]

        self.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        in_channels = STEM_WIDTH
        for index, (width, count) in enumerate(zip(stage_widths, num_blocks, strict=True), start=1):
            # The stride-2 block concatenates its pooled input, so its branch only adds the missing channels.
            blocks = [ShuffleV1Block(in_channels, width - in_channels, 2, groups, first_group_conv=index > 1)]
            blocks += [ShuffleV1Block(width, width, 1, groups) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.linear = nn.Linear(self.num_features, num_classes)
        # mdistiller applies no custom initialisation to the ShuffleNets: PyTorch's defaults are kept.

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)), inplace=True)

    def get_classifier(self) -> nn.Module:
        return self.linear


# --- ShuffleNet V2 -------------------------------------------------------------------------------------


class ShuffleV2Block(nn.Module):
    """Stride-1 unit: split the channels in half; the second half goes through 1x1 + BN + ReLU, 3x3 depthwise
    + BN, 1x1 + BN + ReLU; the halves are concatenated (untouched half first) and shuffled with 2 groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, preact) where preact, as in mdistiller, is the concatenation of the untouched half and the
        branch before its last ReLU, taken before the channel shuffle: output == shuffle(relu(preact))."""
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)), inplace=True)
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        out = channel_shuffle(torch.cat([kept, F.relu(branch)], dim=1), 2)
        return out, torch.cat([kept, branch], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)), inplace=True)
        branch = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(branch)))), inplace=True)
        return channel_shuffle(torch.cat([kept, branch], dim=1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: both branches read the whole input. Left: 3x3 depthwise stride 2 + BN, 1x1 + BN + ReLU.
    Right: 1x1 + BN + ReLU, 3x3 depthwise stride 2 + BN, 1x1 + BN + ReLU. Concatenated, shuffled (2 groups).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))), inplace=True)
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class CifarShuffleNetV2(CifarStagedNet):
    """ShuffleNet V2 (1x): 1x1 stem (24 ch, 32x32), three stages (a down-sampling unit then stride-1 units),
    then a 1x1 conv to 1024 channels + BN + ReLU, global average pool and a `linear` classifier.

    Features: f0 = stem (post-ReLU), f1..f3 = stage outputs (116x16^2, 232x8^2, 464x4^2). The final map is the
    1024-channel `conv2` output, so the pooled embedding (1024) is wider than the last stage (464).

    Pre-activation features follow mdistiller's `preact_feats`: for the last unit of a stage, the untouched
    half concatenated with the branch before its final ReLU, in the order *before* the channel shuffle. So
    relu(preact) != post; instead post == channel_shuffle(relu(preact), 2) (the untouched half is already
    non-negative).
    """

    def __init__(
        self,
        stage_widths: Sequence[int] = (116, 232, 464),
        num_units: Sequence[int] = (3, 7, 3),
        last_channel: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = last_channel
        self.stage_channels = [STEM_WIDTH, *stage_widths]

        self.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        in_channels = STEM_WIDTH
        for index, (width, count) in enumerate(zip(stage_widths, num_units, strict=True), start=1):
            units = [ShuffleV2DownBlock(in_channels, width), *(ShuffleV2Block(width) for _ in range(count))]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_channels = width
        self.conv2 = nn.Conv2d(in_channels, last_channel, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channel)
        self.linear = nn.Linear(last_channel, num_classes)
        # mdistiller applies no custom initialisation to the ShuffleNets: PyTorch's defaults are kept.

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)), inplace=True)

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)), inplace=True)

    def get_classifier(self) -> nn.Module:
        return self.linear


def _reject_extra(name: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments: {sorted(kwargs)}")


@register_model("ShuffleV1")
def shufflev1(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    _reject_extra("ShuffleV1", kwargs)
    return CifarShuffleNetV1(num_classes=num_classes, in_chans=in_chans)


@register_model("ShuffleV2")
def shufflev2(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    _reject_extra("ShuffleV2", kwargs)
    return CifarShuffleNetV2(num_classes=num_classes, in_chans=in_chans)
