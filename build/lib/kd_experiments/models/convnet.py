"""Small plain ConvNets: the default teacher/student pair on the embedded digits data.

Same shape as the CIFAR ResNets (a stem and three stages, the 2nd and 3rd halving the resolution, global
pooling, one linear classifier), so every feature-based method runs on the default pair.
"""

import torch
from torch import nn

from kd_experiments.models.positions import GlobalPoolHead
from kd_experiments.models.registry import register_model


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvNet(GlobalPoolHead, nn.Module):
    """stem -> stage1 (stride 1) -> stage2 (stride 2) -> stage3 (stride 2) -> avg pool -> fc."""

    def __init__(self, widths: tuple[int, int, int, int], num_classes: int, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stage_channels = list(widths)
        self.num_features = widths[-1]
        self.stem = _conv_bn_relu(in_chans, widths[0], stride=1)
        self.stages = nn.ModuleList(
            _conv_bn_relu(widths[i], widths[i + 1], stride=1 if i == 0 else 2) for i in range(3)
        )
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_intermediates(
        self, x: torch.Tensor, indices=None, intermediates_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        maps = [self.stem(x)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        if indices is None:
            selected = maps
        elif isinstance(indices, int):
            selected = maps[-indices:]
        else:
            selected = [maps[i] for i in indices]
        return selected if intermediates_only else (maps[-1], selected)

    def forward_intermediates_preact(self, x: torch.Tensor):
        """(final map, stages with each stage's map before its ReLU, post-ReLU stages); stem post-ReLU."""
        stem = self.stem(x)
        preact, post = [stem], [stem]
        for stage in self.stages:
            preact.append(stage[:-1](post[-1]))
            post.append(torch.relu(preact[-1]))  # not the stage's in-place ReLU: it would overwrite
        return post[-1], preact, post

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


@register_model("convnet_wide")
def convnet_wide(num_classes: int, in_chans: int = 3, widths=(32, 64, 128, 256)) -> ConvNet:
    """The default digits teacher (~0.4M parameters)."""
    return ConvNet(tuple(widths), num_classes, in_chans)


@register_model("convnet_narrow")
def convnet_narrow(num_classes: int, in_chans: int = 3, widths=(4, 8, 8, 16)) -> ConvNet:
    """The default digits student (a few thousand parameters)."""
    return ConvNet(tuple(widths), num_classes, in_chans)
