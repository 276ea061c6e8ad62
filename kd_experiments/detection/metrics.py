"""How good a detector's boxes are, as three numbers in percent (the framework reports top-1 in percent too):

- `map`: COCO's AP averaged over IoU 0.50:0.05:0.95 (pycocotools' COCOeval, through torchmetrics);
- `map50`: COCO's AP at IoU 0.5 (101-point interpolated precision, at most 100 detections per image and
  class), from the same COCOeval run;
- `voc07_map50`: Pascal VOC2007's AP at IoU 0.5 (11-point interpolation, every detection), written here
  because torchmetrics has none.

Which number the literature's VOC tables are. LSHFM.detection (DoctorKey/LSHFM.detection, the detection code
of "Distilling knowledge by mimicking features", read at commit 3122677) has no VOC evaluator: its
`src/engine.py` `evaluate` (lines 62-99) converts the test set to a COCO ground truth
(`get_coco_api_from_dataset`, l. 71), scores it with torchvision's reference `CocoEvaluator(coco, ["bbox"])`
(l. 72) and prints `summarize()` (l. 97); nothing else is computed. Its README's VOC2007-test table (teacher
R101 83.6, VGG16 79.0, ...) is then COCOeval's "AP @ IoU=0.50" line (101-point, not VOC07's 11-point):
AP@[.5:.95] of such detectors on VOC is about 50, far below. That is our `map50`, with one difference: LSHFM's
`get_voc07`/`get_voc0712` in `src/dataset/voc_utils.py` build the test targets with
`ConvertToCocoAnno(ignore_difficult=True)`, which drops difficult objects from the ground truth, so a
detection of a difficult object is a false positive there, where here (and in the VOC devkit) it is ignored.
To reproduce LSHFM's protocol exactly, drop the difficult objects from the targets instead of flagging them.

Conventions:

- Boxes are float x1 y1 x2 y2 in pixels with exclusive x2 / y2 (torchvision's): width = x2 - x1, no +1, in
  the IoU of both parts (pycocotools computes IoU the same way). The VOC devkit's +1 belongs to its 1-based
  inclusive integer corners; a VOC box read as (xmin - 1, ymin - 1, xmax, ymax), as LSHFM's
  `ConvertToCocoAnno` reads it, has exactly the devkit's width and area here, so with detections in the
  same coordinates the IoU is the devkit's exactly.
- Difficult / crowd ground truths (target key `difficult`, or `iscrowd`) are not positives, and a detection
  matched to one is neither a true nor a false positive. COCO gets them as `iscrowd`. COCO's crowd rules
  differ from VOC's in two corner cases, so `map50` and `voc07_map50` can differ there: COCO measures a
  detection against a crowd box by intersection over the detection's own area (a small box inside a
  difficult one is ignored; VOC counts it as a false positive), and COCO prefers an unmatched regular box
  over a crowd box the detection overlaps more (VOC takes the box of largest IoU, and ignores the detection
  if that one is difficult).
- VOC07 matching is the devkit's: per class, detections by descending score (ties in input order: image,
  then position), each takes the ground truth of its class in its image with the largest IoU (first on
  ties); IoU >= 0.5 on a regular box not yet taken is a true positive, on a taken one a false positive (a
  duplicate), on a difficult one ignored; IoU < 0.5, or no ground truth of its class there, is a false
  positive. AP is the mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= that level
  (0 if never reached).
- IoU thresholds and recall levels are pycocotools' own (float64 `np.linspace`), not torchmetrics' float32
  defaults, under which an IoU of exactly 0.55 misses the 0.55 threshold that COCOeval counts.
- Averages run over the classes with at least one non-difficult ground truth (COCOeval and the devkit
  alike): the detections of any other class change nothing.

Empty cases: an image without ground truth is fine (its detections are false positives of their classes);
with ground truth but no detections every number is 0.0; with no non-difficult ground truth at all (or no
`update` yet) every number is 0.0 too, rather than NaN or COCO's -1, so that a best-checkpoint monitor keeps
working; there was nothing to find, so nothing found.

DDP: all states are flat 1-D tensors in the metric's dtype (float32 unless `set_dtype`) reduced by "cat", so
one all_gather per state syncs any number of images per rank, none included (ShardedEvalSampler's shards are
uneven). torchmetrics' MeanAveragePrecision keeps one tensor per image instead, one all_gather each, which
does not line up when ranks hold different numbers of images. The image boundaries travel as per-image
counts in the same order as the boxes, and both parts of `compute` read the synced states."""

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities.data import dim_zero_cat
from torchvision.ops import box_iou

from kd_experiments.errors import UserError

# pycocotools' Params.setDetParams builds these; torchmetrics' float32 linspace would shift the boundaries.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_LEVELS = np.linspace(0.0, 1.0, 101).tolist()
VOC_IOU_THRESHOLD = 0.5
# k / 10 rather than np.arange(0, 1.1, 0.1): the latter's 0.6000000000000001 is missed by a recall of 3 / 5.
VOC07_RECALL_LEVELS = [level / 10 for level in range(11)]

METRIC_NAMES = ("map", "map50", "voc07_map50")
_STATE_NAMES = (
    "pred_boxes",
    "pred_scores",
    "pred_labels",
    "preds_per_image",
    "gt_boxes",
    "gt_labels",
    "gt_difficult",
    "gts_per_image",
)


class DetectionMAP(Metric):
    """COCO mAP, COCO AP50 and VOC2007 11-point AP50 of a detector, in percent (see the module docstring).

    `update(preds, targets)`: one dict per image; preds with `boxes` (N x 4 float, x1 y1 x2 y2 pixels),
    `scores` (N) and `labels` (N int, 1..K), targets with `boxes`, `labels` and optionally `difficult` (bool
    N; `iscrowd` is accepted as its other name). `compute()` returns {"map", "map50", "voc07_map50"} as
    Python floats. Call `update` per batch, not the metric itself: `forward` would run COCOeval per batch."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False  # update never reads the states, which is what merge_state needs

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in _STATE_NAMES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if not isinstance(preds, list | tuple) or not isinstance(targets, list | tuple):
            raise UserError(
                f"DetectionMAP.update takes two lists of dicts (one per image), got {type(preds).__name__} "
                f"and {type(targets).__name__}"
            )
        if len(preds) != len(targets):
            raise UserError(f"DetectionMAP.update got {len(preds)} predictions for {len(targets)} targets")
        if not preds:
            return
        parts: dict[str, list[Tensor]] = {name: [] for name in _STATE_NAMES}
        for index, (pred, target) in enumerate(zip(preds, targets, strict=True)):
            boxes, labels = _boxes_and_labels(pred, f"preds[{index}]")
            scores = _tensor(pred, "scores", f"preds[{index}]").reshape(-1)
            if scores.numel() != len(labels):
                raise UserError(f"preds[{index}] has {len(labels)} labels but {scores.numel()} scores")
            gt_boxes, gt_labels = _boxes_and_labels(target, f"targets[{index}]")
            difficult = _difficult_flags(target, len(gt_labels), f"targets[{index}]")
            parts["pred_boxes"].append(boxes.reshape(-1))
            parts["pred_scores"].append(scores)
            parts["pred_labels"].append(labels)
            parts["preds_per_image"].append(torch.tensor([len(labels)]))
            parts["gt_boxes"].append(gt_boxes.reshape(-1))
            parts["gt_labels"].append(gt_labels)
            parts["gt_difficult"].append(difficult)
            parts["gts_per_image"].append(torch.tensor([len(gt_labels)]))
        for name, tensors in parts.items():
            # One tensor per state and batch, in the dtype torchmetrics uses for an empty rank's placeholder:
            # all_gather needs the same dtype and rank (1-D) everywhere. Labels and counts stay exact in
            # float32 (integers below 2**24).
            flat = torch.cat([tensor.detach().to(device=self.device, dtype=self.dtype) for tensor in tensors])
            getattr(self, name).append(flat)

    def compute(self) -> dict[str, float]:
        records = _Records({name: getattr(self, name) for name in _STATE_NAMES})
        if not bool((~records.gt_difficult).any()):
            return dict.fromkeys(METRIC_NAMES, 0.0)
        coco = _coco_fractions(records)
        return {
            "map": 100.0 * coco["map"],
            "map50": 100.0 * coco["map_50"],
            "voc07_map50": 100.0 * _voc07_map50(records),
        }


class _Records:
    """The synced states as typed CPU tensors (boxes N x 4 float64, labels int64, flags bool), image-major,
    and the per-image slices that both COCO and VOC need."""

    def __init__(self, states: dict[str, list[Tensor] | Tensor]):
        flat = {name: _concatenated(value) for name, value in states.items()}
        self.preds_per_image = flat["preds_per_image"].long()
        self.gts_per_image = flat["gts_per_image"].long()
        if len(self.preds_per_image) != len(self.gts_per_image):
            raise RuntimeError(
                f"DetectionMAP's states disagree on the number of images ({len(self.preds_per_image)} with "
                f"predictions, {len(self.gts_per_image)} with targets): merged in different orders?"
            )
        self.num_images = len(self.preds_per_image)
        self.pred_boxes = flat["pred_boxes"].double().reshape(-1, 4)
        self.pred_scores = flat["pred_scores"].double()
        self.pred_labels = flat["pred_labels"].long()
        self.gt_boxes = flat["gt_boxes"].double().reshape(-1, 4)
        self.gt_labels = flat["gt_labels"].long()
        self.gt_difficult = flat["gt_difficult"].bool()

    def per_image(self) -> list[tuple[slice, slice]]:
        """(prediction rows, ground-truth rows) of each image, in order."""
        pred_ends = torch.cumsum(self.preds_per_image, 0).tolist()
        gt_ends = torch.cumsum(self.gts_per_image, 0).tolist()
        pred_starts = [0, *pred_ends[:-1]]
        gt_starts = [0, *gt_ends[:-1]]
        return [
            (slice(pred_start, pred_end), slice(gt_start, gt_end))
            for pred_start, pred_end, gt_start, gt_end in zip(
                pred_starts, pred_ends, gt_starts, gt_ends, strict=True
            )
        ]


def _coco_fractions(records: _Records) -> dict[str, float]:
    """COCOeval's numbers (fractions) on the synced records, through a private torchmetrics metric that must
    not sync again: every rank already holds every image."""
    coco = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="pycocotools",
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_RECALL_LEVELS,
        sync_on_compute=False,
    )
    preds, targets = [], []
    for pred_rows, gt_rows in records.per_image():
        preds.append(
            {
                "boxes": records.pred_boxes[pred_rows],
                "scores": records.pred_scores[pred_rows],
                "labels": records.pred_labels[pred_rows],
            }
        )
        targets.append(
            {
                "boxes": records.gt_boxes[gt_rows],
                "labels": records.gt_labels[gt_rows],
                "iscrowd": records.gt_difficult[gt_rows].long(),
            }
        )
    coco.update(preds, targets)
    result = coco.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"])}


def _voc07_map50(records: _Records) -> float:
    """VOC2007's 11-point AP at IoU 0.5 averaged over the classes with a non-difficult ground truth (a
    fraction)."""
    outcomes = _voc_outcomes(records)
    order = torch.argsort(records.pred_scores, descending=True, stable=True)
    ranked_labels = records.pred_labels[order]
    ranked_outcomes = outcomes[order]
    positives = records.gt_labels[~records.gt_difficult]
    average_precisions = []
    for label in torch.unique(positives).tolist():
        class_outcomes = ranked_outcomes[ranked_labels == label]
        class_outcomes = class_outcomes[class_outcomes != _IGNORED]
        true_positives = torch.cumsum((class_outcomes == _TRUE_POSITIVE).double(), 0)
        false_positives = torch.cumsum((class_outcomes == _FALSE_POSITIVE).double(), 0)
        recall = true_positives / int((positives == label).sum())
        precision = true_positives / (true_positives + false_positives)
        average_precisions.append(_eleven_point_ap(recall, precision))
    return sum(average_precisions) / len(average_precisions)


_FALSE_POSITIVE, _TRUE_POSITIVE, _IGNORED = 0, 1, -1


def _voc_outcomes(records: _Records) -> Tensor:
    """Each detection's VOC outcome (true / false positive, or ignored on a difficult box), as the devkit's
    greedy pass gives it. Only the detections of one image and class compete for its boxes, and a box is
    taken by the first detection, in score order, whose best match it is: the pass is a first occurrence."""
    num_preds = len(records.pred_scores)
    best_iou = torch.full((num_preds,), -1.0, dtype=torch.float64)
    best_gt = torch.zeros(num_preds, dtype=torch.long)
    for pred_rows, gt_rows in records.per_image():
        if pred_rows.start == pred_rows.stop or gt_rows.start == gt_rows.stop:
            continue
        iou = box_iou(records.pred_boxes[pred_rows], records.gt_boxes[gt_rows]).nan_to_num(-1.0)
        same_class = records.pred_labels[pred_rows, None] == records.gt_labels[None, gt_rows]
        iou = torch.where(same_class, iou, torch.full_like(iou, -1.0))
        best_iou[pred_rows], best_gt[pred_rows] = iou.max(dim=1)  # first maximum, as the devkit's max()
        best_gt[pred_rows] += gt_rows.start
    hits = best_iou >= VOC_IOU_THRESHOLD
    on_difficult = torch.zeros_like(hits)
    on_difficult[hits] = records.gt_difficult[best_gt[hits]]
    outcomes = torch.full((num_preds,), _FALSE_POSITIVE, dtype=torch.int8)
    outcomes[on_difficult] = _IGNORED
    claims = hits & ~on_difficult
    order = torch.argsort(records.pred_scores, descending=True, stable=True)
    claimants = order[claims[order]]  # detections on a regular box, best score first
    _, first_claims = np.unique(best_gt[claimants].numpy(), return_index=True)
    outcomes[claimants[torch.from_numpy(first_claims)]] = _TRUE_POSITIVE
    return outcomes


def _eleven_point_ap(recall: Tensor, precision: Tensor) -> float:
    """Mean over recall levels 0, 0.1, ..., 1 of the best precision reached at that recall or more."""
    total = 0.0
    for level in VOC07_RECALL_LEVELS:
        reached = precision[recall >= level]
        total += float(reached.max()) if len(reached) else 0.0
    return total / len(VOC07_RECALL_LEVELS)


def _concatenated(state: list[Tensor] | Tensor) -> Tensor:
    """A state as one tensor: a list before sync or after merge_state, a tensor after sync, [] if empty."""
    if isinstance(state, Tensor):
        return state.detach().cpu()
    if not state:
        return torch.zeros(0)
    return dim_zero_cat(state).detach().cpu()


def _tensor(item: dict, key: str, where: str) -> Tensor:
    if not isinstance(item, dict):
        raise UserError(f"{where} must be a dict of tensors, got {type(item).__name__}")
    if key not in item:
        raise UserError(f"{where} has no '{key}' (it has {sorted(item)})")
    value = item[key]
    if not isinstance(value, Tensor):
        raise UserError(f"{where}['{key}'] must be a tensor, got {type(value).__name__}")
    return value


def _boxes_and_labels(item: dict, where: str) -> tuple[Tensor, Tensor]:
    boxes = _tensor(item, "boxes", where)
    labels = _tensor(item, "labels", where).reshape(-1)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise UserError(f"{where}['boxes'] must be N x 4 (x1 y1 x2 y2), got shape {tuple(boxes.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{where}['labels'] must be integer class ids, got {labels.dtype}")
    if len(labels) != len(boxes):
        raise UserError(f"{where} has {len(boxes)} boxes but {len(labels)} labels")
    return boxes, labels


def _difficult_flags(target: dict, num_boxes: int, where: str) -> Tensor:
    """The difficult (or crowd) flag of each ground-truth box; none when the target has neither key."""
    if "difficult" in target and "iscrowd" in target:
        raise UserError(f"{where} has both 'difficult' and 'iscrowd'; give one (they mean the same here)")
    key = "iscrowd" if "iscrowd" in target else "difficult"
    if key not in target:
        return torch.zeros(num_boxes, dtype=torch.bool)
    flags = _tensor(target, key, where).reshape(-1)
    if len(flags) != num_boxes:
        raise UserError(f"{where} has {num_boxes} boxes but {len(flags)} '{key}' flags")
    return flags.bool()
