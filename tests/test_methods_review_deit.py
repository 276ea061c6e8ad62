"""ReviewKD (ABF chain + HCL), the DeiT distillation token, and SRD/VkD reading a DeiT student's tokens."""

import hydra
import pytest
import torch
import torch.nn.functional as F

from kd_experiments.errors import UserError
from kd_experiments.losses import hcl_loss
from kd_experiments.methods.compose import Compose
from kd_experiments.methods.deit import DistillationToken
from kd_experiments.methods.nd import NormDirection
from kd_experiments.methods.reviewkd import AttentionFusion, ReviewKD
from kd_experiments.methods.srd import SimpleRecipeDistillation
from kd_experiments.methods.vkd import OrthogonalProjection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput
from tests.conftest import compose_config

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


def test_reviewkd_term_is_warmed_hcl_of_the_chain_and_trains_every_fusion():
    method, student_out, teacher_out = review_pair("resnet8", "resnet20")
    targets = torch.tensor([1, 2, 3])
    method.epoch = 0  # base 1, W 20: weight 1/20 in the first epoch
    terms = method(student_out, teacher_out, targets)
    expected = hcl_loss(method.review(method._levels(student_out, False)), method._levels(teacher_out, True))
    torch.testing.assert_close(terms["reviewkd"], expected / 20)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student_out.logits, targets))
    method.epoch = 30
    torch.testing.assert_close(method(student_out, teacher_out, targets)["reviewkd"], expected)
    terms["reviewkd"].backward()
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
    terms = method(student_out, teacher_out, torch.tensor([0, 1, 2]))
    assert torch.isfinite(terms["reviewkd"])


def deit_outputs():
    student = NetworkOutput(
        logits=torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]),
        distill_logits=torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]),
    )
    teacher = NetworkOutput(logits=torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]))
    return student, teacher, torch.tensor([0, 2])


def test_deit_hard_distillation_is_ce_of_the_second_head_to_the_teacher_argmax():
    student, teacher, targets = deit_outputs()
    terms = DistillationToken("hard")(student, teacher, targets)
    # By hand: teacher argmax (1, 0); -log softmax(distill)[argmax], averaged.
    first = -(1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0))
    second = -(1.0 - torch.logsumexp(torch.tensor([1.0, -1.0, 2.0]), 0))
    torch.testing.assert_close(terms["distill"], (first + second) / 2)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student.logits, targets))


def test_deit_soft_distillation_divides_the_summed_kl_by_batch_times_classes():
    student, teacher, targets = deit_outputs()
    t = 2.0
    p_t = torch.softmax(teacher.logits / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student.distill_logits / t, 1))).sum()
    terms = DistillationToken("soft", temperature=t)(student, teacher, targets)
    torch.testing.assert_close(terms["distill"], kl * t**2 / 6)


def test_srd_and_vkd_read_the_deit_patch_mean_and_second_head():
    deit = create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1).eval()
    teacher = create_model("resnet18", 10).eval()
    for method in (
        SimpleRecipeDistillation(student_embedding="patch_mean", kd_logits="distill_logits"),
        OrthogonalProjection(student_embedding="patch_mean", kd_logits="distill_logits"),
    ):
        assert method.student_features == {"logits", "patch_mean", "distill_logits"}
        student_out = extract_features(deit, IMAGES, method.student_features)
        with torch.no_grad():
            teacher_out = extract_features(teacher, IMAGES, method.teacher_features)
        method.setup(student_out, teacher_out)
        assert method.projector.weight.shape == (512, 192)
        terms = method(student_out, teacher_out, torch.tensor([0, 1, 2]))
        kd = F.kl_div(
            torch.log_softmax(student_out.distill_logits, 1), torch.softmax(teacher_out.logits, 1),
            reduction="batchmean",
        )  # fmt: skip
        torch.testing.assert_close(terms["kd"], kd)
    with pytest.raises(ValueError, match="student_embedding must be one of"):
        OrthogonalProjection(student_embedding="tokens")


@pytest.mark.parametrize(
    "name, weights",
    [
        ("reviewkd", {"ce": 1.0, "reviewkd": 5.0}),
        ("reviewkd++", {"ce": 1.0, "reviewkd": 1.2, "nd": 1.0}),
        ("deit", {"ce": 0.5, "distill": 0.5}),
    ],
)
def test_yaml_composes_with_the_paper_defaults(name, weights):
    cfg = compose_config(f"method={name}")
    objective = hydra.utils.instantiate(cfg.method.objective)
    assert dict(cfg.method.weights) == weights == dict.fromkeys(objective.loss_terms, 0) | weights
    if name == "reviewkd++":
        assert isinstance(objective, Compose) and isinstance(objective.objectives[1], NormDirection)
        assert objective.objectives[0].warmup_epoch_base == 0  # ND's scripts count epochs from 0
    if name == "reviewkd":
        assert (objective.warmup_epochs, objective.warmup_epoch_base) == (20, 1)  # mdistiller
        assert (objective.student_preact, objective.teacher_preact) == (False, True)


def test_method_modules_follow_the_training_module_to_another_dtype():
    """Projectors, ABFs and frozen statistics buffers are submodules/buffers of the training module, so
    `.to(dtype)` (what Lightning does for precision and devices) reaches them."""
    from kd_experiments.methods.lshfm import LSHFeatureMimicking
    from kd_experiments.module import DistillationModule

    for method, weights in (
        (ReviewKD(), {"ce": 1.0, "reviewkd": 1.0}),
        (LSHFeatureMimicking(force_projection=True), {"ce": 1.0, "l2": 1.0, "lsh": 1.0}),
    ):
        student, teacher = create_model("resnet8", 10), create_model("resnet20", 10).eval()
        student_out = extract_features(student.eval(), IMAGES, method.student_features | {"logits"})
        teacher_out = extract_features(teacher, IMAGES, method.teacher_features)
        adapted = method.adapt_student(student, student_out, teacher_out)
        method.setup(extract_features(adapted, IMAGES, method.student_features | {"logits"}), teacher_out)
        if isinstance(method, LSHFeatureMimicking):
            method.set_teacher_statistics({"hash_weight": torch.randn(8, 64), "hash_bias": torch.zeros(8)})
        module = DistillationModule(
            student=adapted, method=method, loss_weights=weights, optimizer=torch.optim.SGD,
            num_classes=10, teacher=teacher,
        ).double()  # fmt: skip
        tensors = [*method.parameters(), *method.buffers(), *adapted.parameters(), *teacher.parameters()]
        assert tensors and all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
        assert {id(p) for p in method.parameters()} <= {id(p) for p in module.parameters()}
