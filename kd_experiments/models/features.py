"""One way to read logits, the pooled embedding and stage feature maps from any model.

Zoo models implement timm's feature API (`forward_features`, `forward_head(pre_logits=)`,
`get_classifier`, `forward_intermediates`), so the same code serves both. A method declares the features
it needs; asking only for logits costs exactly one plain forward.
"""

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_KINDS = frozenset({"logits", "embedding", "stages"})


@dataclass
class NetworkOutput:
    """What one network produced for one batch.

    logits: B x K. embedding: B x D, the pooled penultimate vector fed to the classifier.
    stages: the stem and each stage's output map (B x C x H x W), shallow to deep.
    """

    logits: torch.Tensor
    embedding: torch.Tensor | None = None
    stages: list[torch.Tensor] | None = None


def extract_features(model: nn.Module, images: torch.Tensor, needs: frozenset[str]) -> NetworkOutput:
    """Run `model` once and return the features in `needs` (a subset of FEATURE_KINDS)."""
    if needs <= {"logits"}:
        return NetworkOutput(logits=model(images))
    stages = None
    if "stages" in needs:
        final_map, stages = model.forward_intermediates(images)
    else:
        final_map = model.forward_features(images)
    embedding = model.forward_head(final_map, pre_logits=True)
    logits = model.get_classifier()(embedding)
    return NetworkOutput(logits=logits, embedding=embedding, stages=stages)
