"""ReviewKD (ABF chain + HCL), the DeiT distillation token, and the KL / SRD / VkD terms reading a DeiT
student's second head and tokens."""

import pytest
import torch
import torch.nn.functional as F

from kd_experiments.errors import UserError
from kd_experiments.losses import hcl_loss
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.methods.deit import DistillationToken
from kd_experiments.methods.kd import HintonKD
from kd_experiments.methods.lshfm import L2Mimicking, LSHMimicking
from kd_experiments.methods.reviewkd import AttentionFusion, ReviewKD
from kd_experiments.methods.srd import SimpleRecipeDistillation
from kd_experiments.methods.vkd import OrthogonalProjection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def review_pair(student="resnet8x4", teacher="resnet32x4", method=None):
    method = method or ReviewKD()
    student_net = create_model(student, 100)
    teacher_net = create_model(teacher, 100).eval()
    student_out = extract_features(student_net.eval(), IMAGES, method.student_features)
    with torch.no_grad():
        teacher_out = extract_features(teacher_net, IMAGES, method.teacher_features)
    method.setup(student_out, teacher_out)
    return method, student_out, teacher_out


def test_reviewkd_builds_the_mdistiller_abf_chain_for_res32x4_to_res8x4():
    method, student_out, teacher_out = review_pair()
    # methods.md c: IN = OUT = [64, 128, 256, 256], mid = min(512, 256), spatial 32, 16, 8, 1.
    assert [f.conv1[0].in_channels for f in method.fusions] == [64, 128, 256, 256]
    assert [f.conv1[0].out_channels for f in method.fusions] == [256] * 4
    assert [f.conv2[0].out_channels for f in method.fusions] == [64, 128, 256, 256]
    assert [f.attention is not None for f in method.fusions] == [True, True, True, False]
    levels = method._levels(student_out, preact=False)
    predictions = method.review(levels)
    teacher_levels = method._levels(teacher_out, preact=True)
    assert [tuple(p.shape) for p in predictions] == [tuple(t.shape) for t in teacher_levels]
    assert [t.shape[-1] for t in teacher_levels] == [32, 16, 8, 1]
    assert (teacher_levels[0] < 0).any()  # the teacher's levels are pre-ReLU


def test_reviewkd_term_is_the_hcl_of_the_chain_warmed_by_its_weight_and_trains_every_fusion():
    method, student_out, teacher_out = review_pair("resnet8", "resnet20")
    targets = torch.tensor([1, 2, 3])
    value = method(student_out, teacher_out, targets)
    expected = hcl_loss(method.review(method._levels(student_out, False)), method._levels(teacher_out, True))
    torch.testing.assert_close(value, expected)
    # mdistiller's warm-up (base 1, W 20) is the weight's: 1/20 of it in the first epoch, all of it by 19
    weights = LossWeights({"ce": 1.0, "reviewkd": 5.0}, {"reviewkd": {"epochs": 20, "epoch_base": 1}})
    assert weights.at(0)["reviewkd"] == pytest.approx(5.0 / 20)
    assert weights.at(19)["reviewkd"] == weights.at(30)["reviewkd"] == 5.0
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_abf_fuses_with_attention_and_upsamples_to_the_teacher_size():
    torch.manual_seed(0)
    fusion = AttentionFusion(8, 4, 6, fuse=True).eval()
    x, residual = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 2, 2)
    prediction, passed_on = fusion(x, residual, (8, 8))
    assert prediction.shape == (2, 6, 8, 8) and passed_on.shape == (2, 4, 8, 8)
    # By hand: conv1, nearest-upsampled residual, sigmoid attention weights, nearest upsampling, conv2.
    mid = fusion.conv1(x)
    up = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    weights = torch.sigmoid(fusion.attention[0](torch.cat([mid, up], 1)))
    fused = mid * weights[:, :1] + up * weights[:, 1:]
    fused = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(passed_on, fused)
    torch.testing.assert_close(prediction, fusion.conv2(fused))


def test_reviewkd_pair_with_different_depths_is_a_clear_error():
    student = NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 8), stages=[torch.zeros(2, 4, 8, 8)] * 4)
    teacher = NetworkOutput(
        torch.zeros(2, 10), torch.zeros(2, 8), preact_stages=[torch.zeros(2, 4, 8, 8)] * 5
    )
    with pytest.raises(UserError, match="student has 4 .* teacher 5"):
        ReviewKD().setup(student, teacher)


def test_reviewkd_reads_timm_resnets_with_preact_teacher_stages():
    method, student_out, teacher_out = review_pair("resnet18", "resnet34", ReviewKD(student_preact=True))
    assert [f.conv1[0].in_channels for f in method.fusions] == [64, 128, 256, 512, 512]  # methods.md c
    value = method(student_out, teacher_out, torch.tensor([0, 1, 2]))
    assert value.dim() == 0 and torch.isfinite(value)


def deit_outputs():
    student = NetworkOutput(
        logits=torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]),
        distill_logits=torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]),
    )
    teacher = NetworkOutput(logits=torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]))
    return student, teacher, torch.tensor([0, 2])


def test_deit_hard_distillation_is_ce_of_the_second_head_to_the_teacher_argmax():
    student, teacher, targets = deit_outputs()
    value = DistillationToken("hard")(student, teacher, targets)
    # By hand: teacher argmax (1, 0); -log softmax(distill)[argmax], averaged.
    first = -(1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0))
    second = -(1.0 - torch.logsumexp(torch.tensor([1.0, -1.0, 2.0]), 0))
    torch.testing.assert_close(value, (first + second) / 2)
    # the shared ce trains the class head: by hand, -log softmax(logits)[y] with y = (0, 2), averaged
    ce = CrossEntropy()(student, teacher, targets)
    by_hand = -(2.0 - torch.logsumexp(torch.tensor([2.0, 0.0, -1.0]), 0))
    by_hand = (by_hand - (0.0 - torch.logsumexp(torch.tensor([0.5, 0.5, 0.0]), 0))) / 2
    torch.testing.assert_close(ce, by_hand)


def test_deit_soft_distillation_divides_the_summed_kl_by_batch_times_classes():
    student, teacher, targets = deit_outputs()
    t = 2.0
    p_t = torch.softmax(teacher.logits / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student.distill_logits / t, 1))).sum()
    value = DistillationToken("soft", temperature=t)(student, teacher, targets)
    torch.testing.assert_close(value, kl * t**2 / 6)


def deit_student_and_resnet18_teacher(method):
    deit = create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1).eval()
    teacher = create_model("resnet18", 10).eval()
    student_out = extract_features(deit, IMAGES, method.student_features)
    with torch.no_grad():
        teacher_out = extract_features(teacher, IMAGES, method.teacher_features)
    return student_out, teacher_out


def test_kd_at_temperature_1_trains_the_deit_distillation_head():
    # SRD's and VkD's DeiT code: KL(T=1) of the second head to the teacher, batchmean.
    method = HintonKD(temperature=1.0, student_logits="distill_logits")
    assert method.student_features == {"logits", "distill_logits"}
    student_out, teacher_out = deit_student_and_resnet18_teacher(method)
    assert not torch.allclose(student_out.distill_logits, student_out.logits)
    value = method(student_out, teacher_out, torch.tensor([0, 1, 2]))
    p_t = torch.softmax(teacher_out.logits, 1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(student_out.distill_logits, 1))).sum() / 3
    torch.testing.assert_close(value, by_hand)
    kd = F.kl_div(
        torch.log_softmax(student_out.distill_logits, 1), torch.softmax(teacher_out.logits, 1),
        reduction="batchmean",
    )  # fmt: skip
    torch.testing.assert_close(value, kd)
    with pytest.raises(ValueError, match="student_logits must be one of"):
        HintonKD(student_logits="head_dist")


@pytest.mark.parametrize("cls", [SimpleRecipeDistillation, OrthogonalProjection])
def test_srd_and_vkd_read_the_deit_patch_mean(cls):
    method = cls(student_embedding="patch_mean")
    assert method.student_features == {"patch_mean"} and method.teacher_features == {"embedding"}
    student_out, teacher_out = deit_student_and_resnet18_teacher(method)
    method.setup(student_out, teacher_out)
    assert method.projector.weight.shape == (512, 192)  # resnet18's 512-d embedding <- DeiT-Ti's 192
    value = method(student_out, teacher_out, torch.tensor([0, 1, 2]))
    assert value.dim() == 0 and torch.isfinite(value)
    # the term reads patch_mean: the same value from a NetworkOutput holding nothing else
    only_patch_mean = NetworkOutput(logits=None, patch_mean=student_out.patch_mean)
    torch.testing.assert_close(method(only_patch_mean, teacher_out, torch.tensor([0, 1, 2])), value)
    with pytest.raises(ValueError, match="student_embedding must be one of"):
        cls(student_embedding="tokens")


def test_method_modules_follow_the_training_module_to_another_dtype():
    """Projectors, ABFs and frozen statistics buffers are submodules/buffers of the training module, so
    `.to(dtype)` (what Lightning does for precision and devices) reaches them."""
    from kd_experiments.module import DistillationModule

    for objectives in (
        {"ce": CrossEntropy(), "reviewkd": ReviewKD()},
        {
            "ce": CrossEntropy(),
            "l2": L2Mimicking(force_projection=True),
            "lsh": LSHMimicking(force_projection=True),
        },
    ):
        method = Objectives(objectives)
        weights = LossWeights(dict.fromkeys(objectives, 1.0))
        student, teacher = create_model("resnet8", 10), create_model("resnet20", 10).eval()
        student_out = extract_features(student.eval(), IMAGES, method.student_features | {"logits"})
        teacher_out = extract_features(teacher, IMAGES, method.teacher_features)
        adapted = method.adapt_student(student, student_out, teacher_out)
        method.setup(extract_features(adapted, IMAGES, method.student_features | {"logits"}), teacher_out)
        if "lsh" in objectives:
            assert adapted is not student  # feat_fc, forced: part of the student, cast with it
            objectives["lsh"].set_teacher_statistics(
                {"hash_weight": torch.randn(8, 64), "hash_bias": torch.zeros(8)}
            )
        module = DistillationModule(
            student=adapted, method=method, loss_weights=weights, optimizer=torch.optim.SGD,
            num_classes=10, teacher=teacher,
        ).double()  # fmt: skip
        tensors = [*method.parameters(), *method.buffers(), *adapted.parameters(), *teacher.parameters()]
        assert tensors and all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
        assert {id(p) for p in method.parameters()} <= {id(p) for p in module.parameters()}
