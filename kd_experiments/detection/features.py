"""What a detection method reads from a Faster R-CNN, taken in one pass through torchvision's own parts.

Feature kinds (a method's `student_features` / `teacher_features`):
  - `fpn`: the backbone's maps, shallow to deep (an FPN's levels with its max-pooled one; a plain VGG's one
    map), B x C x H x W each;
  - `roi_pooled`: RoIAlign features of the sampled RoIs, R x C x 7 x 7;
  - `roi_embedding`: the box head's output for them, R x D (LSHFM's mimicked "box feature", D = 1024 in
    its detectors);
  - `roi_logits`: the box predictor's class scores, R x (K + 1), background first.

The student runs as torchvision's GeneralizedRCNN does in training (transform, backbone, RPN, RoI sampling
against the ground truth, box head, Fast R-CNN loss) with its losses and the RoIs it sampled. The teacher
then sees the very same inputs: the student's resized batch and the student's sampled RoIs, so RoI features
correspond one to one (DoctorKey/LSHFM.detection `src/model/faster_rcnn_KD.py`: `t_proposals =
s_proposals`; its teacher RPN output is discarded, so the teacher's RPN is not run here at all).
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

DETECTION_FEATURE_KINDS = frozenset({"fpn", "roi_pooled", "roi_embedding", "roi_logits"})
ROI_KINDS = frozenset({"roi_pooled", "roi_embedding", "roi_logits"})


@dataclass
class DetectorOutput:
    """One detector's outputs for one batch; kinds nobody asked for stay None. `losses` (the student's
    own: RPN objectness and box regression, RoI classifier and box regression) and `roi_labels` (each
    sampled RoI's matched class, 0 = background) are the student's only."""

    fpn: list[torch.Tensor] | None = None
    roi_pooled: torch.Tensor | None = None
    roi_embedding: torch.Tensor | None = None
    roi_logits: torch.Tensor | None = None
    roi_labels: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StudentPass:
    """The student's pass, and what the teacher must see to match it: the resized, normalised batch and
    the sampled RoIs per image (in the resized images' coordinates)."""

    output: DetectorOutput
    images: ImageList
    rois: list[torch.Tensor]


def _maps(backbone: nn.Module, tensors: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    maps = backbone(tensors)
    return OrderedDict([("0", maps)]) if isinstance(maps, torch.Tensor) else maps


def student_pass(
    model: FasterRCNN, images: list[torch.Tensor], targets: list[dict], needs: frozenset[str]
) -> StudentPass:
    """The student's training forward with its four detection losses and the features in `needs`."""
    batch, targets = model.transform(images, targets)
    maps = _maps(model.backbone, batch.tensors)
    proposals, rpn_losses = model.rpn(batch, maps, targets)
    heads = model.roi_heads
    rois, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    pooled = heads.box_roi_pool(maps, rois, batch.image_sizes)
    embedding = heads.box_head(pooled)
    logits, box_regression = heads.box_predictor(embedding)
    loss_classifier, loss_box_reg = fastrcnn_loss(logits, box_regression, labels, regression_targets)
    output = DetectorOutput(
        fpn=list(maps.values()) if "fpn" in needs else None,
        roi_pooled=pooled if "roi_pooled" in needs else None,
        roi_embedding=embedding if "roi_embedding" in needs else None,
        roi_logits=logits if "roi_logits" in needs else None,
        roi_labels=torch.cat(labels),
        losses={**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg},
    )
    return StudentPass(output, batch, rois)


def teacher_pass(
    model: FasterRCNN, student: FasterRCNN, images: ImageList, rois: list[torch.Tensor], needs: frozenset[str]
) -> DetectorOutput:
    """The teacher's features for the student's batch and RoIs (no gradients: the caller's no_grad). A
    teacher normalising its input differently from the student gets the batch re-normalised exactly."""
    tensors = renormalize(images.tensors, student.transform, model.transform)
    maps = _maps(model.backbone, tensors)
    output = DetectorOutput(fpn=list(maps.values()) if "fpn" in needs else None)
    if needs & ROI_KINDS:
        heads = model.roi_heads
        pooled = heads.box_roi_pool(maps, rois, images.image_sizes)
        embedding = heads.box_head(pooled)
        output.roi_pooled = pooled if "roi_pooled" in needs else None
        output.roi_embedding = embedding if "roi_embedding" in needs else None
        if "roi_logits" in needs:
            output.roi_logits = heads.box_predictor(embedding)[0]
    return output


def renormalize(tensors: torch.Tensor, source, target) -> torch.Tensor:
    """`tensors` normalised by `source` (a GeneralizedRCNNTransform's image_mean / image_std) as `target`
    would have normalised the same images; unchanged when both normalise alike."""
    if list(source.image_mean) == list(target.image_mean) and list(source.image_std) == list(
        target.image_std
    ):
        return tensors

    def column(values):
        return torch.as_tensor(values, dtype=tensors.dtype, device=tensors.device)[:, None, None]

    raw = tensors * column(source.image_std) + column(source.image_mean)
    return (raw - column(target.image_mean)) / column(target.image_std)


def probe_pass(model: FasterRCNN, images: list[torch.Tensor], targets: list[dict], needs: frozenset[str]):
    """The student's training pass without touching its BatchNorm statistics (eval-mode norms, training
    mode heads so that RoIs are sampled): for sizing projectors and dry-running a method."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.train()
    for norm in norms:
        norm.eval()
    try:
        with torch.no_grad():
            return student_pass(model, images, targets, needs)
    finally:
        model.train(was_training)
