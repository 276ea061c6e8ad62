"""DetectionMAP against hand-computed AP: COCO's 101-point AP at IoU .5 (`map50`) and over .5:.95 (`map`),
VOC2007's 11-point AP at IoU .5 (`voc07_map50`), difficult boxes ignored the VOC way, DDP merging.

Hand rules used below. COCO: precision is first made non-increasing (each point takes the best precision at
its recall or beyond), then read at the 101 recall levels 0, .01, ..., 1 (0 past the last recall reached) and
averaged; `map` also averages the ten IoU thresholds .50, .55, ..., .95. VOC07: at each of the 11 recall
levels 0, .1, ..., 1 the best precision at recall >= that level (0 if none), averaged. Both average over
classes with a non-difficult ground truth, and report percent."""

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_cat

from kd_experiments.detection.metrics import DetectionMAP
from kd_experiments.errors import UserError

TOLERANCE = 1e-4  # COCOeval's numbers come back through float32 tensors


def detections(*rows):
    """Predictions of one image from (x1, y1, x2, y2, score, label) rows."""
    return {
        "boxes": torch.tensor([row[:4] for row in rows], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([row[4] for row in rows], dtype=torch.float32),
        "labels": torch.tensor([row[5] for row in rows], dtype=torch.int64),
    }


def ground_truth(*rows):
    """Target of one image from (x1, y1, x2, y2, label) or (x1, y1, x2, y2, label, difficult) rows."""
    return {
        "boxes": torch.tensor([row[:4] for row in rows], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([row[4] for row in rows], dtype=torch.int64),
        "difficult": torch.tensor([bool(row[5]) if len(row) > 5 else False for row in rows]),
    }


def scores_of(preds, targets):
    metric = DetectionMAP()
    metric.update(preds, targets)
    return metric.compute()


def expect(result, map_, map50, voc07_map50):
    assert set(result) == {"map", "map50", "voc07_map50"}
    assert all(isinstance(value, float) for value in result.values())
    assert result["map"] == pytest.approx(map_, abs=TOLERANCE)
    assert result["map50"] == pytest.approx(map50, abs=TOLERANCE)
    assert result["voc07_map50"] == pytest.approx(voc07_map50, abs=TOLERANCE)


A1, A2, B1 = (0, 0, 10, 10), (20, 20, 40, 40), (5, 5, 25, 25)  # image A: classes 1 and 2; image B: class 1


def test_one_perfect_detection_per_ground_truth_scores_100():
    # Every class: one TP per GT, precision 1 up to recall 1 at every IoU threshold -> AP 1 -> 100 everywhere.
    preds = [detections((*A1, 0.9, 1), (*A2, 0.8, 2)), detections((*B1, 0.7, 1))]
    targets = [ground_truth((*A1, 1), (*A2, 2)), ground_truth((*B1, 1))]
    expect(scores_of(preds, targets), 100.0, 100.0, 100.0)


def test_a_missed_ground_truth_halves_recall():
    # Class 1 has 2 GTs (A1, B1), only A1 found: one TP, recall 1/2 at precision 1. Class 2: perfect, AP 1.
    # COCO class 1: levels 0, .01, ..., .50 reach precision 1 (51 of 101), the rest 0 -> 51/101.
    #   map50 = (51/101 + 1) / 2 = 76/101 = 75.2475 %; exact boxes, every IoU threshold alike: map = 75.2475.
    # VOC07 class 1: levels 0, .1, ..., .5 give 1 (6 of 11), .6 ... 1 give 0 -> 6/11.
    #   voc07_map50 = (6/11 + 1) / 2 = 17/22 = 77.2727 %.
    preds = [detections((*A1, 0.9, 1), (*A2, 0.8, 2)), detections()]
    targets = [ground_truth((*A1, 1), (*A2, 2)), ground_truth((*B1, 1))]
    expect(scores_of(preds, targets), 7600 / 101, 7600 / 101, 1700 / 22)


def test_a_duplicate_detection_is_a_false_positive():
    # One class, GTs a and b. Ranked: a (0.9) TP, a again (0.8) FP (a is taken), b (0.7) TP.
    #   (recall, precision): (1/2, 1), (1/2, 1/2), (1, 2/3).
    # COCO: made non-increasing -> 1, 2/3, 2/3; levels 0 ... .50 read 1 (51), .51 ... 1 read 2/3 (50):
    #   (51 + 50 * 2/3) / 101 = 253/303 = 83.4983 %; exact boxes at every IoU threshold: map = 83.4983.
    # VOC07: levels 0 ... .5 best precision 1 (6), .6 ... 1 only (1, 2/3) (5): (6 + 5 * 2/3) / 11 = 28/33
    #   = 84.8485 %.
    box_a, box_b = (0, 0, 10, 10), (50, 50, 60, 60)
    preds = [detections((*box_a, 0.9, 1), (*box_a, 0.8, 1), (*box_b, 0.7, 1))]
    targets = [ground_truth((*box_a, 1), (*box_b, 1))]
    expect(scores_of(preds, targets), 25300 / 303, 25300 / 303, 2800 / 33)
    # A duplicate ranked after the last TP costs nothing: precision 1 is reached at recall 1.
    late_duplicate = [detections((*box_a, 0.9, 1), (*box_b, 0.8, 1), (*box_a, 0.7, 1))]
    expect(scores_of(late_duplicate, targets), 100.0, 100.0, 100.0)


def test_a_difficult_ground_truth_is_neither_positive_nor_counted():
    regular, hard = (0, 0, 10, 10), (30, 30, 50, 50)
    targets = [ground_truth((*regular, 1), (*hard, 1, True))]
    # Detected, even twice and ranked first: both ignored (no FP), the regular box is 1 of 1 positives
    # -> precision 1 at recall 1 -> 100 everywhere.
    found = [detections((*hard, 0.95, 1), (*hard, 0.9, 1), (*regular, 0.8, 1))]
    expect(scores_of(found, targets), 100.0, 100.0, 100.0)
    # Missed: not a positive, so recall is still 1 of 1 -> 100.
    expect(scores_of([detections((*regular, 0.8, 1))], targets), 100.0, 100.0, 100.0)
    # Only the difficult box found: no TP (recall 0 of 1) -> 0 everywhere.
    expect(scores_of([detections((*hard, 0.9, 1))], targets), 0.0, 0.0, 0.0)
    # Dropped from the targets instead (LSHFM's test set): the first detection is an FP, then a TP:
    # (recall, precision) (0, 0), (1, 1/2) -> every level reads 1/2 -> 50 in COCO and VOC07 alike.
    dropped = [ground_truth((*regular, 1))]
    expect(scores_of([detections((*hard, 0.9, 1), (*regular, 0.8, 1))], dropped), 50.0, 50.0, 50.0)


def test_iou_at_the_threshold_and_a_label_mismatch():
    gt = [ground_truth((0, 0, 10, 10, 1))]  # area 100
    # 10 x 5.5 box inside: IoU 55/100 = 0.55 >= 0.5 -> TP, AP 1 at IoU .5 (100, 100). COCO's ten thresholds:
    # a hit at .50 and .55 only (pycocotools' 0.55 is the double 55/100 is) -> map = 2/10 = 20 %.
    expect(scores_of([detections((0, 0, 10, 5.5, 0.9, 1))], gt), 20.0, 100.0, 100.0)
    # 10 x 4.5: IoU 0.45 < 0.5 -> an FP and a missed GT -> 0 everywhere.
    expect(scores_of([detections((0, 0, 10, 4.5, 0.9, 1))], gt), 0.0, 0.0, 0.0)
    # 10 x 5: IoU exactly 0.5 is a hit (devkit's >=, COCO skips only IoU < threshold) -> 100; map 1/10 = 10 %.
    expect(scores_of([detections((0, 0, 10, 5, 0.9, 1))], gt), 10.0, 100.0, 100.0)
    # Label mismatch: class 2 on A1 (0.9) is an FP of class 2 although it covers a class-1 box exactly.
    # Class 1: A1 (0.8) TP -> AP 1. Class 2: FP (0.9) then A2 (0.7) TP: (0, 0), (1, 1/2) -> AP 1/2 everywhere.
    # mean (1 + 1/2) / 2 = 75 % for all three.
    preds = [detections((*A1, 0.9, 2), (*A1, 0.8, 1)), detections((*A2, 0.7, 2))]
    targets = [ground_truth((*A1, 1)), ground_truth((*A2, 2))]
    expect(scores_of(preds, targets), 75.0, 75.0, 75.0)


def test_a_small_box_inside_a_difficult_one_is_where_coco_and_voc_differ():
    # Documented corner: COCO scores a detection against a crowd box by intersection / detection area
    # (4 / 4 = 1 -> ignored: AP 1 -> 100, 100), the devkit by IoU (4 / 100 < 0.5 -> FP ranked first, then the
    # regular box TP: (0, 0), (1, 1/2) -> 50).
    targets = [ground_truth((0, 0, 10, 10, 1, True), (50, 50, 60, 60, 1))]
    preds = [detections((2, 2, 4, 4, 0.9, 1), (50, 50, 60, 60, 0.5, 1))]
    expect(scores_of(preds, targets), 100.0, 100.0, 50.0)


def test_empty_cases_have_defined_values():
    # No update at all: nothing to find -> 0 (torchmetrics warns that compute came before update).
    with pytest.warns(UserWarning, match="before the ``update``"):
        expect(DetectionMAP().compute(), 0.0, 0.0, 0.0)
    # An empty batch, then no ground truth anywhere (only detections): still 0, no crash.
    metric = DetectionMAP()
    metric.update([], [])
    metric.update([detections((*A1, 0.9, 1))], [ground_truth()])
    expect(metric.compute(), 0.0, 0.0, 0.0)
    # Ground truth but no detections at all: recall 0 -> 0.
    expect(scores_of([detections(), detections()], [ground_truth((*A1, 1)), ground_truth((*B1, 1))]), 0, 0, 0)
    # An image without ground truth: its detection (0.9) is an FP of class 1, then A1 (0.5) TP:
    # (0, 0), (1, 1/2) -> 50 everywhere.
    preds = [detections((*A1, 0.5, 1)), detections((*A1, 0.9, 1))]
    expect(scores_of(preds, [ground_truth((*A1, 1)), ground_truth()]), 50.0, 50.0, 50.0)
    # Classes without a non-difficult ground truth (2: only a difficult box; 3: none) are left out of the
    # average, their detections change nothing: class 1 alone, AP 1 -> 100.
    preds = [detections((*A2, 0.9, 2), ((50, 50, 60, 60, 0.8, 3)), (*A1, 0.5, 1))]
    expect(scores_of(preds, [ground_truth((*A1, 1), (*A2, 2, True))]), 100.0, 100.0, 100.0)


def random_images(seed: int, count: int):
    """`count` images with 0-3 boxes of 3 classes (some difficult), jittered detections and two stray boxes
    each, distinct random scores: a scene where every number is strictly between 0 and 100."""
    generator = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(count):
        num_boxes = int(torch.randint(0, 4, (1,), generator=generator))
        corners = torch.rand(num_boxes, 2, generator=generator) * 50
        sizes = 5 + torch.rand(num_boxes, 2, generator=generator) * 20
        boxes = torch.cat([corners, corners + sizes], dim=1)
        labels = torch.randint(1, 4, (num_boxes,), generator=generator)
        difficult = torch.rand(num_boxes, generator=generator) < 0.2
        stray_corners = torch.rand(2, 2, generator=generator) * 50
        stray = torch.cat([stray_corners, stray_corners + 10], dim=1)
        preds.append(
            {
                "boxes": torch.cat([boxes + torch.randn(num_boxes, 4, generator=generator) * 2, stray]),
                "scores": torch.rand(num_boxes + 2, generator=generator),
                "labels": torch.cat([labels, torch.randint(1, 4, (2,), generator=generator)]),
            }
        )
        targets.append({"boxes": boxes, "labels": labels, "difficult": difficult})
    return preds, targets


def sync_as_rank_zero(rank_zero: DetectionMAP, *other_ranks: DetectionMAP) -> None:
    """torchmetrics' own DDP sync on `rank_zero`, with an all_gather that answers, for each state, rank zero's
    tensor followed by the other ranks' (each rank's list concatenated, an empty one as torchmetrics' empty
    placeholder): what the real gather returns."""

    def as_sent(metric, name):
        state = getattr(metric, name)
        return dim_zero_cat(state) if state else torch.tensor([], dtype=metric.dtype)

    names = list(rank_zero._reductions)  # the order _sync_dist gathers in
    answers = iter([[as_sent(rank, name) for rank in other_ranks] for name in names])

    def all_gather(tensor, group=None):
        return [tensor, *next(answers)]

    rank_zero._sync_dist(dist_sync_fn=all_gather)
    assert next(answers, None) is None  # one gather per state


def test_updates_merges_and_ddp_sync_equal_one_update_with_everything():
    preds, targets = random_images(seed=0, count=8)
    expected = scores_of(preds, targets)
    assert all(0.0 < value < 100.0 for value in expected.values())

    def same(result):
        assert result == pytest.approx(expected, abs=1e-9)

    two_updates = DetectionMAP()
    two_updates.update(preds[:3], targets[:3])
    two_updates.update(preds[3:], targets[3:])
    same(two_updates.compute())

    first_half, second_half = DetectionMAP(), DetectionMAP()
    first_half.update(preds[:4], targets[:4])
    second_half.update(preds[4:], targets[4:])
    first_half.merge_state(second_half)
    same(first_half.compute())

    # Three "ranks" with uneven shards (3, 0 and 5 images) and rank zero's data in two updates.
    rank_zero, empty_rank, last_rank = DetectionMAP(), DetectionMAP(), DetectionMAP()
    rank_zero.update(preds[:1], targets[:1])
    rank_zero.update(preds[1:3], targets[1:3])
    last_rank.update(preds[3:], targets[3:])
    sync_as_rank_zero(rank_zero, empty_rank, last_rank)
    same(rank_zero.compute())

    # Rank zero itself without data: it sends torchmetrics' empty placeholder and still gets everything.
    idle_rank_zero, busy_rank = DetectionMAP(), DetectionMAP()
    busy_rank.update(preds, targets)
    sync_as_rank_zero(idle_rank_zero, busy_rank)
    with pytest.warns(UserWarning, match="before the ``update``"):  # this rank never called update
        same(idle_rank_zero.compute())


@pytest.mark.parametrize(
    ("preds", "targets", "message"),
    [
        ([detections()], [], "1 predictions for 0 targets"),
        (
            [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)}],
            [ground_truth()],
            "'scores'",
        ),
        ([{**detections(), "boxes": torch.zeros(2, 3)}], [ground_truth()], r"N x 4 .* shape \(2, 3\)"),
        ([detections((*A1, 0.9, 1))], [{**ground_truth((*A1, 1)), "labels": torch.ones(1)}], "integer class"),
        ([{**detections((*A1, 0.9, 1)), "scores": torch.ones(2)}], [ground_truth()], "1 labels but 2 scores"),
        ([detections()], [{**ground_truth((*A1, 1)), "difficult": torch.zeros(2)}], "2 'difficult' flags"),
        ([detections()], [{**ground_truth(), "iscrowd": torch.zeros(0)}], "both 'difficult' and 'iscrowd'"),
    ],
)
def test_bad_input_is_one_line_user_error(preds, targets, message):
    with pytest.raises(UserError, match=message):
        DetectionMAP().update(preds, targets)
