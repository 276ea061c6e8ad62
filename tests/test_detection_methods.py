"""The detection objectives (methods/detection.py) against hand-computed values, and the detector pieces
they read (detection/models.py, detection/features.py)."""

import math

import pytest
import torch

from kd_experiments.detection.features import DetectorOutput, probe_pass, renormalize, teacher_pass
from kd_experiments.detection.models import create_detector
from kd_experiments.errors import UserError
from kd_experiments.methods.detection import DetectorLosses, RoIFeatureL2, RoIFeatureLSH, RoILogitKD

SMALL = {"min_size": 64, "max_size": 64, "fpn_channels": 16, "representation_size": 32}
SMALL |= {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16, "box_detections_per_img": 10}
SMALL |= {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50}


def _images_and_targets():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 5.0, 60.0, 50.0]]),
            "labels": torch.tensor([2, 3]),
        },
    ]
    return images, targets


def test_detector_losses_is_the_sum_of_the_four():
    losses = {"loss_objectness": torch.tensor(0.5), "loss_rpn_box_reg": torch.tensor(0.25)}
    losses |= {"loss_classifier": torch.tensor(1.0), "loss_box_reg": torch.tensor(2.0)}
    assert DetectorLosses()(DetectorOutput(losses=losses), None, None).item() == pytest.approx(3.75)


def test_roi_l2_is_the_element_mean_of_squared_differences():
    student = DetectorOutput(roi_embedding=torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True))
    teacher = DetectorOutput(roi_embedding=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    loss = RoIFeatureL2()(student, teacher, None)
    # (0^2 + 2^2 + 3^2 + 0^2) / 4 = 13 / 4
    assert loss.item() == pytest.approx(3.25)
    loss.backward()
    # d/ds mean((s - t)^2) = 2 (s - t) / 4
    assert torch.allclose(student.roi_embedding.grad, torch.tensor([[0.0, 1.0], [1.5, 0.0]]))


def test_roi_lsh_is_bce_on_the_teacher_hash_signs():
    objective = RoIFeatureLSH(num_hashes=2, std=1.0)
    objective.setup(
        DetectorOutput(roi_embedding=torch.zeros(1, 2)), DetectorOutput(roi_embedding=torch.zeros(1, 2))
    )
    objective.hash_weight = torch.eye(2)  # hand-chosen hyperplanes: h(e) = e
    student = DetectorOutput(roi_embedding=torch.tensor([[1.0, -1.0]]))
    teacher = DetectorOutput(roi_embedding=torch.tensor([[2.0, 3.0]]))  # both bits 1
    loss = objective(student, teacher, None)
    # BCE(1, 1) = log(1 + e^-1) = 0.313262, BCE(-1, 1) = log(1 + e^1) = 1.313262; mean 0.813262
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)


def test_roi_lsh_defaults_to_four_times_the_width_and_the_teacher_classifier_std():
    teacher = create_detector("fasterrcnn_resnet18_fpn", 3, **SMALL)
    objective = RoIFeatureLSH(hash_seed=3)
    probe = DetectorOutput(roi_embedding=torch.zeros(1, 32))
    objective.setup(probe, probe)
    unit = objective.hash_weight.clone()
    assert unit.shape == (4 * 32, 32)  # LSHFM.detection: hash_num = feature_dim * 4
    objective.bind_teacher(teacher)
    std = teacher.roi_heads.box_predictor.cls_score.weight.std().item()
    assert objective.hash_std.item() == pytest.approx(std)
    assert torch.allclose(objective.hash_weight, unit * std)
    objective.bind_teacher(teacher)  # once only: a second call (or a restored checkpoint) does not rescale
    assert torch.allclose(objective.hash_weight, unit * std)
    again = RoIFeatureLSH(hash_seed=3)
    again.setup(probe, probe)
    assert torch.equal(again.hash_weight, unit)  # the hyperplanes depend on hash_seed only


def test_roi_logit_kd_is_the_kl_per_roi():
    student = DetectorOutput(roi_logits=torch.tensor([[0.0, 0.0]]))
    teacher = DetectorOutput(roi_logits=torch.tensor([[math.log(3.0), 0.0]]))
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    assert RoILogitKD(1.0)(student, teacher, None).item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    )
    # T = 2 on the same logits: p_t = softmax(ln 3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert RoILogitKD(2.0)(student, teacher, None).item() == pytest.approx(expected)


def test_widths_that_differ_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="same representation_size"):
        RoIFeatureL2().setup(
            DetectorOutput(roi_embedding=torch.zeros(1, 8)), DetectorOutput(roi_embedding=torch.zeros(1, 16))
        )


@pytest.mark.parametrize(
    "arch, anchors",
    [
        ("fasterrcnn_resnet18_fpn", [8, 16, 32, 64, 128]),
        ("fasterrcnn_mobilenet_v3_small_fpn", [8, 16, 32, 64]),
        ("fasterrcnn_vgg11", [16, 32]),
        ("fasterrcnn_vgg11_fpn", [8, 16, 32, 64, 128]),
    ],
)
def test_teacher_features_match_the_student_rois(arch, anchors):
    """The teacher's RoI rows are the student's sampled RoIs: as many rows, the same boxes."""
    torch.manual_seed(0)
    student = create_detector(arch, 3, anchor_sizes=anchors, **SMALL)
    teacher = create_detector("fasterrcnn_resnet18_fpn", 3, anchor_sizes=[8, 16, 32, 64, 128], **SMALL).eval()
    images, targets = _images_and_targets()
    needs = frozenset({"fpn", "roi_pooled", "roi_embedding", "roi_logits"})
    before = [m.running_mean.clone() for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    student_run = probe_pass(student, images, targets, needs)
    after = [m.running_mean for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the probe moves no statistics
    with torch.no_grad():
        teacher_out = teacher_pass(teacher, student, student_run.images, student_run.rois, needs)
    rois = sum(len(r) for r in student_run.rois)
    assert student_run.output.roi_embedding.shape == (rois, 32) == teacher_out.roi_embedding.shape
    assert student_run.output.roi_logits.shape == (rois, 4) == teacher_out.roi_logits.shape
    assert student_run.output.roi_labels.shape == (rois,)
    assert set(student_run.output.losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
    }
    assert teacher_out.roi_pooled.shape == (rois, 16, 7, 7)


def test_renormalize_maps_one_normalisation_onto_another():
    class Norm:
        def __init__(self, mean, std):
            self.image_mean, self.image_std = mean, std

    raw = torch.rand(1, 3, 4, 4)
    source, target = (
        Norm([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
        Norm([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    )

    def normalised(norm):
        return (raw - torch.tensor(norm.image_mean)[:, None, None]) / torch.tensor(norm.image_std)[
            :, None, None
        ]

    assert torch.allclose(renormalize(normalised(source), source, target), normalised(target), atol=1e-6)
    same = normalised(source)
    assert renormalize(same, source, source) is same


def test_unknown_detector_and_bad_anchor_counts_are_one_line():
    with pytest.raises(
        UserError, match="unknown detector 'fasterrcnn_resnet7_fpn'; known: fasterrcnn_resnet18_fpn"
    ):
        create_detector("fasterrcnn_resnet7_fpn", 3)
    with pytest.raises(
        UserError, match="anchor_sizes gives 2 sizes but fasterrcnn_resnet18_fpn has 5 feature levels"
    ):
        create_detector("fasterrcnn_resnet18_fpn", 3, anchor_sizes=[8, 16])


def test_batch_standardised_smooth_l1_by_hand():
    from kd_experiments.losses import batch_standardised_smooth_l1

    student = torch.tensor([[1.0], [3.0]])  # mean 2, unbiased std sqrt(2): z = (-1/sqrt2, 1/sqrt2)
    assert batch_standardised_smooth_l1(student, torch.tensor([[0.0], [10.0]])).item() == pytest.approx(0.0)
    # teacher z = (1/sqrt2, -1/sqrt2): |difference| = sqrt2 > beta = 1, so SmoothL1 = sqrt2 - 1/2 per token
    swapped = batch_standardised_smooth_l1(student, torch.tensor([[10.0], [0.0]]))
    assert swapped.item() == pytest.approx(math.sqrt(2) - 0.5)
    # a constant channel standardises to 0 (the floor on the std), not NaN
    flat = batch_standardised_smooth_l1(torch.tensor([[2.0], [2.0]]), torch.tensor([[0.0], [1.0]]))
    assert flat.item() == pytest.approx(0.25)  # |0 - (+-1/sqrt2)| < 1: 0.5 d^2 = 0.25 per token


def test_vkd_detection_projects_every_level_and_the_roi_features():
    from kd_experiments.methods.detection import BatchStandardisedMimic

    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 8, 16 // 2**i, 16 // 2**i, generator=generator) for i in range(3)]
    teacher = DetectorOutput(
        fpn=[m * 3 + 1 for m in maps], roi_embedding=torch.randn(6, 12, generator=generator)
    )
    student = DetectorOutput(
        fpn=[torch.randn_like(m) for m in maps], roi_embedding=torch.randn(6, 10, generator=generator)
    )
    objective = BatchStandardisedMimic(levels=None, roi_embedding=True)
    objective.setup(student, teacher)
    assert len(objective.projectors) == 3 and objective.roi_projector.rotation.weight.shape == (12, 10)
    weight = objective.projectors[0].rotation.weight
    assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-5)  # a rotation
    loss = objective(student, teacher, None)
    # the teacher's affine map (x3 + 1) and the projector's positive per-channel scale and bias are undone by
    # the standardisation: the loss is that of the rotated student against the raw teacher maps
    with torch.no_grad():
        for projector in (*objective.projectors, objective.roi_projector):
            projector.scale.fill_(2.0)
            projector.bias.fill_(5.0)
    assert objective(
        student, DetectorOutput(fpn=maps, roi_embedding=teacher.roi_embedding), None
    ).item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="teacher level 5 does not exist or has no student level"):
        BatchStandardisedMimic(levels=[5], roi_embedding=False).setup(student, teacher)


def test_a_detector_saved_by_an_older_torchvision_loads_as_torchvision_loads_it():
    """LSHFM's released detectors were saved by torchvision 0.8, whose FPN and RPN head keys had one level
    fewer (`fpn.inner_blocks.0.weight`, now `fpn.inner_blocks.0.0.weight`); torchvision renames them when
    loading, and so must the teacher loader."""
    import re

    from kd_experiments.teachers import load_weights

    torch.manual_seed(0)
    saved = create_detector("fasterrcnn_resnet18_fpn", 3, anchor_sizes=[8, 16, 32, 64, 128], **SMALL)
    old_names = {}
    for key, value in saved.state_dict().items():
        key = re.sub(r"(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"\1.\2.", key)
        old_names[key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = value
    assert "backbone.fpn.inner_blocks.0.weight" in old_names and "rpn.head.conv.weight" in old_names
    fresh = create_detector("fasterrcnn_resnet18_fpn", 3, anchor_sizes=[8, 16, 32, 64, 128], **SMALL)
    load_weights(fresh, old_names, "fasterrcnn_resnet18_fpn", "old.ckpt")
    for (name, mine), theirs in zip(fresh.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    old_names["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(7, 32)
    with pytest.raises(
        UserError, match=r"shape \(file vs model\): roi_heads.box_predictor.cls_score.weight \[7, 32\]"
    ):
        load_weights(fresh, old_names, "fasterrcnn_resnet18_fpn", "old.ckpt")
