"""CIFAR VGG-BNs of the CRD/mdistiller zoo (vgg8, vgg11, vgg13, vgg16, vgg19: mdistiller's `_bn` variants).

Five blocks `block0..4` of 3x3 conv (with bias) + BN + ReLU layers, each block's last ReLU left out of the
block and applied by the network. Max-pools (`pool0..2`) sit between blocks 0-1, 1-2 and 2-3; as in
mdistiller, `pool3` between blocks 3 and 4 is applied only to 64-pixel inputs, so on 32x32 inputs blocks 3
and 4 both run at 4x4. The head is a global average pool and `classifier = Linear(512, num_classes)`.
Parameter names and shapes match the published mdistiller CIFAR-100 checkpoints (`block0.0.weight`,
`block0.1.running_mean`, ..., `classifier.weight`), so those state dicts load with `strict=True`.

Feature positions follow mdistiller's `feats`: position i is ReLU(block_i output), taken before the
following max-pool (on 32x32 inputs: 64x32², 128x16², 256x8², 512x4², 512x4²). `preact_feats` are the same
block outputs before that ReLU, except the stem entry (position 0), which stays post-ReLU as in mdistiller.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.models.positions import GlobalPoolHead, init_like_mdistiller, positions_to_take
from kd_experiments.models.registry import register_model

# Output widths of the conv layers in each of the five blocks.
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """conv3x3 + BN + ReLU per width, without the last ReLU (so Sequential indices match the checkpoints:
    conv at 0, BN at 1, ReLU at 2, conv at 3, ...)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(GlobalPoolHead, nn.Module):
    """VGG-BN for 32x32 (or 64x64) inputs: five blocks, three (four at 64 px) max-pools, global pool, fc."""

    classifier_attribute = "classifier"

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(config) != 5 or any(not widths for widths in config):
            raise ValueError(f"config must list five non-empty blocks of conv widths, got {config}")
        self.stage_channels = [widths[-1] for widths in config]
        self.num_classes = num_classes
        self.num_features = self.stage_channels[-1]

        in_channels = [in_chans] + self.stage_channels[:-1]
        self.block0 = make_block(in_channels[0], config[0])
        self.block1 = make_block(in_channels[1], config[1])
        self.block2 = make_block(in_channels[2], config[2])
        self.block3 = make_block(in_channels[3], config[3])
        self.block4 = make_block(in_channels[4], config[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_like_mdistiller(self, linear_std=0.01)

    @property
    def blocks(self) -> list[nn.Sequential]:
        return [self.block0, self.block1, self.block2, self.block3, self.block4]

    def _pool_before(self, position: int, input_height: int) -> nn.Module | None:
        """The max-pool that precedes block `position` (None for block 0, and for block 4 unless the input
        is 64 pixels high: mdistiller applies `pool3` only then)."""
        if position == 4:
            return self.pool3 if input_height == 64 else None
        return [None, self.pool0, self.pool1, self.pool2][position]

    def _run(self, x: torch.Tensor, num_positions: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first `num_positions` feature positions: (`feats`, `preact_feats`) in mdistiller's sense."""
        input_height = x.shape[2]
        feats: list[torch.Tensor] = []
        preacts: list[torch.Tensor] = []
        for position, block in enumerate(self.blocks[:num_positions]):
            pool = self._pool_before(position, input_height)
            if pool is not None:
                x = pool(x)
            preact = block(x)
            x = F.relu(preact)
            feats.append(x)
            preacts.append(x if position == 0 else preact)  # the stem entry stays post-ReLU
        return feats, preacts

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map: ReLU(block4 output), B x 512 x 4 x 4 for 32x32 inputs."""
        feats, _ = self._run(x, len(self.blocks))
        return feats[-1]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        preact: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Features at positions 0..4 (ReLU'd output of block0..4, before any pool), in network order.

        `indices`: None for all five, an int n for the last n, or a list of positions (negatives allowed).
        With `preact`, entries 1..4 are taken before the ReLU; the stem entry is always post-ReLU. Returns
        `(final_map, intermediates)`, or only the list when `intermediates_only` (then computation stops
        after the last requested position).
        """
        num_positions = len(self.blocks)
        take = positions_to_take(indices, num_positions)
        feats, preacts = self._run(x, max(take) + 1 if intermediates_only else num_positions)
        chosen = preacts if preact else feats
        intermediates = [chosen[position] for position in sorted(take)]
        if intermediates_only:
            return intermediates
        return feats[-1], intermediates

    def forward_intermediates_preact(self, x: torch.Tensor):
        """(final map, stages with pre-ReLU entries 1..4, post-ReLU stages): the feature API's
        `preact_stages` kind, mdistiller's `preact_feats` and `feats`. The stem entry is post-ReLU in both."""
        feats, preacts = self._run(x, len(self.blocks))
        return feats[-1], preacts, feats


def _build(name: str, num_classes: int, in_chans: int, extra_kwargs: dict) -> CifarVGG:
    if extra_kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments: {sorted(extra_kwargs)}")
    return CifarVGG(VGG_CONFIGS[name], num_classes=num_classes, in_chans=in_chans)


@register_model("vgg8")
def vgg8(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("vgg8", num_classes, in_chans, kwargs)


@register_model("vgg11")
def vgg11(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("vgg11", num_classes, in_chans, kwargs)


@register_model("vgg13")
def vgg13(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("vgg13", num_classes, in_chans, kwargs)


@register_model("vgg16")
def vgg16(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("vgg16", num_classes, in_chans, kwargs)


@register_model("vgg19")
def vgg19(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("vgg19", num_classes, in_chans, kwargs)
