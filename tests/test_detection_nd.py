"""ND for detectors (methods/detection_nd.py, detection/statistics.py): the RoI loss against hand-computed
values, the RoI class centres as per-label means, the teacher's statistics pass, and KD++ end to end on the
shapes, its centres cached beside the teacher and read back by a second run."""

import math

import pytest
import torch

from kd_experiments.detection.features import DetectorOutput
from kd_experiments.detection.models import create_detector
from kd_experiments.detection.shapes import GeneratedShapes, ShapesData
from kd_experiments.detection.statistics import teacher_roi_batches
from kd_experiments.errors import UserError
from kd_experiments.losses import nd_loss
from kd_experiments.methods.detection_nd import RoINormDirection
from kd_experiments.train import train
from tests.test_detection_run import quick, read_summary

SMALL = {"min_size": 64, "max_size": 64, "fpn_channels": 16, "representation_size": 32}
SMALL |= {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16, "rpn_pre_nms_top_n_train": 100}
SMALL |= {"rpn_post_nms_top_n_train": 50, "anchor_sizes": [8, 16, 32, 64, 128]}

# Three labels (0 = background), 2-d embeddings: e_0 = (0, 1), e_1 = (1, 0), e_2 = (1, 1) / sqrt 2.
CENTRES = torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])


def roi_nd(student, teacher, labels, centres=CENTRES) -> float:
    """The objective's loss on RoIs given as lists (student and teacher embeddings, labels)."""
    objective = RoINormDirection()
    objective.setup(
        DetectorOutput(roi_embedding=torch.zeros(1, 2)), DetectorOutput(roi_embedding=torch.zeros(1, 2))
    )
    objective.set_teacher_statistics({"class_centers": centres})
    student_out = DetectorOutput(roi_embedding=torch.tensor(student), roi_labels=torch.tensor(labels))
    return objective(student_out, DetectorOutput(roi_embedding=torch.tensor(teacher)), None).item()


def test_a_roi_along_its_centre_gives_zero_and_an_orthogonal_one_gives_one():
    # s = (3, 0) on e_1, |s| = 3 > |t| = 1: 1 - 3 / 3 = 0
    assert roi_nd([[3.0, 0.0]], [[0.0, 1.0]], [1]) == pytest.approx(0.0)
    # s = (0, 3) against e_1: <s, e_1> = 0, so 1 - 0 = 1
    assert roi_nd([[0.0, 3.0]], [[1.0, 0.0]], [1]) == pytest.approx(1.0)


def test_the_denominator_is_the_larger_of_the_two_norms():
    # |s| = 1 < |t| = 4: 1 - <s, e_1> / 4 = 1 - 1/4 (a student on its centre but short of the teacher's norm)
    assert roi_nd([[1.0, 0.0]], [[0.0, 4.0]], [1]) == pytest.approx(0.75)
    # |s| = 5 > |t| = 1: 1 - <(3, 4), e_1> / 5 = 1 - 3/5
    assert roi_nd([[3.0, 4.0]], [[1.0, 0.0]], [1]) == pytest.approx(0.4)


def test_background_rois_use_centre_zero():
    # The same RoI (3, 4), t = (1, 0): label 0 (background) measures it against e_0 = (0, 1): 1 - 4/5;
    # label 1 against e_1 = (1, 0): 1 - 3/5.
    assert roi_nd([[3.0, 4.0]], [[1.0, 0.0]], [0]) == pytest.approx(0.2)
    assert roi_nd([[3.0, 4.0]], [[1.0, 0.0]], [1]) == pytest.approx(0.4)


def test_the_loss_is_the_mean_over_every_roi_of_the_batch():
    student = [[0.0, 2.0], [0.0, 3.0], [1.0, 0.0], [3.0, 4.0], [2.0, 0.0]]
    teacher = [[0.0, 1.0], [1.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 1.0]]
    labels = [0, 1, 1, 0, 2]
    # 0 (on e_0), 1 (orthogonal), 1 - 1/4, 1 - 4/5, and label 2: 1 - <(2, 0), (1, 1) / sqrt 2> / 2
    # = 1 - 1 / sqrt 2
    expected = (0.0 + 1.0 + 0.75 + 0.2 + (1 - 1 / math.sqrt(2))) / 5
    assert roi_nd(student, teacher, labels) == pytest.approx(expected)
    assert expected == pytest.approx(2.2428932 / 5)
    # The same number from losses.nd_loss itself: the detection term is ND's formula, labels 0..K.
    value = nd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), CENTRES)
    assert value.item() == pytest.approx(expected)


def test_only_the_student_gets_gradients():
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 4.0]], requires_grad=True)
    centres = CENTRES.clone().requires_grad_(True)
    nd_loss(student, teacher, torch.tensor([1]), centres).backward()
    # |t| > |s|: L = 1 - s_x / 4, dL/ds = (-1/4, 0)
    assert torch.allclose(student.grad, torch.tensor([[-0.25, 0.0]]))
    assert teacher.grad is None and centres.grad is None


def tiny_teacher(num_classes: int = 2):
    torch.manual_seed(0)
    return create_detector("fasterrcnn_resnet18_fpn", num_classes, **SMALL).eval()


def test_the_centres_are_the_per_label_means_background_included():
    teacher = tiny_teacher(num_classes=2)  # K + 1 = 3 labels
    batches = [
        (
            DetectorOutput(roi_embedding=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])),
            torch.tensor([0, 1, 0]),
        ),
        (DetectorOutput(roi_embedding=torch.tensor([[7.0, 8.0], [0.0, 2.0]])), torch.tensor([2, 1])),
    ]
    centres = RoINormDirection().compute_teacher_statistics(teacher, batches)["class_centers"]
    # label 0: ((1, 2) + (5, 6)) / 2; label 1: ((3, 4) + (0, 2)) / 2; label 2: (7, 8)
    assert torch.equal(centres, torch.tensor([[3.0, 4.0], [1.5, 3.0], [7.0, 8.0]]))
    assert centres.dtype == torch.float32


def test_a_label_without_rois_is_one_line():
    batches = [(DetectorOutput(roi_embedding=torch.ones(2, 2)), torch.tensor([0, 2]))]
    with pytest.raises(UserError, match=r"no sampled RoI of labels \[1\]"):
        RoINormDirection().compute_teacher_statistics(tiny_teacher(num_classes=2), batches)


def test_setup_refuses_box_features_of_different_widths():
    with pytest.raises(ValueError, match="same representation_size"):
        RoINormDirection().setup(
            DetectorOutput(roi_embedding=torch.zeros(1, 8)), DetectorOutput(roi_embedding=torch.zeros(1, 16))
        )
    objective = RoINormDirection()
    objective.setup(
        DetectorOutput(roi_embedding=torch.zeros(1, 8)), DetectorOutput(roi_embedding=torch.zeros(1, 8))
    )
    with pytest.raises(ValueError, match=r"not \(K \+ 1\) x 8"):
        objective.set_teacher_statistics({"class_centers": torch.zeros(3, 16)})


def test_without_centres_only_the_dry_run_passes():
    """The runner dry-runs each objective on the probe batch before the teacher's weights (and centres)
    exist; training without centres is an error."""
    objective = RoINormDirection()
    student = DetectorOutput(roi_embedding=torch.tensor([[1.0, 0.0]]), roi_labels=torch.tensor([0]))
    teacher = DetectorOutput(roi_embedding=torch.tensor([[2.0, 0.0]]))
    objective.eval()
    assert objective(student, teacher, None).item() == pytest.approx(0.5)  # its own t as centre: 1 - 1/2
    objective.train()
    with pytest.raises(RuntimeError, match="no class centres"):
        objective(student, teacher, None)


def test_the_statistics_pass_samples_the_teachers_rois_on_unflipped_images():
    data = ShapesData(batch_size=2, num_train=4, num_val=1, image_size=64, hflip=1.0)  # every sample flipped
    data.setup()
    unflipped = GeneratedShapes(4, 64, 4, 0, 0)
    (images, targets), *_ = data.plain_train_dataloader()
    assert torch.equal(images[0], unflipped[0][0]) and torch.equal(
        targets[1]["boxes"], unflipped[1][1]["boxes"]
    )
    assert data.train_set.transform is not None  # the run's own split keeps its flip

    teacher = tiny_teacher(num_classes=3)
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    counts = {"images": 0, "rois": 0}
    batches = list(teacher_roi_batches(teacher, data, torch.device("cpu"), counts))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert not teacher.training and not teacher.rpn.training  # modes restored
    assert len(batches) == 2 and counts == {"images": 4, "rois": sum(len(labels) for _, labels in batches)}
    for output, labels in batches:
        assert output.roi_embedding.shape == (len(labels), 32)
        assert len(labels) == 2 * 16  # box_batch_size_per_image RoIs per image
        assert labels.min() == 0 and labels.max() >= 1  # background and objects (the GT is appended)


def test_kd_plus_plus_trains_nd_and_kd_and_caches_the_centres(tmp_path, caplog):
    with caplog.at_level("INFO", logger="kd_experiments.detection.statistics"):
        train(quick(tmp_path, tmp_path / "first", "method=detection_kd++"))
    first = read_summary(tmp_path / "first")
    assert first["status"] == "completed" and first["method"] == "detection_kd++"
    terms = first["history"][0]["train"]
    assert {"detection", "kd", "nd"} <= set(terms)
    assert all(math.isfinite(terms[name]) for name in ("detection", "kd", "nd"))
    (centres_file,) = (tmp_path / "outputs/teachers/statistics").glob(
        "roi_class_centers-fasterrcnn_resnet18_fpn-*.pt"
    )
    centres = torch.load(centres_file, weights_only=True)["class_centers"]
    assert centres.shape == (3 + 1, 32)  # the shapes' 3 classes + background, the teachers' box width
    assert "Teacher statistics roi_class_centers: computed on" in caplog.text
    written = centres_file.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level("INFO", logger="kd_experiments.detection.statistics"):
        train(quick(tmp_path, tmp_path / "second", "method=detection_kd++"))
    second = read_summary(tmp_path / "second")
    assert second["teacher_source"] == "cache"
    # Computing the centres or reading them leaves the run's random stream alone: the same training.
    assert second["history"][0]["train"] == pytest.approx(terms)
    assert f"Teacher statistics roi_class_centers: reusing {centres_file}" in caplog.text
    assert "computed on" not in caplog.text and centres_file.stat().st_mtime_ns == written
