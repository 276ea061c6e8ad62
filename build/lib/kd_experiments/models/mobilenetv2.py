"""CIFAR MobileNetV2 of the CRD/mdistiller lineage, registered as `MobileNetV2` (mdistiller's `mobile_half`:
width multiplier 0.5, expansion t=6).

Parameter names and shapes match the published mdistiller CIFAR-100 checkpoints, so those state dicts load
with `strict=True`. Layout on a 32x32 input: a stride-2 3x3 stem (16 ch at 16x16), seven groups of inverted
residual blocks (`blocks.0` .. `blocks.6`), a 1x1 conv to 1280 channels (`conv2`), global average pool and a
linear classifier (`classifier.0`).
"""

import itertools

import torch
from torch import nn

from kd_experiments.models.cifar_resnetv2 import CifarStagedNet
from kd_experiments.models.positions import init_like_mdistiller
from kd_experiments.models.registry import register_model

# (channels before the width multiplier, blocks, first stride) of the seven groups; every group but the
# first expands by t (the first never expands).
INVERTED_RESIDUAL_GROUPS = (
    (16, 1, 1),
    (24, 2, 1),
    (32, 3, 2),
    (64, 4, 2),
    (96, 3, 1),
    (160, 3, 2),
    (320, 1, 1),
)
# mdistiller's `feats` f1..f4 are the outputs of groups 1, 2, 4 and 6, so stage k runs these groups.
STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))
STEM_WIDTH = 32
LAST_CHANNEL = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU, 3x3 depthwise (carrying the stride) + BN + ReLU, 1x1 linear projection + BN.

    The identity shortcut is added when stride is 1 and the width is unchanged. The output has no final
    ReLU (a linear bottleneck). `conv` indices 0..7 match the checkpoints' parameter names.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No ReLU follows the block, so its output is already the pre-activation feature.
        out = self.forward(x)
        return out, out


class CifarMobileNetV2(CifarStagedNet):
    """MobileNetV2 for 32x32 inputs (stride-2 stem, total stride 16).

    Features: f0 = stem output (post-ReLU, 16x16), f1..f4 = the outputs of inverted-residual groups 1, 2, 4
    and 6 (12x16^2, 16x8^2, 48x4^2, 160x2^2 at width 0.5). The final map is the 1280-channel `conv2` output
    (post-ReLU, 2x2), so the pooled embedding (1280) is much wider than the last stage (160).

    Pre-activation features: mdistiller's MobileNetV2 defines no `preact_feats`. The stage outputs are linear
    bottlenecks with no ReLU after them, so they are already pre-activation maps (they take negative values),
    and the preact list equals the ordinary one (relu(preact) != post here).
    """

    def __init__(
        self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        stem_width = int(STEM_WIDTH * width_mult)
        last_channel = int(LAST_CHANNEL * width_mult) if width_mult > 1.0 else LAST_CHANNEL
        self.num_classes = num_classes
        self.num_features = last_channel

        self.conv1 = _conv_bn_relu(in_chans, stem_width, 3, stride=2)
        self.blocks = nn.ModuleList()
        in_channels = stem_width
        group_widths = []
        for index, (base_width, count, stride) in enumerate(INVERTED_RESIDUAL_GROUPS):
            out_channels = int(base_width * width_mult)
            group_expansion = 1 if index == 0 else expansion
            group = []
            for block_stride in [stride] + [1] * (count - 1):
                group.append(InvertedResidual(in_channels, out_channels, block_stride, group_expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*group))
            group_widths.append(out_channels)
        self.conv2 = _conv_bn_relu(in_channels, last_channel, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        self.stage_channels = [stem_width, *(group_widths[groups[-1]] for groups in STAGE_GROUPS)]
        init_like_mdistiller(self, linear_std=0.01)

    @property
    def stages(self) -> list[nn.Sequential]:
        # Flat views over the registered `blocks` (they add no parameters and no state-dict entries).
        return [
            nn.Sequential(*itertools.chain.from_iterable(self.blocks[index] for index in groups))
            for groups in STAGE_GROUPS
        ]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier


@register_model("MobileNetV2")
def mobilenetv2_half(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    if kwargs:
        raise TypeError(f"MobileNetV2() got unexpected keyword arguments: {sorted(kwargs)}")
    return CifarMobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes, in_chans=in_chans)
