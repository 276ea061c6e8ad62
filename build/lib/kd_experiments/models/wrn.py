"""Wide ResNets of the CRD/mdistiller CIFAR zoo (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

WRN-d-w: a 3x3 conv stem (16 channels, no BN or ReLU of its own), three stages (`block1..3`) of
(d - 4) / 6 pre-activation basic blocks of widths 16w, 32w, 64w (strides 1, 2, 2), then a final BN + ReLU,
global average pool and a linear classifier. Parameter names and shapes match the published mdistiller
CIFAR-100 checkpoints (`block1.layer.0.convShortcut.weight`, `bn1`, `fc`, ...), so those state dicts load with
`strict=True`.

Feature positions follow mdistiller's `feats` exactly. Because the blocks are pre-activation, a stage's
output is a raw residual sum that no BN or ReLU has touched yet:
  - position 0 (`f0`): the stem conv output;
  - positions 1..3 (`f1..f3`): the raw residual sums at the end of `block1..3`.
mdistiller's `preact_feats` are `[f0, BN(f1), BN(f2), BN(f3)]`, where each BN is the one the network applies
next: the first BN of the next stage's first block for f1 and f2, the final `bn1` for f3. They are the maps
just before a ReLU, but that ReLU's output is *not* a `feats` entry, so unlike the CIFAR ResNets
`relu(preact) != stages` here. The final feature map (what the head pools) is `relu(bn1(f3))`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.models.positions import GlobalPoolHead, init_like_mdistiller, positions_to_take
from kd_experiments.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    When the width changes, the 1x1 `convShortcut` reads the block's BN-ReLU'd input (as in mdistiller);
    otherwise the shortcut is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        # The checkpoint name is camelCase; the module exists only where the shape changes.
        self.convShortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normed(x, self.bn1(x))

    def forward_normed(self, x: torch.Tensor, x_normed: torch.Tensor) -> torch.Tensor:
        """The block's output given `x_normed = self.bn1(x)`, which a caller may already hold as a feature
        (it is the previous stage's pre-activation map); `x_normed` is not modified."""
        activated = F.relu(x_normed)
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """WideBasicBlocks under `.layer`, as in mdistiller's `NetworkBlock` (the checkpoint names need it)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_channels, out_channels, stride)]
        blocks += [WideBasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, x_normed: torch.Tensor | None = None) -> torch.Tensor:
        """`x_normed`, when given, is `self.layer[0].bn1(x)` computed by the caller."""
        first, *rest = self.layer
        x = first(x) if x_normed is None else first.forward_normed(x, x_normed)
        for block in rest:
            x = block(x)
        return x


class WideResNet(GlobalPoolHead, nn.Module):
    """WRN-depth-widen for 32x32 inputs: stem conv, three pre-activation stages, final BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.num_classes = num_classes
        self.num_features = widths[3]
        self.stage_channels = widths

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.block2 = WideStage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.block3 = WideStage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(self.num_features, num_classes)
        init_like_mdistiller(self, zero_linear_bias=True)

    @property
    def stages(self) -> list[WideStage]:
        return [self.block1, self.block2, self.block3]

    @property
    def preact_norms(self) -> list[nn.BatchNorm2d]:
        """The BN applied next to each stage output (mdistiller's `get_bn_before_relu`)."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def _run(self, x: torch.Tensor, num_stages: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stem and the first `num_stages` stages: (`feats`, `preact_feats`) in mdistiller's sense.

        Each BN'd stage output is computed once and handed to the next stage, which would compute exactly
        that as its first step (so BN running statistics are updated once per forward).
        """
        x = self.conv1(x)
        feats, preacts = [x], [x]
        x_normed = None
        for stage, norm in zip(self.stages[:num_stages], self.preact_norms, strict=False):
            x = stage(x, x_normed)
            x_normed = norm(x)
            feats.append(x)
            preacts.append(x_normed)
        return feats, preacts

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map: ReLU(bn1(block3 output)), B x num_features x H/4 x W/4."""
        _, preacts = self._run(x, len(self.stages))
        return F.relu(preacts[-1])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
        preact: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Features at positions 0 (stem conv) and 1..3 (raw stage sums), mdistiller's `feats`, in order.

        `indices`: None for all four, an int n for the last n, or a list of positions (negatives allowed).
        With `preact`, stage entries are mdistiller's `preact_feats` (each stage output after the BN applied
        next, before its ReLU); the stem entry is the same in both. Returns `(final_map, intermediates)`, or
        only the list when `intermediates_only` (then computation stops after the last requested stage).
        """
        take = positions_to_take(indices, 1 + len(self.stages))
        num_stages = max(take) if intermediates_only else len(self.stages)
        feats, preacts = self._run(x, num_stages)
        chosen = preacts if preact else feats
        intermediates = [chosen[position] for position in sorted(take)]
        if intermediates_only:
            return intermediates
        return F.relu(preacts[-1]), intermediates

    def forward_intermediates_preact(self, x: torch.Tensor):
        """(final map, mdistiller's `preact_feats`, mdistiller's `feats`): the feature API's `preact_stages`.

        For this pre-activation network `relu(preact[i]) != feats[i]` for i >= 1: the preact entry is the
        stage output after the next BN, the feats entry is the raw residual sum (see the module docstring).
        """
        feats, preacts = self._run(x, len(self.stages))
        return F.relu(preacts[-1]), preacts, feats


def _build(
    name: str, depth: int, widen_factor: int, num_classes: int, in_chans: int, extra_kwargs: dict
) -> WideResNet:
    if extra_kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments: {sorted(extra_kwargs)}")
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_chans=in_chans)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("wrn_16_1", 16, 1, num_classes, in_chans, kwargs)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("wrn_16_2", 16, 2, num_classes, in_chans, kwargs)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("wrn_40_1", 40, 1, num_classes, in_chans, kwargs)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    return _build("wrn_40_2", 40, 2, num_classes, in_chans, kwargs)
