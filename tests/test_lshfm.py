"""LSHFM's two terms (`l2`: L2Mimicking, `lsh`: LSHMimicking): the frozen, reproducible hash layer and its
median bias, the selective average of each term, the student-side feat_fc that stays in the deployed student
(added once for both terms), and the method end to end with cached teacher statistics. (The YAMLs are
checked with every method's in test_methods.py.)"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kd_experiments.data.digits import DigitsData
from kd_experiments.errors import UserError
from kd_experiments.losses import feature_mse, lsh_loss
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives, assemble
from kd_experiments.methods.lshfm import L2Mimicking, LSHMimicking, ProjectedEmbeddingNetwork
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput
from tests.conftest import run_main_in_process

FEATURES = frozenset({"logits", "embedding"})


def teacher_and_loader(batch_size: int = 64):
    """A (randomly initialised) digits teacher, 256-d embedding, and its outputs over the training images
    without augmentation, batch by batch, so a test can recompute exactly what the statistics pass saw."""
    torch.manual_seed(0)
    data = DigitsData()
    data.setup()
    images, labels = data.train_set.tensors
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1).eval()
    # What the framework hands compute_teacher_statistics: the teacher's embedding and the labels per batch.
    with torch.no_grad():
        batches = [(extract_features(teacher, x, frozenset({"embedding"})), y) for x, y in loader]
    return teacher, batches


def teacher_embeddings(teacher, batches) -> torch.Tensor:
    return torch.cat([output.embedding for output, _ in batches])


# ------------------------------------------------------------------------------------------------ hash layer


def test_hash_layer_defaults_are_32_dt_rows_with_the_teacher_fc_std_and_frozen():
    teacher, loader = teacher_and_loader()
    method = LSHMimicking(bias="zero")
    method.set_teacher_statistics(method.compute_teacher_statistics(teacher, loader))
    weight, bias = method.hash_weight, method.hash_bias
    assert weight.shape == (32 * 256, 256) and bias.shape == (32 * 256,)
    assert torch.all(bias == 0)
    fc_std = teacher.get_classifier().weight.std().item()
    assert weight.std().item() == pytest.approx(fc_std, rel=0.05)
    # buffers, not parameters: never in the optimizer, no gradient
    assert list(method.parameters()) == []
    assert {name for name, _ in method.named_buffers()} == {"hash_weight", "hash_bias"}
    student_emb = torch.randn(4, 256, requires_grad=True)
    teacher_logits = torch.randn(4, 10)
    value = method(
        NetworkOutput(torch.randn(4, 10, requires_grad=True), student_emb),
        NetworkOutput(teacher_logits, torch.randn(4, 256)),
        teacher_logits.argmax(dim=1),  # the teacher is right on every sample
    )
    assert value.dim() == 0 and value.item() > 0
    value.backward()
    assert student_emb.grad is not None and student_emb.grad.abs().sum() > 0
    assert method.hash_weight.grad is None and method.hash_bias.grad is None
    assert not method.hash_weight.requires_grad


def test_hash_weight_is_reproducible_from_its_seed_and_std_can_be_set():
    teacher, loader = teacher_and_loader()

    def weight(**kwargs):
        method = LSHMimicking(bias="zero", num_hashes=64, **kwargs)
        return method.compute_teacher_statistics(teacher, loader)["hash_weight"]

    assert torch.equal(weight(hash_seed=0), weight(hash_seed=0))
    assert not torch.allclose(weight(hash_seed=0), weight(hash_seed=1))
    fixed = weight(std=0.06)
    assert fixed.shape == (64, 256)
    assert fixed.std().item() == pytest.approx(0.06, rel=0.05)
    # the cache name encodes every option the statistics depend on
    names = {
        LSHMimicking(**kwargs).statistics_name
        for kwargs in [{}, {"hash_seed": 1}, {"bias": "mean"}, {"num_hashes": 64}, {"std": 0.06}]
    }
    assert len(names) == 5
    assert L2Mimicking().statistics_name is None  # the L2 term needs no teacher statistics


def test_median_bias_splits_the_training_features_in_half_for_every_hash_function():
    teacher, loader = teacher_and_loader()
    method = LSHMimicking(num_hashes=300)  # bias median, the default
    method.set_teacher_statistics(method.compute_teacher_statistics(teacher, loader))
    embeddings = teacher_embeddings(teacher, loader)
    samples = embeddings.shape[0]
    positive = (embeddings @ method.hash_weight.T + method.hash_bias > 0).sum(dim=0)
    assert positive.shape == (300,)
    assert (positive - samples // 2).abs().max().item() <= 1
    # mean bias: -mean_b W f_t
    mean_method = LSHMimicking(num_hashes=300, bias="mean")
    statistics = mean_method.compute_teacher_statistics(teacher, loader)
    expected = -(embeddings @ statistics["hash_weight"].T).mean(dim=0)
    assert torch.allclose(statistics["hash_bias"], expected, atol=1e-5)
    assert torch.equal(statistics["hash_weight"], method.hash_weight)  # same seed, same hyperplanes


def test_zero_bias_reads_one_batch_only():
    teacher, loader = teacher_and_loader()
    first = loader[0]

    def one_batch_then_fail():
        yield first
        raise AssertionError("the zero bias needs no pass over the training split")

    statistics = LSHMimicking(bias="zero", num_hashes=8).compute_teacher_statistics(
        teacher, one_batch_then_fail()
    )
    assert torch.equal(statistics["hash_bias"], torch.zeros(8))


# ------------------------------------------------------------------------------------------------ selective


def hand_built_case():
    """4 samples, D_t = 3, N = 5; the teacher is right on samples 0 and 2, wrong on 1 and 3."""
    torch.manual_seed(1)
    student_emb = torch.randn(4, 3, requires_grad=True)
    teacher_emb = torch.randn(4, 3)
    targets = torch.tensor([0, 1, 2, 0])
    teacher_logits = torch.full((4, 3), -1.0)
    teacher_logits[torch.arange(4), torch.tensor([0, 2, 2, 1])] = 1.0
    student = NetworkOutput(torch.randn(4, 3), student_emb)
    teacher = NetworkOutput(teacher_logits, teacher_emb)
    statistics = {"hash_weight": torch.randn(5, 3), "hash_bias": torch.randn(5)}
    return student, teacher, targets, statistics


def manual_per_sample(student_emb, teacher_emb, weight, bias):
    l2 = ((student_emb - teacher_emb) ** 2).mean(dim=1)
    hs, ht = student_emb @ weight.T + bias, teacher_emb @ weight.T + bias
    bits = (ht > 0).float()
    bce = -(bits * F.logsigmoid(hs) + (1 - bits) * F.logsigmoid(-hs))
    return l2, bce.mean(dim=1)


def test_selective_averages_only_over_samples_the_teacher_gets_right():
    student, teacher, targets, statistics = hand_built_case()
    l2_term, lsh_term = L2Mimicking(selective=True), LSHMimicking(selective=True)
    lsh_term.set_teacher_statistics(statistics)
    l2_value, lsh_value = l2_term(student, teacher, targets), lsh_term(student, teacher, targets)
    weight, bias = statistics["hash_weight"], statistics["hash_bias"]
    l2, lsh = manual_per_sample(student.embedding, teacher.embedding, weight, bias)
    assert l2_value.item() == pytest.approx(((l2[0] + l2[2]) / 2).item(), rel=1e-6)
    assert lsh_value.item() == pytest.approx(((lsh[0] + lsh[2]) / 2).item(), rel=1e-6)
    # the samples the teacher gets wrong carry no gradient, in either term
    for value in (l2_value, lsh_value):
        student.embedding.grad = None
        value.backward()
        grad_norms = student.embedding.grad.abs().sum(dim=1)
        assert grad_norms[1] == 0 and grad_norms[3] == 0 and grad_norms[0] > 0 and grad_norms[2] > 0
    # a batch the teacher gets all wrong gives 0, not NaN
    wrong = torch.tensor([1, 0, 0, 2])
    assert l2_term(student, teacher, wrong).item() == 0.0 and lsh_term(student, teacher, wrong).item() == 0.0


def test_lshfm_terms_assemble_with_the_shared_ce_and_weight_to_the_official_sum():
    # gamma * CE + beta * (L2 + LSH), gamma 1, beta 6, selective: the official per-sample formulation
    student, teacher, targets, statistics = hand_built_case()
    weights = LossWeights({"ce": 1.0, "l2": 6.0, "lsh": 6.0})
    method = assemble({"l2": L2Mimicking(), "lsh": LSHMimicking()}, weights)
    assert method.terms == ("ce", "l2", "lsh") and isinstance(method.objectives["ce"], CrossEntropy)
    assert method.student_features == {"logits", "embedding"} == method.teacher_features
    method.objectives["lsh"].set_teacher_statistics(statistics)
    terms = method(student, teacher, targets)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(student.logits, targets).item())
    l2, lsh = manual_per_sample(
        student.embedding, teacher.embedding, statistics["hash_weight"], statistics["hash_bias"]
    )
    right = torch.tensor([1.0, 0.0, 1.0, 0.0])  # the teacher is right on samples 0 and 2
    official = terms["ce"] + 6.0 * ((l2 + lsh) * right).sum() / right.sum()
    total = sum(weights.at(0)[name] * value for name, value in terms.items())
    assert total.item() == pytest.approx(official.item(), rel=1e-6)


def test_non_selective_is_the_plain_mean():
    student, teacher, targets, statistics = hand_built_case()
    l2_term, lsh_term = L2Mimicking(selective=False), LSHMimicking(selective=False)
    lsh_term.set_teacher_statistics(statistics)
    l2_value, lsh_value = l2_term(student, teacher, targets), lsh_term(student, teacher, targets)
    weight, bias = statistics["hash_weight"], statistics["hash_bias"]
    l2, lsh = manual_per_sample(student.embedding, teacher.embedding, weight, bias)
    assert l2_value.item() == pytest.approx(feature_mse(student.embedding, teacher.embedding).item())
    assert l2_value.item() == pytest.approx(l2.mean().item(), rel=1e-6)
    assert lsh_value.item() == pytest.approx(
        lsh_loss(student.embedding, teacher.embedding, weight, bias).item(), rel=1e-6
    )
    assert lsh_value.item() == pytest.approx(lsh.mean().item(), rel=1e-6)
    per_sample = lsh_loss(student.embedding, teacher.embedding, weight, bias, reduction="none")
    assert per_sample.shape == (4,) and torch.allclose(per_sample, lsh, atol=1e-6)
    # non-selective terms take soft targets (they never read the label)
    soft = torch.softmax(torch.randn(4, 3), dim=1)
    assert l2_term(student, teacher, soft).item() == pytest.approx(l2_value.item())


@pytest.mark.parametrize("cls", [L2Mimicking, LSHMimicking])
def test_selective_needs_class_index_targets(cls):
    student, teacher, _, statistics = hand_built_case()
    method = cls()
    if isinstance(method, LSHMimicking):
        method.set_teacher_statistics(statistics)
    with pytest.raises(UserError, match="class-index targets"):
        method(student, teacher, torch.softmax(torch.randn(4, 3), dim=1))


def test_lsh_term_needs_its_hash_layer():
    student, teacher, targets, _ = hand_built_case()
    with pytest.raises(RuntimeError, match="set_teacher_statistics"):
        LSHMimicking()(student, teacher, targets)


# ------------------------------------------------------------------------------------------ adapt_student


def adapt(student, teacher, cls=LSHMimicking, **kwargs):
    images = torch.randn(2, 1, 8, 8)
    method = cls(**kwargs)
    adapted = method.adapt_student(
        student,
        extract_features(student.eval(), images, FEATURES),
        extract_features(teacher.eval(), images, FEATURES),
    )
    return adapted


@pytest.mark.parametrize("cls", [L2Mimicking, LSHMimicking])
@pytest.mark.parametrize("arch", ["convnet_narrow", "test_resnet"])  # zoo fc / timm reset_classifier
def test_feat_fc_projects_to_the_teacher_dim_before_a_new_classifier(arch, cls):
    torch.manual_seed(0)
    student = create_model(arch, num_classes=10, in_chans=1).eval()
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1)
    images = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        original_embedding = extract_features(student, images, FEATURES).embedding
    adapted = adapt(student, teacher, cls)
    assert isinstance(adapted, ProjectedEmbeddingNetwork)
    assert (adapted.num_features, adapted.num_classes) == (256, 10)
    adapted.eval()
    out = extract_features(adapted, images, FEATURES)
    assert out.embedding.shape == (6, 256)
    with torch.no_grad():
        expected = adapted.get_classifier()(adapted.feat_fc(original_embedding))
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(adapted(images), out.logits, atol=1e-6)
    # feat_fc is part of the deployed student
    keys = set(adapted.state_dict())
    assert {"feat_fc.weight", "feat_fc.bias", "fc.weight", "fc.bias"} <= keys
    # the original classifier is gone: every parameter is used by the logits
    adapted.train()
    F.cross_entropy(adapted(images), torch.arange(6) % 10).backward()
    unused = [name for name, p in adapted.named_parameters() if p.grad is None]
    assert unused == []


@pytest.mark.parametrize("cls", [L2Mimicking, LSHMimicking])
def test_student_is_unchanged_when_dims_match_unless_forced(cls):
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    same_width_teacher = create_model("convnet_narrow", num_classes=10, in_chans=1)
    assert adapt(student, same_width_teacher, cls) is student
    forced = adapt(student, same_width_teacher, cls, force_projection=True)
    assert isinstance(forced, ProjectedEmbeddingNetwork)
    assert (forced.feat_fc.in_features, forced.feat_fc.out_features) == (16, 16)


@pytest.mark.parametrize("teacher_arch, force", [("convnet_wide", False), ("convnet_narrow", True)])
def test_both_terms_adapting_in_sequence_wrap_the_student_once(teacher_arch, force):
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    teacher = create_model(teacher_arch, num_classes=10, in_chans=1).eval()
    images = torch.randn(2, 1, 8, 8)
    student_probe = extract_features(student.eval(), images, FEATURES)
    teacher_probe = extract_features(teacher, images, FEATURES)
    l2, lsh = L2Mimicking(force_projection=force), LSHMimicking(force_projection=force)
    once = l2.adapt_student(student, student_probe, teacher_probe)
    assert isinstance(once, ProjectedEmbeddingNetwork) and once.network is student
    adapted_probe = extract_features(once.eval(), images, FEATURES)
    assert lsh.adapt_student(once, adapted_probe, teacher_probe) is once  # not wrapped a second time
    # the same through the method's fan-out, in either order
    classes = {"l2": L2Mimicking, "lsh": LSHMimicking}
    for order in (("l2", "lsh"), ("lsh", "l2")):
        terms = {name: classes[name](force_projection=force) for name in order}
        fresh = create_model("convnet_narrow", num_classes=10, in_chans=1)
        adapted = Objectives(terms).adapt_student(
            fresh, extract_features(fresh.eval(), images, FEATURES), teacher_probe
        )
        assert isinstance(adapted, ProjectedEmbeddingNetwork) and adapted.network is fresh
        assert not any(isinstance(m, ProjectedEmbeddingNetwork) for m in adapted.network.modules())
        assert sum(name.endswith("feat_fc") for name, _ in adapted.named_modules()) == 1


def test_adapted_zoo_student_keeps_its_stage_features():
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    adapted = adapt(student, create_model("convnet_wide", num_classes=10, in_chans=1)).eval()
    out = extract_features(adapted, torch.randn(2, 1, 8, 8), frozenset({"stages", "preact_stages"}))
    assert [s.shape[1] for s in out.stages] == [4, 8, 8, 16]
    assert len(out.preact_stages) == 4


# ----------------------------------------------------------------------------------------- config and CLI


def test_lshfm_runs_end_to_end_with_feat_fc_in_the_checkpoint_and_cached_statistics(
    workdir, monkeypatch, capsys
):
    statistics_dir = workdir / "outputs/teachers/statistics"

    def lsh_statistics() -> set:
        return set(statistics_dir.glob("lsh_hash-*.pt")) if statistics_dir.is_dir() else set()

    result = run_main_in_process(
        "method=lshfm",
        "trainer.max_epochs=2",
        "logger=csv",
        cwd=workdir,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after_first = lsh_statistics()
    assert len(after_first) >= 1
    (run_dir,) = workdir.glob("outputs/runs/*/*/")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    with open(run_dir / "csv/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for term in ("ce", "l2", "lsh"):
        values = [float(r[f"train/{term}"]) for r in rows if r.get(f"train/{term}")]
        assert values and all(torch.isfinite(torch.tensor(values))), term
    state_dict = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert state_dict["student.feat_fc.weight"].shape == (256, 16)  # convnet_narrow 16-d -> convnet_wide 256
    assert state_dict["student.fc.weight"].shape == (10, 256)
    assert not any(key.startswith("student.network.fc") for key in state_dict)

    again = run_main_in_process(
        "method=lshfm",
        "trainer.max_epochs=1",
        "logger=none",
        cwd=workdir,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert lsh_statistics() == after_first
    logs = (
        again.stdout + again.stderr + "".join(p.read_text() for p in workdir.glob("outputs/runs/*/*/*.log"))
    )
    assert "Teacher statistics lsh_hash-median-nauto-stdfc-seed0: reusing" in logs
