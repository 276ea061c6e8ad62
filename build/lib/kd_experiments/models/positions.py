"""What the zoo models share: which feature positions `forward_intermediates(indices=...)` returns
(timm's convention), the global-pool + linear head, and mdistiller's weight initialisation."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def positions_to_take(indices: int | Sequence[int] | None, num_positions: int) -> set[int]:
    """None: every position; an int n: the last n; a sequence: those positions (negatives allowed)."""
    if indices is None:
        return set(range(num_positions))
    if isinstance(indices, int):
        if not 0 < indices <= num_positions:
            raise ValueError(f"indices={indices} must be between 1 and {num_positions}")
        return set(range(num_positions - indices, num_positions))
    take = set()
    for index in indices:
        if not -num_positions <= index < num_positions:
            raise ValueError(f"index {index} is out of range for {num_positions} feature positions")
        take.add(index % num_positions)
    if not take:
        raise ValueError("indices must name at least one feature position")
    return take


class GlobalPoolHead:
    """The head every CNN of the zoo shares: global average pool + flatten, then the linear classifier
    named `classifier_attribute`; `forward` = head(features). mdistiller's fixed-window pools (e.g.
    avg_pool2d(x, 8)) are the same as a global pool at 32x32."""

    classifier_attribute = "fc"

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_attribute)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`pre_logits` returns the pooled embedding instead of the logits."""
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return embedding if pre_logits else self.get_classifier()(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_like_mdistiller(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False):
    """mdistiller's CIFAR zoo init, in module order: convs Kaiming-normal (fan_out, ReLU gain, i.e.
    N(0, 2 / (k * k * out_channels))) with zero bias where they have one; BN weight 1, bias 0. Linear layers:
    N(0, `linear_std`) weights and zero bias when `linear_std` is given, only a zero bias with
    `zero_linear_bias`, otherwise PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and (linear_std is not None or zero_linear_bias):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
