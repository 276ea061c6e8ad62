"""torchvision Faster R-CNN detectors, built by name with the sizes a run chooses.

`fasterrcnn_<backbone>`, where the backbone is one of BACKBONES:
  - `resnet18_fpn` ... `resnet101_fpn`: torchvision's ResNet-FPN (stages 1-4 + a max-pooled level), the
    LSHFM ResNet-101 -> ResNet-50 pair (DoctorKey/LSHFM.detection `src/model/faster_rcnn_KD.py`);
  - `mobilenet_v3_large_fpn`, `mobilenet_v3_small_fpn`: an FPN on the last three stages;
  - `vgg11`, `vgg16`: one stride-16 map (conv5's last ReLU), LSHFM's plain VGG detector;
  - `vgg11_fpn`, `vgg16_fpn`: an FPN on stages 2-5, each read after its max-pool (strides 4 ... 32, and a
    max-pooled 64: the ResNet-FPN's), LSHFM's VGG-FPN detector (`src/model/vgg_fpn.py`; its README's
    VGG16 -> VGG11 row, 79.0 / 75.1 mAP), with its state-dict layout (`backbone.body.layer<k>.0.<i>`).

The box head is torchvision's TwoMLPHead over 7 x 7 RoIAlign features, and its output (`roi_embedding`,
`representation_size` wide) is the 1024-d "box feature" LSHFM mimics. Widths (`fpn_channels`,
`representation_size`), anchors and sampling sizes are arguments, so the same code builds a paper's
detector and a small one that trains on CPU (`experiment=detection_shapes`).
"""

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from kd_experiments.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MOBILENETS = ("mobilenet_v3_large", "mobilenet_v3_small")
VGGS = ("vgg11", "vgg13", "vgg16", "vgg19")
BACKBONES = (
    *(f"{name}_fpn" for name in RESNETS),
    *(f"{name}_fpn" for name in MOBILENETS),
    *VGGS,
    *(f"{name}_fpn" for name in VGGS),
)
ARCH_PREFIX = "fasterrcnn_"
NORMS = ("batch", "frozen")
ROI_SIZE = 7  # RoIAlign output side (torchvision's and LSHFM's)


def is_detector_arch(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(ARCH_PREFIX)


def create_detector(
    arch: str,
    num_classes: int,
    min_size: int | list[int] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    norm: str = "batch",
    backbone_weights: str | None = None,
    trainable_layers: int | None = None,
    anchor_sizes: list[int] | None = None,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
) -> FasterRCNN:
    """A Faster R-CNN for `num_classes` foreground classes (the predictor adds the background class 0).

    `norm`: `batch` (BatchNorm2d, trains from scratch) or `frozen` (FrozenBatchNorm2d, torchvision's choice
    for an ImageNet-initialised backbone). `backbone_weights`: null (random), a torchvision weights name of
    the backbone (`IMAGENET1K_V1`, downloaded by torchvision) or a state_dict file of the classification
    network. `trainable_layers`: ResNet or VGG-FPN stages (0-5), or plain-VGG / MobileNet layers, left
    trainable from the top; null trains all. `anchor_sizes`: one size per feature level (FPN: 5 levels;
    VGG: the sizes of its one level), null for torchvision's 32 ... 512. `min_size` may be a list: training
    picks one per image (multi-scale), evaluation uses the last (torchvision's GeneralizedRCNNTransform)."""
    backbone_name = _backbone_name(arch)
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    for key, value in (("num_classes", num_classes), ("fpn_channels", fpn_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    backbone = _backbone(backbone_name, fpn_channels, norm_layer, backbone_weights, trainable_layers)
    levels = _level_names(backbone)
    anchors = _anchor_generator(arch, levels, anchor_sizes, aspect_ratios)
    pooled_levels = [name for name in levels if name != "pool"]  # torchvision pools the FPN's maps only
    roi_pool = MultiScaleRoIAlign(pooled_levels, ROI_SIZE, sampling_ratio=2)
    box_head = TwoMLPHead(backbone.out_channels * ROI_SIZE**2, representation_size)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(min_size) if isinstance(min_size, list | tuple) else min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
    )


def _anchor_generator(
    arch: str, levels: list[str], anchor_sizes: list[int] | None, aspect_ratios: tuple[float, ...]
) -> AnchorGenerator:
    """One anchor size per feature level (torchvision's 32 ... 512 when none are given); a one-map
    detector (plain VGG) gets every size on its map, as LSHFM's VGG detector."""
    sizes = anchor_sizes if anchor_sizes is not None else [32, 64, 128, 256, 512]
    if len(levels) == 1:
        return AnchorGenerator((tuple(sizes),), (tuple(aspect_ratios),))
    if len(sizes) != len(levels):
        raise UserError(
            f"anchor_sizes gives {len(sizes)} sizes but {arch} has {len(levels)} feature levels; "
            f"give one size per level, e.g. {[2 ** (5 + i) for i in range(len(levels))]}"
        )
    return AnchorGenerator(tuple((size,) for size in sizes), (tuple(aspect_ratios),) * len(sizes))


def _backbone_name(arch: str) -> str:
    name = arch[len(ARCH_PREFIX) :] if is_detector_arch(arch) else None
    if name not in BACKBONES:
        known = ", ".join(ARCH_PREFIX + backbone for backbone in BACKBONES)
        raise UserError(f"unknown detector {arch!r}; known: {known}")
    return name


def _level_names(backbone: nn.Module) -> list[str]:
    """The names of the maps the backbone returns, from a tiny forward (cheap: 64 x 64, once)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, 64, 64))
    backbone.train(was_training)
    return list(maps) if isinstance(maps, dict) else ["0"]


def _classification_network(name: str, norm_layer, weights: str | None) -> nn.Module:
    """torchvision's classification network `name` (the backbone's source), with its weights: none, a
    torchvision weights name, or a state_dict file."""
    kwargs = {} if name.startswith("vgg") else {"norm_layer": norm_layer}
    file = (
        Path(weights).expanduser()
        if weights and ("/" in weights or weights.endswith((".pt", ".pth")))
        else None
    )
    builder = getattr(torchvision.models, name)
    try:
        network = builder(weights=None if file is not None else weights, **kwargs)
    except (ValueError, KeyError) as error:
        raise UserError(
            f"backbone_weights={weights!r} is not a torchvision weights name of {name}: {error}"
        ) from None
    if file is not None:
        if not file.is_file():
            raise UserError(f"backbone_weights file {file} does not exist; give a state_dict file of {name}")
        state = torch.load(file, map_location="cpu", weights_only=True)
        missing, unexpected = network.load_state_dict(state, strict=False)
        if unexpected or [key for key in missing if not key.endswith("num_batches_tracked")]:
            raise UserError(
                f"backbone_weights {file} does not fit {name}: missing {list(missing)[:3]}, unexpected "
                f"{list(unexpected)[:3]}"
            )
    return network


def _freeze_all_but_last(layers: list[nn.Module], trainable: int | None, what: str) -> None:
    if trainable is None:
        return
    if not 0 <= trainable <= len(layers):
        raise UserError(f"trainable_layers must be from 0 to {len(layers)} for {what}, got {trainable}")
    for layer in layers[: len(layers) - trainable]:
        layer.requires_grad_(False)


def _backbone(
    name: str, fpn_channels: int, norm_layer, weights: str | None, trainable: int | None
) -> nn.Module:
    base = name.removesuffix("_fpn")
    network = _classification_network(base, norm_layer, weights)
    if base in RESNETS:
        stages = [
            nn.ModuleList([network.conv1, network.bn1]),
            *(getattr(network, f"layer{i}") for i in range(1, 5)),
        ]
        _freeze_all_but_last(stages, trainable, name)
        width = network.layer4[-1].conv1.in_channels if hasattr(network.layer4[-1], "conv3") else 512
        in_channels = [width // 8, width // 4, width // 2, width]
        return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        return BackboneWithFPN(network, return_layers, in_channels, fpn_channels, LastLevelMaxPool())
    features = network.features
    if base in VGGS and name.endswith("_fpn"):
        return _vgg_fpn(features, fpn_channels, trainable, name)
    if base in MOBILENETS:
        # A block flagged `_is_cn` downsamples; the block before it ends a stage.
        ends = [i - 1 for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [
            len(features) - 1
        ]
        picked = ends[-3:]
    else:  # plain VGG: conv5's last ReLU (the one before the last max-pool), 512 channels, stride 16
        picked = [max(i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)) - 1]
    features = features[: picked[-1] + 1]
    _freeze_all_but_last(list(features), trainable, name)
    channels = [_out_channels(features[: index + 1]) for index in picked]
    if base in VGGS:
        features.out_channels = channels[-1]
        return features
    return_layers = {str(index): str(level) for level, index in enumerate(picked)}
    return BackboneWithFPN(features, return_layers, channels, fpn_channels, LastLevelMaxPool())


def _vgg_fpn(features: nn.Sequential, fpn_channels: int, trainable: int | None, name: str) -> BackboneWithFPN:
    """LSHFM's VGG-FPN backbone (DoctorKey/LSHFM.detection `src/model/vgg_fpn.py`): VGG's five stages, each
    ending with its max-pool, as modules `layer1` ... `layer5`, the FPN on stages 2-5 and a max-pooled level
    above. Each stage wraps its slice of `features` in one more Sequential, as LSHFM's does, so that the
    backbone's state-dict keys are LSHFM's (`backbone.body.layer2.0.3.weight`: VGG-11's second conv,
    features[3]), those of its released VGG16-FPN teacher. `trainable` counts stages from the top (LSHFM:
    3)."""
    ends = [i + 1 for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    stages = [nn.Sequential(features[start:end]) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    _freeze_all_but_last(stages, trainable, name)
    body = nn.Sequential(OrderedDict((f"layer{k}", stage) for k, stage in enumerate(stages, start=1)))
    channels = [_out_channels(body[:k]) for k in range(2, len(stages) + 1)]
    return_layers = {f"layer{k}": str(level) for level, k in enumerate(range(2, len(stages) + 1))}
    return BackboneWithFPN(body, return_layers, channels, fpn_channels, LastLevelMaxPool())


def _out_channels(layers: nn.Sequential) -> int:
    with torch.no_grad():
        was_training = layers.training
        layers.eval()
        channels = layers(torch.zeros(1, 3, 64, 64)).shape[1]
        layers.train(was_training)
    return channels
