"""Method modules: warm-up conventions and loss weights, objectives assembled with the shared `ce`, every
method YAML composing to its objectives, ND's teacher statistics and projector, the training module
applying the weights and warm-ups, and every method running end to end with its loss terms in the logs."""

import csv
import functools
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from kd_experiments.assembly import build_method
from kd_experiments.data.digits import DigitsData
from kd_experiments.errors import UserError
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives, assemble, linear_warmup
from kd_experiments.methods.deit import DistillationToken
from kd_experiments.methods.dist import RelationKD
from kd_experiments.methods.dkd import DecoupledKD
from kd_experiments.methods.fitnet import FitNet
from kd_experiments.methods.kd import HintonKD
from kd_experiments.methods.lshfm import L2Mimicking, LSHMimicking
from kd_experiments.methods.nd import EmbeddingProjector, NormDirection
from kd_experiments.methods.reviewkd import ReviewKD
from kd_experiments.methods.srd import SimpleRecipeDistillation
from kd_experiments.methods.vkd import OrthogonalProjection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput
from kd_experiments.module import DistillationModule
from kd_experiments.teachers import Teacher, prepare_teacher_statistics
from tests.conftest import REPO, compose_config, run_cli

# ------------------------------------------------------------------------------------- warm-up and weights


def test_warmup_epoch_conventions():
    assert linear_warmup(0, 20, epoch_base=1) == pytest.approx(1 / 20)  # mdistiller: epochs count from 1
    assert linear_warmup(0, 20, epoch_base=0) == 0.0  # ND / ReviewKD scripts: from 0
    assert linear_warmup(19, 20, epoch_base=1) == 1.0
    assert linear_warmup(19, 20, epoch_base=0) == pytest.approx(19 / 20)
    assert linear_warmup(0, 0) == 1.0


def test_dkd_warmup_gives_the_term_1_20_of_its_weight_in_epoch_0_and_10_20_in_epoch_9():
    student = NetworkOutput(logits=torch.randn(4, 10))
    teacher = NetworkOutput(logits=torch.randn(4, 10))
    targets = torch.tensor([0, 1, 2, 3])
    objective = DecoupledKD()
    term = objective(student, teacher, targets)
    assert term.dim() == 0 and term.item() > 0
    torch.testing.assert_close(objective(student, teacher, targets), term)  # the objective holds no epoch
    weights = LossWeights({"ce": 1.0, "kd": 2.0}, {"kd": {"epochs": 20, "epoch_base": 1}})
    assert weights.terms == ("ce", "kd")
    assert weights.at(0) == {"ce": 1.0, "kd": pytest.approx(2.0 * 1 / 20)}
    assert weights.at(9) == {"ce": 1.0, "kd": pytest.approx(2.0 * 10 / 20)}
    assert weights.at(19) == {"ce": 1.0, "kd": 2.0} == weights.at(100)
    assert weights.at(9)["kd"] * term.item() == pytest.approx(10 * weights.at(0)["kd"] * term.item())


@pytest.mark.parametrize("term", ["nd", "reviewkd"])
def test_warmup_counted_from_0_gives_no_weight_in_the_first_epoch(term):
    # ND's and ReviewKD's scripts: min(epoch / W, 1) with epochs from 0.
    weights = LossWeights({"ce": 1.0, term: 1.5}, {term: {"epochs": 5, "epoch_base": 0}})
    assert weights.at(0) == {"ce": 1.0, term: 0.0}
    assert weights.at(2)[term] == pytest.approx(1.5 * 2 / 5)
    assert weights.at(5)[term] == weights.at(50)[term] == 1.5


def test_weights_without_warmup_are_constant():
    weights = LossWeights({"ce": 0.1, "kd": 0.9})
    assert weights.warmup == {} and weights.terms == ("ce", "kd")
    assert weights.at(0) == weights.at(7) == {"ce": 0.1, "kd": 0.9}
    assert LossWeights({"ce": 1, "kd": 0}).at(0) == {"ce": 1.0, "kd": 0.0}  # ints are numbers too
    # epochs: 0 is no warm-up, whatever the base
    assert LossWeights({"kd": 2.0}, {"kd": {"epochs": 0, "epoch_base": 0}}).at(0) == {"kd": 2.0}


@pytest.mark.parametrize(
    ("weights", "warmup", "names"),
    [
        ({"ce": 1.0, "kd": math.nan}, None, "method.weights.kd"),
        ({"ce": 1.0, "kd": math.inf}, None, "method.weights.kd"),
        ({"ce": -math.inf, "kd": 1.0}, None, "method.weights.ce"),
        ({"ce": 1.0, "kd": "0.9"}, None, "method.weights.kd"),
        ({"ce": 1.0, "kd": None}, None, "method.weights.kd"),
        ({"ce": 1.0, "kd": 1.0}, {"nd": {"epochs": 5, "epoch_base": 0}}, "method.warmup.nd"),
        ({"ce": 1.0, "kd": 1.0}, {"kd": {"epochs": 5, "epoch_base": 2}}, "method.warmup.kd"),
        ({"ce": 1.0, "kd": 1.0}, {"kd": {"epochs": -1, "epoch_base": 0}}, "method.warmup.kd"),
        ({"ce": 1.0, "kd": 1.0}, {"kd": {"epochs": 2.5, "epoch_base": 0}}, "method.warmup.kd"),
        ({"ce": 1.0, "kd": 1.0}, {"kd": {"epoch": 5}}, "method.warmup.kd"),
    ],
    ids=["nan", "inf", "minus-inf", "string", "null", "unweighted", "base-2", "negative", "float", "typo"],
)
def test_loss_weights_reject_bad_values_in_one_line_naming_the_key(weights, warmup, names):
    with pytest.raises(UserError) as error:
        LossWeights(weights, warmup)
    message = str(error.value)
    assert names in message and "\n" not in message


# ------------------------------------------------------------------------------------ objectives, assemble


def test_assemble_adds_the_shared_ce_only_when_weighted():
    method = assemble({"kd": HintonKD(), "nd": NormDirection()}, LossWeights({"ce": 1, "kd": 1, "nd": 2}))
    assert isinstance(method, Objectives) and method.terms == ("ce", "kd", "nd")
    assert type(method.objectives["ce"]) is CrossEntropy
    assert method.student_features == {"logits", "embedding"}
    assert method.teacher_features == {"logits", "embedding"}
    without_ce = assemble({"kd": HintonKD(), "nd": NormDirection()}, LossWeights({"kd": 1, "nd": 2}))
    assert without_ce.terms == ("kd", "nd") and "ce" not in without_ce.objectives
    only_ce = assemble({}, LossWeights({"ce": 1.0}))  # method=ce
    assert only_ce.terms == ("ce",) and only_ce.teacher_features == frozenset()


def test_assemble_needs_exactly_one_weight_per_term():
    with pytest.raises(UserError, match=r"\['ce', 'kd'\].*\['ce', 'kd', 'nd'\]") as error:
        assemble({"kd": HintonKD()}, LossWeights({"ce": 1.0, "kd": 1.0, "nd": 1.0}))  # weight, no objective
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"\['ce', 'kd', 'nd'\].*\['ce', 'kd'\]"):
        assemble({"kd": HintonKD(), "nd": NormDirection()}, LossWeights({"ce": 1.0, "kd": 1.0}))
    with pytest.raises(UserError, match="method.objectives.kd builds a Linear"):
        Objectives({"kd": torch.nn.Linear(2, 2)})


def test_objectives_union_the_features_of_their_terms():
    deit_terms = Objectives(
        {
            "ce": CrossEntropy(),
            "kd": HintonKD(temperature=1.0, student_logits="distill_logits"),
            "srd": SimpleRecipeDistillation(student_embedding="patch_mean"),
        }
    )
    assert deit_terms.student_features == {"logits", "distill_logits", "patch_mean"}
    assert deit_terms.teacher_features == {"logits", "embedding"}
    review = Objectives({"reviewkd": ReviewKD(student_preact=True), "fitnet": FitNet()})
    assert review.student_features == {"logits", "embedding", "preact_stages", "stages"}
    assert review.teacher_features == {"embedding", "preact_stages", "stages"}


def test_objectives_set_up_every_term_and_return_each_term_unweighted():
    method = Objectives({"ce": CrossEntropy(), "srd": SimpleRecipeDistillation(), "nd": NormDirection()})
    student = NetworkOutput(torch.randn(4, 10), embedding=torch.randn(4, 16))
    teacher = NetworkOutput(torch.randn(4, 10), embedding=torch.randn(4, 32))
    method.setup(student, teacher)  # fans out: both projectors sized 16 -> 32
    srd, nd = method.objectives["srd"], method.objectives["nd"]
    assert (srd.projector.in_features, srd.projector.out_features) == (16, 32)
    assert isinstance(nd.projector, EmbeddingProjector) and nd.projector[2].out_features == 32
    nd.set_teacher_statistics({"class_centers": torch.randn(10, 32)})
    method.eval()
    targets = torch.tensor([0, 1, 2, 3])
    terms = method(student, teacher, targets)
    assert tuple(terms) == ("ce", "srd", "nd")
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(student.logits, targets))
    for name, objective in method.objectives.items():
        torch.testing.assert_close(terms[name], objective(student, teacher, targets))


# -------------------------------------------------------------------------------------- method YAMLs

# The classification methods (a YAML with `task: detection` or `multilabel` has its own tests).
METHOD_YAMLS = sorted(
    path.stem
    for path in (REPO / "conf/method").glob("*.yaml")
    if "\ntask:" not in path.read_text() or "\ntask: classification" in path.read_text()
)
ND = (NormDirection, {"student_embedding": "embedding", "projector_init": "cifar"})
# The values each YAML holds today (the papers' defaults): weights, warm-ups ({term: (epochs, base)}) and,
# per term, the objective's class and options.
YAML_EXPECTED = {
    "ce": {"weights": {"ce": 1.0}, "objectives": {}},
    "kd": {
        "weights": {"ce": 0.1, "kd": 0.9},
        "objectives": {"kd": (HintonKD, {"temperature": 4.0, "student_logits": "logits"})},
    },
    "kd++": {
        "weights": {"ce": 1.0, "kd": 1.0, "nd": 2.0},
        "warmup": {"kd": (20, 0)},
        "objectives": {"kd": (HintonKD, {"temperature": 4.0, "student_logits": "logits"}), "nd": ND},
    },
    "dkd": {
        "weights": {"ce": 1.0, "kd": 1.0},
        "warmup": {"kd": (20, 1)},  # mdistiller counts epochs from 1
        "objectives": {"kd": (DecoupledKD, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0})},
    },
    "dkd++": {
        "weights": {"ce": 1.0, "kd": 1.0, "nd": 3.5},
        "warmup": {"kd": (20, 0)},
        "objectives": {"kd": (DecoupledKD, {"alpha": 2.5, "beta": 4.0, "temperature": 4.0}), "nd": ND},
    },
    "dist": {
        "weights": {"ce": 1.0, "kd": 2.0},
        "warmup": {"kd": (20, 0)},
        "objectives": {"kd": (RelationKD, {"beta": 1.0, "gamma": 1.0, "temperature": 4.0})},
    },
    "dist++": {
        "weights": {"ce": 1.0, "kd": 2.0, "nd": 1.0},
        "warmup": {"kd": (20, 0)},
        "objectives": {"kd": (RelationKD, {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}), "nd": ND},
    },
    "fitnet": {
        "weights": {"ce": 1.0, "fitnet": 100.0},
        "objectives": {"fitnet": (FitNet, {"target": "stage", "hint_layer": 2})},
    },
    "reviewkd": {
        "weights": {"ce": 1.0, "reviewkd": 5.0},
        "warmup": {"reviewkd": (20, 1)},  # mdistiller
        "objectives": {
            "reviewkd": (ReviewKD, {"student_preact": False, "teacher_preact": True, "max_mid_channels": 512})
        },
    },
    "reviewkd++": {
        "weights": {"ce": 1.0, "reviewkd": 1.2, "nd": 1.0},
        "warmup": {"reviewkd": (20, 0)},  # ND's scripts count epochs from 0
        "objectives": {"reviewkd": (ReviewKD, {"student_preact": False, "teacher_preact": True}), "nd": ND},
    },
    "deit": {
        "weights": {"ce": 0.5, "distill": 0.5},
        "objectives": {"distill": (DistillationToken, {"kind": "hard", "temperature": 1.0})},
    },
    "deit++": {
        "weights": {"ce": 1.0, "distill": 0.5, "nd": 1.5},
        "warmup": {"distill": (5, 0)},
        "objectives": {
            "distill": (DistillationToken, {"kind": "hard"}),
            "nd": (NormDirection, {"student_embedding": "embedding", "projector_init": "imagenet"}),
        },
    },
    "srd": {
        "weights": {"ce": 1.0, "kd": 1.0, "srd": 2.0},
        "objectives": {
            "kd": (HintonKD, {"temperature": 1.0, "student_logits": "logits"}),
            "srd": (
                SimpleRecipeDistillation,
                {"exponent": 4.0, "eps": 1e-4, "distance": "logsum", "student_embedding": "embedding"},
            ),
        },
    },
    "srd+nd": {
        "weights": {"ce": 1.0, "kd": 1.0, "srd": 2.0, "nd": 1.0},
        "objectives": {
            "kd": (HintonKD, {"temperature": 1.0}),
            "srd": (SimpleRecipeDistillation, {"exponent": 4.0, "distance": "logsum"}),
            "nd": ND,
        },
    },
    "vkd": {
        "weights": {"ce": 1.0, "kd": 1.0, "vkd": 1.0},
        "objectives": {
            "kd": (HintonKD, {"temperature": 1.0, "student_logits": "logits"}),
            "vkd": (
                OrthogonalProjection,
                {"projector_kind": "orthogonal", "normalize_teacher": True, "student_embedding": "embedding"},
            ),
        },
    },
    "l2": {  # LSHFM's "L2" baseline: non-selective, no LSH term
        "weights": {"ce": 1.0, "l2": 6.0},
        "objectives": {"l2": (L2Mimicking, {"selective": False, "force_projection": False})},
    },
    "lshfm": {  # the official CIFAR-100 default lshl2_s
        "weights": {"ce": 1.0, "l2": 6.0, "lsh": 6.0},
        "objectives": {
            "l2": (L2Mimicking, {"selective": True, "force_projection": False}),
            "lsh": (
                LSHMimicking,
                {
                    "selective": True,
                    "num_hashes": None,
                    "std": None,
                    "bias": "median",
                    "hash_seed": 0,
                    "force_projection": False,
                },
            ),
        },
    },
}


def test_every_yaml_with_expected_values_exists():
    assert len(METHOD_YAMLS) >= 17 and set(YAML_EXPECTED) <= set(METHOD_YAMLS)


def probe_features(method: Objectives) -> tuple[torch.nn.Module, NetworkOutput, NetworkOutput, torch.Tensor]:
    """Adapt and set up `method` on one small CPU batch as `train._setup_method` does, with hand-set teacher
    statistics: a tiny two-headed DeiT <- resnet8 on 32x32 RGB for the methods that train a distillation
    head, convnet_narrow <- convnet_wide on 8x8 digits otherwise."""
    torch.manual_seed(0)
    if "distill_logits" in method.student_features:
        student = create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1)
        teacher, images = create_model("resnet8", 10), torch.randn(4, 3, 32, 32)
    else:
        student = create_model("convnet_narrow", 10, in_chans=1)
        teacher, images = create_model("convnet_wide", 10, in_chans=1), torch.randn(4, 1, 8, 8)
    student_needs = method.student_features | {"logits"}
    with torch.no_grad():
        teacher_needs = method.teacher_features | {"logits", "embedding"}  # the embedding sizes statistics
        teacher_out = extract_features(teacher.eval(), images, teacher_needs)
        student_out = extract_features(student.eval(), images, student_needs)
    adapted = method.adapt_student(student, student_out, teacher_out)
    if adapted is not student:
        student_out = extract_features(adapted.eval(), images, student_needs)
    method.setup(student_out, teacher_out)
    teacher_dim = teacher_out.embedding.shape[1]
    for objective in method.objectives.values():
        if isinstance(objective, NormDirection):
            objective.set_teacher_statistics({"class_centers": torch.randn(10, teacher_dim)})
        if isinstance(objective, LSHMimicking):
            hashes = torch.randn(8, teacher_dim)
            median = (teacher_out.embedding @ hashes.T).median(dim=0).values
            objective.set_teacher_statistics({"hash_weight": hashes, "hash_bias": -median})
    method.eval()
    return adapted, student_out, teacher_out, teacher_out.logits.argmax(dim=1)  # the teacher is right


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_yaml_composes_to_weighted_objectives_that_run(name):
    cfg = compose_config(f"method={name}")
    method, weights = build_method(cfg.method)
    assert isinstance(method, Objectives) and isinstance(weights, LossWeights)
    assert set(method.terms) == set(weights.terms) == set(cfg.method.weights)
    assert all(isinstance(o, DistillationMethod) for o in method.objectives.values())
    if "ce" in weights.terms:  # the shared term
        assert type(method.objectives["ce"]) is CrossEntropy

    expected = YAML_EXPECTED.get(name)
    if expected is not None:
        assert weights.weights == expected["weights"]
        assert weights.warmup == expected.get("warmup", {})
        assert set(method.terms) == set(expected["objectives"]) | {"ce"}
        for term, (cls, options) in expected["objectives"].items():
            objective = method.objectives[term]
            assert type(objective) is cls, term
            assert {key: getattr(objective, key) for key in options} == options, term
        for term, (epochs, base) in weights.warmup.items():  # composed as such: the first epoch's weight
            assert weights.at(0)[term] == pytest.approx(weights.weights[term] * base / epochs)
            assert weights.at(epochs)[term] == weights.weights[term]

    _, student_out, teacher_out, targets = probe_features(method)
    with torch.no_grad():
        terms = method(student_out, teacher_out, targets)
    assert tuple(terms) == method.terms
    for term, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, term)


def test_yaml_objectives_read_the_deit_student_taps():
    # ${student.taps.*} resolves against the composed config: a two-headed DeiT student trains its second
    # head with the logit terms and gives SRD / VkD its mean patch token.
    for name, feature_term in (("srd", "srd"), ("vkd", "vkd")):
        method, _ = build_method(compose_config(f"method={name}", "student=deit_ti").method)
        assert method.objectives["kd"].student_logits == "distill_logits"
        assert method.objectives[feature_term].student_embedding == "patch_mean"
    for name in ("kd", "dkd", "dist", "kd++", "dkd++", "dist++"):
        method, _ = build_method(compose_config(f"method={name}", "student=deit_ti").method)
        assert method.objectives["kd"].student_logits == "distill_logits", name
        assert "distill_logits" in method.student_features


@pytest.mark.parametrize("name", ["kd", "kd++", "dkd++", "dkd", "dist", "dist++", "srd", "vkd"])
def test_one_key_sets_the_logit_temperature_of_single_and_composed_methods(name):
    # the logit term is `kd` in every method that has one, so the same override reaches it
    method, _ = build_method(compose_config(f"method={name}", "method.objectives.kd.temperature=2").method)
    assert method.objectives["kd"].temperature == 2.0, name
    default, _ = build_method(compose_config(f"method={name}").method)
    assert default.objectives["kd"].temperature != 2.0, name


# ------------------------------------------------------------------------------------------------------ ND


def digits_pair():
    data = DigitsData()
    data.setup()
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1).eval()
    return data, teacher


def test_nd_class_centres_are_the_teacher_class_means_and_are_cached(tmp_path):
    data, network = digits_pair()
    teacher = Teacher(network, identity={"arch": "convnet_wide", "sha256": "a" * 64})
    dataset_cfg = compose_config().dataset
    method = Objectives({"kd": HintonKD(), "nd": NormDirection()})
    prepare_teacher_statistics(method, teacher, dataset_cfg, data, str(tmp_path))
    centres = method.objectives["nd"].class_centers
    # by hand: the training images are shifted at random, so compare with the unshifted means loosely,
    # and exactly with a second pass that reads the cache
    images, labels = data.train_set.tensors
    with torch.no_grad():
        embeddings = extract_features(network, images, frozenset({"embedding"})).embedding
    for cls in range(10):
        expected = embeddings[labels == cls].mean(0)
        assert torch.nn.functional.cosine_similarity(centres[cls], expected, dim=0) > 0.95
    (cached,) = (tmp_path / "statistics").glob("class_centers-convnet_wide-*.pt")
    again = NormDirection()
    prepare_teacher_statistics(again, teacher, dataset_cfg, data, str(tmp_path))
    assert torch.equal(again.class_centers, centres)
    # another teacher never reads this cache
    other = Teacher(network, identity=teacher.identity | {"sha256": "b" * 64})
    prepare_teacher_statistics(NormDirection(), other, dataset_cfg, data, str(tmp_path))
    assert len(list((tmp_path / "statistics").glob("*.pt"))) == 2


def test_nd_is_zero_along_the_centre_and_builds_a_projector_only_when_dims_differ():
    method = NormDirection()
    method.setup(
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 16)),
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 256)),
    )
    assert isinstance(method.projector, EmbeddingProjector)
    assert method.projector[2].in_features == 16 and method.projector[2].out_features == 256
    same = NormDirection()
    same.setup(
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 8)),
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 8)),
    )
    assert isinstance(same.projector, torch.nn.Identity)
    same.set_teacher_statistics({"class_centers": torch.eye(8)[:3] * 5})
    student = NetworkOutput(
        torch.zeros(2, 3), embedding=torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0, 0, 0]])
    )
    teacher = NetworkOutput(torch.zeros(2, 3), embedding=torch.ones(2, 8) * 0.1)  # smaller norms
    value = same(student, teacher, torch.tensor([0, 1]))
    assert value.dim() == 0 and value.item() == pytest.approx(0.0, abs=1e-6)
    # off the centre: 1 - <s, e_c> / max(|s|, |t|) with e_1 = (0, 1, 0, ...): sample 0 gives 1 - 0 / 3
    off = same(student, teacher, torch.tensor([1, 1]))
    assert off.item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)


def test_nd_projector_is_trained_and_not_part_of_the_student(tmp_path):
    weights = LossWeights({"ce": 1.0, "kd": 1.0, "nd": 2.0})
    method = assemble({"kd": HintonKD(), "nd": NormDirection()}, weights)
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1).eval()
    probe = torch.randn(2, 1, 8, 8)
    method.setup(
        extract_features(student.eval(), probe, frozenset({"logits", "embedding"})),
        extract_features(teacher, probe, frozenset({"logits", "embedding"})),
    )
    module = DistillationModule(
        student=student, method=method, loss_weights=weights,
        optimizer=torch.optim.SGD, num_classes=10, teacher=teacher,
    )  # fmt: skip
    projector_params = {id(p) for p in method.objectives["nd"].projector.parameters()}
    assert projector_params and projector_params <= {id(p) for p in module.parameters()}
    assert not projector_params & {id(p) for p in student.parameters()}
    assert all(not k.startswith("student.") for k in module.state_dict() if "projector" in k)


def test_nd_imagenet_projector_init_and_warmup_counted_from_0():
    torch.manual_seed(0)
    method = NormDirection(projector_init="imagenet")
    student = NetworkOutput(torch.zeros(4, 10), embedding=torch.randn(4, 8))
    teacher = NetworkOutput(torch.zeros(4, 10), embedding=torch.randn(4, 32))
    method.setup(student, teacher)
    linear = method.projector[2]
    assert 0.005 < linear.weight.std().item() < 0.015 and linear.bias.abs().max().item() > 0
    method.set_teacher_statistics({"class_centers": torch.randn(10, 32)})
    method.eval()  # no dropout: compare the same projection at two epochs
    targets = torch.tensor([0, 1, 2, 3])
    full = method(student, teacher, targets)
    assert full.item() > 0
    weights = LossWeights({"ce": 1.0, "nd": 1.0}, {"nd": {"epochs": 5, "epoch_base": 0}})
    assert weights.at(0)["nd"] * full.item() == 0.0  # base 0: the first epoch has weight 0
    assert weights.at(2)["nd"] * full.item() == pytest.approx(full.item() * 2 / 5)
    assert weights.at(10)["nd"] == 1.0  # past the warm-up
    with pytest.raises(ValueError, match="projector_init"):
        NormDirection(projector_init="zeros").setup(student, teacher)


# ------------------------------------------------------------------------------------ the training module


class RecordLogged(pl.Callback):
    """The step values the module logged, read from `trainer.callback_metrics` after every batch."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append(
            {"epoch": trainer.current_epoch, "returned": outputs["loss"].item()}
            | {name: metrics[f"train/{name}"].item() for name in ("ce", "kd", "loss")}
        )


def test_module_weights_the_unweighted_terms_with_the_warmup_in_every_step(tmp_path):
    data = DigitsData(batch_size=64)
    data.setup()
    torch.manual_seed(0)
    module = DistillationModule(
        student=create_model("convnet_narrow", num_classes=10, in_chans=1),
        method=Objectives({"ce": CrossEntropy(), "kd": HintonKD(temperature=4.0)}),
        loss_weights=LossWeights({"ce": 1.0, "kd": 2.0}, {"kd": {"epochs": 4, "epoch_base": 0}}),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        num_classes=10,
        teacher=create_model("convnet_wide", num_classes=10, in_chans=1),
    )
    recorder = RecordLogged()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(
        max_epochs=6, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1, logger=logger,
        callbacks=[recorder], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)

    assert [row["epoch"] for row in recorder.rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    for row in recorder.rows:
        factor = min(row["epoch"] / 4, 1.0)  # base 0, W 4: 0, 1/4, 1/2, 3/4, 1, 1
        assert row["kd"] > 0.01 and row["ce"] > 0.01  # logged unweighted (kd is not 0 in epoch 0)
        assert row["loss"] == pytest.approx(row["ce"] + 2.0 * factor * row["kd"], rel=1e-6)
        assert row["returned"] == row["loss"]  # what the optimizer steps on is the logged weighted sum
    # the same in the CSV log, one row per step
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(logged) == 12
    for row in logged:
        ce, kd, loss = (float(row[f"train/{name}"]) for name in ("ce", "kd", "loss"))
        factor = min(int(row["epoch"]) / 4, 1.0)
        assert loss == pytest.approx(ce + 2.0 * factor * kd, rel=1e-6)
        assert kd > 0.01
    assert [float(r["train/loss"]) for r in logged] == pytest.approx([r["loss"] for r in recorder.rows])


@functools.cache
def method_terms() -> dict[str, list[str]]:
    """Every conf/method/*.yaml and its loss terms (the keys of its weights): a new method is in the
    end-to-end runs below without editing a list."""
    return {name: list(compose_config(f"method={name}").method.weights) for name in METHOD_YAMLS}


@functools.cache
def one_head_methods() -> dict[str, list[str]]:
    """The methods that train a one-headed student (all but those reading a DeiT's second head)."""

    def needs_two_heads(name: str) -> bool:
        method, _ = build_method(compose_config(f"method={name}").method)  # the default, one-head student
        return "distill_logits" in method.student_features

    return {name: terms for name, terms in method_terms().items() if not needs_two_heads(name)}


def token_methods() -> dict[str, list[str]]:
    return {name: method_terms()[name] for name in ("deit", "deit++", "vkd", "srd")}


SMALL_TIMM_DEIT = ["student=deit_ti", "+student.model_kwargs.img_size=32",
                   "+student.model_kwargs.patch_size=8", "+student.model_kwargs.depth=2"]  # fmt: skip
# Extra pairs: two epochs of two batches (and two validation batches); the default pair runs whole.
FEW_BATCHES = [
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
]
PAIRS = {
    # The embedded default pair (convnet_wide -> convnet_narrow, 8x8 digits).
    "default": (one_head_methods, []),
    # A CIFAR-zoo pair on 8x8 digits; the teacher's short CE recipe keeps the test fast.
    "cifar_zoo": (
        one_head_methods,
        [
            "teacher=resnet20",
            "student=resnet8",
            "teacher.recipe.max_epochs=2",
            *FEW_BATCHES,
        ],
    ),
    # A timm CNN pair on digits resized to 32x32 RGB.
    "timm_cnn": (
        one_head_methods,
        [
            "dataset.image_size=32",
            "dataset.channels=3",
            "teacher.arch=resnet18",
            "student.arch=resnet10t",
            "teacher.recipe.max_epochs=1",
            *FEW_BATCHES,
        ],
    ),  # fmt: skip
    # A timm CNN teacher and a two-headed DeiT student (its taps: patch mean, second head): the methods
    # that read tokens or train the second head.
    "timm_deit": (
        token_methods,
        [
            "dataset.image_size=32",
            "dataset.channels=3",
            "teacher.arch=resnet18",
            "teacher.recipe.max_epochs=1",
            *SMALL_TIMM_DEIT,
            *FEW_BATCHES,
        ],
    ),  # fmt: skip
}


def test_the_end_to_end_pairs_cover_every_method():
    assert {"deit", "deit++"} == set(method_terms()) - set(one_head_methods())
    assert set(one_head_methods()) >= {"ce", "kd", "dkd", "kd++", "lshfm", "reviewkd", "srd+nd"}


@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_runs_end_to_end_and_logs_its_terms(pair, workdir):
    select, overrides = PAIRS[pair]
    methods = select()
    result = run_cli(
        "-m", f"method={','.join(methods)}", *overrides, "trainer.max_epochs=2", "logger=csv", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = set()
    for job_dir in sorted(workdir.glob("outputs/multirun/*/*/*/")):
        summary = json.loads((job_dir / "summary.json").read_text())
        method = summary["method"]
        with open(job_dir / "csv/metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        for term in methods[method]:
            values = [float(r[f"train/{term}"]) for r in rows if r.get(f"train/{term}")]
            assert values and all(v == v for v in values), (method, term)  # logged and not NaN
        assert summary["status"] == "completed" and summary["epochs"] == 2
        seen.add(method)
    assert seen == set(methods)
