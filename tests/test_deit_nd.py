"""DeiT++ (the ND paper's RegNetY -> DeiT-B run): the student embedding and logits read from a two-headed
DeiT, the warm-up of the distillation-token term, ND on Mixup/CutMix targets, and the composed `deit++`
method."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_experiments.assembly import build_method
from kd_experiments.errors import UserError
from kd_experiments.losses import nd_loss
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.methods.deit import DistillationToken
from kd_experiments.methods.nd import EmbeddingProjector, NormDirection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput
from tests.conftest import compose_config

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_distilled_deit():
    torch.manual_seed(0)
    return create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1).eval()


def test_two_headed_deit_embedding_is_the_mean_of_class_and_distillation_tokens():
    # ND's ImageNet/DeiT/Models/deit.py: emb = (x[:, 0] + x[:, 1]) / 2 after the final norm.
    deit = tiny_distilled_deit()
    out = extract_features(deit, IMAGES, frozenset({"embedding", "class_token", "distill_logits"}))
    tokens = deit.forward_features(IMAGES)  # class token, distillation token, 16 patch tokens; normed
    assert tokens.shape == (4, 18, 192)
    torch.testing.assert_close(out.embedding, (tokens[:, 0] + tokens[:, 1]) / 2)
    torch.testing.assert_close(out.class_token, tokens[:, 0])
    assert not torch.allclose(out.embedding, out.class_token)


def test_two_headed_deit_logits_are_the_deployed_mean_unless_the_second_head_is_trained():
    deit = tiny_distilled_deit()
    tokens = deit.forward_features(IMAGES)
    class_head, distill_head = deit.head(tokens[:, 0]), deit.head_dist(tokens[:, 1])
    assert not torch.allclose(class_head, distill_head)
    # Only logits (CE, KD on the one-head tap, ...): what validation scores, timm's eval output.
    deployed = extract_features(deit, IMAGES, frozenset({"logits"}))
    with torch.no_grad():
        eval_output = deit(IMAGES)
    torch.testing.assert_close(eval_output, (class_head + distill_head) / 2)
    torch.testing.assert_close(deployed.logits, eval_output)
    assert deployed.distill_logits is None
    # With distill_logits: logits is the class head (CE's), distill_logits the second head.
    both = extract_features(deit, IMAGES, frozenset({"logits", "distill_logits"}))
    torch.testing.assert_close(both.logits, class_head)
    torch.testing.assert_close(both.distill_logits, distill_head)


def test_a_one_headed_student_has_no_distill_logits():
    cnn = create_model("resnet8", 10).eval()
    with pytest.raises(UserError, match="one head") as error:
        extract_features(cnn, IMAGES, frozenset({"logits", "distill_logits"}))
    assert "\n" not in str(error.value)
    single_vit = create_model("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(UserError, match="one head"):
        extract_features(single_vit, IMAGES, frozenset({"distill_logits"}))


@pytest.mark.parametrize(
    ("base", "weights"),
    [
        (0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]),  # ND DeiT++: min(1, epoch / 5), epochs from 0
        (1, [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]),  # mdistiller-style counting from 1
    ],
)
def test_deit_distill_term_warm_up_weights_per_epoch(base, weights):
    student = NetworkOutput(
        logits=torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]),
        distill_logits=torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]),
    )
    teacher = NetworkOutput(logits=torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]))
    targets = torch.tensor([0, 2])
    # By hand: teacher argmax (1, 0); CE of the distillation head to it.
    full = -(1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0))
    full = (full - (1.0 - torch.logsumexp(torch.tensor([1.0, -1.0, 2.0]), 0))) / 2
    ce = F.cross_entropy(student.logits, targets)
    method = Objectives({"ce": CrossEntropy(), "distill": DistillationToken("hard")})
    terms = method(student, teacher, targets)
    torch.testing.assert_close(terms["distill"], full)  # the term itself knows no epoch
    torch.testing.assert_close(terms["ce"], ce)
    loss_weights = LossWeights({"ce": 1.0, "distill": 1.0}, {"distill": {"epochs": 5, "epoch_base": base}})
    for epoch, weight in enumerate(weights):
        at = loss_weights.at(epoch)
        assert at == {"ce": 1.0, "distill": pytest.approx(weight)}  # the class-head CE is never warmed up
        total = sum(at[name] * value for name, value in terms.items())
        torch.testing.assert_close(total, ce + full * weight)
    no_warmup = LossWeights({"ce": 1.0, "distill": 1.0})  # DeiT itself
    assert all(no_warmup.at(epoch)["distill"] == 1.0 for epoch in range(len(weights)))


def test_nd_mixes_the_class_centre_like_soft_targets():
    # K = 2 centres c0 = (2, 0), c1 = (0, 1); target (0.75, 0.25) -> centre (1.5, 0.25), normalised after
    # mixing. Student (3, 4) has norm 5 > the teacher's 1, so the term is 1 - <s, e> / 5.
    centres = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    expected = 1 - (3 * 1.5 + 4 * 0.25) / (5 * math.sqrt(1.5**2 + 0.25**2))
    value = nd_loss(student, teacher, torch.tensor([[0.75, 0.25]]), centres)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    # One-hot soft targets give the hard-label loss.
    torch.testing.assert_close(
        nd_loss(student, teacher, torch.tensor([[0.0, 1.0]]), centres),
        nd_loss(student, teacher, torch.tensor([1]), centres),
    )


@pytest.mark.parametrize("tap", ["embedding", "class_token", "patch_mean"])
def test_nd_reads_the_configured_student_embedding(tap):
    deit = tiny_distilled_deit()
    method = NormDirection(student_embedding=tap, projector_init="imagenet")
    assert method.student_features == {tap}
    student = extract_features(deit, IMAGES, method.student_features)
    teacher = NetworkOutput(torch.zeros(4, 10), embedding=torch.randn(4, 24))
    method.setup(student, teacher)
    assert isinstance(method.projector, EmbeddingProjector) and method.projector[2].in_features == 192
    centres = torch.randn(10, 24)
    method.set_teacher_statistics({"class_centers": centres})
    method.eval()  # no dropout in the projector
    targets = torch.tensor([0, 1, 2, 3])
    expected = nd_loss(method.projector(getattr(student, tap)), teacher.embedding, targets, centres)
    torch.testing.assert_close(method(student, teacher, targets), expected)


def test_nd_student_embedding_is_validated_and_a_cnn_has_no_tokens():
    with pytest.raises(ValueError, match="student_embedding must be one of"):
        NormDirection(student_embedding="tokens")
    cnn = create_model("resnet8", 10).eval()
    with pytest.raises(UserError, match="not ViT tokens") as error:
        extract_features(cnn, IMAGES, NormDirection(student_embedding="class_token").student_features)
    assert "\n" not in str(error.value)


def test_deit_plus_plus_yaml_composes_and_trains_on_mixed_targets():
    method, loss_weights = build_method(compose_config("method=deit++").method)
    assert isinstance(method, Objectives) and method.terms == ("ce", "distill", "nd")
    assert loss_weights.weights == {"ce": 1.0, "distill": 0.5, "nd": 1.5}
    ce_term, token, nd = method.objectives.values()
    assert isinstance(ce_term, CrossEntropy) and isinstance(token, DistillationToken)
    assert token.kind == "hard" and loss_weights.warmup == {"distill": (5, 0)}  # ND is not warmed up
    assert (nd.student_embedding, nd.projector_init) == ("embedding", "imagenet")
    assert method.student_features == {"logits", "distill_logits", "embedding"}
    assert method.teacher_features == {"logits", "embedding"}

    deit, teacher_net = tiny_distilled_deit(), create_model("resnet18", 10).eval()
    student = extract_features(deit, IMAGES, method.student_features)
    with torch.no_grad():
        teacher = extract_features(teacher_net, IMAGES, method.teacher_features)
    method.setup(student, teacher)
    assert nd.projector[2].weight.shape == (512, 192)  # EmbTrans 192 -> 512 (DeiT-B: 768 -> 3024)
    centres = torch.randn(10, 512)
    nd.set_teacher_statistics({"class_centers": centres})
    method.eval()
    lam = 0.7  # Mixup of each sample with the flipped batch, smoothing 0.1 over 10 classes
    labels = torch.tensor([0, 1, 2, 3])
    one_hot = F.one_hot(labels, 10).float() * 0.9 + 0.01
    targets = lam * one_hot + (1 - lam) * one_hot.flip(0)
    terms = method(student, teacher, targets)
    ce = -(targets * torch.log_softmax(student.logits, 1)).sum(1).mean()  # timm's SoftTargetCrossEntropy
    torch.testing.assert_close(terms["ce"], ce)
    hard = F.cross_entropy(student.distill_logits, teacher.logits.argmax(1))
    torch.testing.assert_close(terms["distill"], hard)
    mixed = nd_loss(nd.projector(student.embedding), teacher.embedding, targets, centres)
    torch.testing.assert_close(terms["nd"], mixed)
    direction = F.normalize(targets @ centres, dim=1)  # the same by hand
    by_hand = 1 - (nd.projector(student.embedding) * direction).sum(1) / torch.maximum(
        nd.projector(student.embedding).norm(dim=1), teacher.embedding.norm(dim=1)
    )
    torch.testing.assert_close(terms["nd"], by_hand.mean())
    # epoch 2 of the distillation term's warm-up (5 epochs from 0): weight 0.5 * 2 / 5
    at = loss_weights.at(2)
    assert at == {"ce": 1.0, "distill": pytest.approx(0.2), "nd": 1.5}
    total = sum(at[name] * value for name, value in terms.items())
    torch.testing.assert_close(total, ce + 0.2 * hard + 1.5 * by_hand.mean())
