"""Method modules: warm-up conventions, composition, ND's teacher statistics and projector, and every
method running end to end with its loss terms in the logs."""

import csv
import json

import pytest
import torch

from kd_experiments.data.digits import DigitsData
from kd_experiments.methods.base import linear_warmup
from kd_experiments.methods.compose import Compose
from kd_experiments.methods.dkd import DecoupledKD
from kd_experiments.methods.kd import HintonKD
from kd_experiments.methods.nd import EmbeddingProjector, NormDirection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput
from kd_experiments.teachers import prepare_teacher_statistics
from tests.conftest import compose_config, run_cli


def test_warmup_epoch_conventions():
    assert linear_warmup(0, 20, epoch_base=1) == pytest.approx(1 / 20)  # mdistiller: epochs count from 1
    assert linear_warmup(0, 20, epoch_base=0) == 0.0  # ND / ReviewKD scripts: from 0
    assert linear_warmup(19, 20, epoch_base=1) == 1.0
    assert linear_warmup(19, 20, epoch_base=0) == pytest.approx(19 / 20)
    assert linear_warmup(0, 0) == 1.0


def test_dkd_term_is_scaled_by_the_warmup():
    student = NetworkOutput(logits=torch.randn(4, 10))
    teacher = NetworkOutput(logits=torch.randn(4, 10))
    targets = torch.tensor([0, 1, 2, 3])
    method = DecoupledKD(warmup_epochs=20, warmup_epoch_base=1)
    first = method(student, teacher, targets)["dkd"]
    method.epoch = 9
    tenth = method(student, teacher, targets)["dkd"]
    assert tenth.item() == pytest.approx(10 * first.item(), rel=1e-5)


def test_compose_unions_terms_and_features_and_counts_ce_once():
    composed = Compose([HintonKD(), NormDirection()])
    assert composed.loss_terms == ("ce", "kd", "nd")
    assert composed.student_features == {"logits", "embedding"}
    with pytest.raises(ValueError, match="'kd'"):
        Compose([HintonKD(), HintonKD()])


def digits_pair():
    data = DigitsData()
    data.setup()
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1).eval()
    return data, teacher


def test_nd_class_centres_are_the_teacher_class_means_and_are_cached(tmp_path):
    data, teacher = digits_pair()
    identity = {"arch": "convnet_wide", "sha256": "a" * 64}
    dataset_cfg = compose_config().dataset
    method = Compose([HintonKD(), NormDirection()])
    prepare_teacher_statistics(method, teacher, identity, dataset_cfg, data, str(tmp_path))
    centres = method.objectives[1].class_centers
    # by hand: the training images are shifted at random, so compare with the unshifted means loosely,
    # and exactly with a second pass that reads the cache
    images, labels = data.train_set.tensors
    with torch.no_grad():
        embeddings = extract_features(teacher, images, frozenset({"embedding"})).embedding
    for cls in range(10):
        expected = embeddings[labels == cls].mean(0)
        assert torch.nn.functional.cosine_similarity(centres[cls], expected, dim=0) > 0.95
    (cached,) = (tmp_path / "statistics").glob("class_centers-convnet_wide-*.pt")
    again = NormDirection()
    prepare_teacher_statistics(again, teacher, identity, dataset_cfg, data, str(tmp_path))
    assert torch.equal(again.class_centers, centres)
    # another teacher never reads this cache
    prepare_teacher_statistics(
        NormDirection(), teacher, identity | {"sha256": "b" * 64}, dataset_cfg, data, str(tmp_path)
    )
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
    assert same(student, teacher, torch.tensor([0, 1]))["nd"].item() == pytest.approx(0.0, abs=1e-6)


def test_nd_projector_is_trained_and_not_part_of_the_student(tmp_path):
    from kd_experiments.module import DistillationModule

    method = Compose([HintonKD(), NormDirection()])
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1).eval()
    probe = torch.randn(2, 1, 8, 8)
    method.setup(
        extract_features(student.eval(), probe, frozenset({"logits", "embedding"})),
        extract_features(teacher, probe, frozenset({"logits", "embedding"})),
    )
    module = DistillationModule(
        student=student, method=method, loss_weights={"ce": 1.0, "kd": 1.0, "nd": 2.0},
        optimizer=torch.optim.SGD, num_classes=10, teacher=teacher,
    )  # fmt: skip
    projector_params = {id(p) for p in method.objectives[1].projector.parameters()}
    assert projector_params and projector_params <= {id(p) for p in module.parameters()}
    assert not projector_params & {id(p) for p in student.parameters()}
    assert all(not k.startswith("student.") for k in module.state_dict() if "projector" in k)


METHOD_TERMS = {
    "dkd": ["ce", "dkd"], "dist": ["ce", "dist"], "kd++": ["ce", "kd", "nd"], "dkd++": ["ce", "dkd", "nd"],
    "dist++": ["ce", "dist", "nd"], "srd": ["ce", "kd", "srd"], "vkd": ["ce", "kd", "vkd"],
    "fitnet": ["ce", "fitnet"], "srd+nd": ["ce", "kd", "srd", "nd"], "reviewkd": ["ce", "reviewkd"],
    "reviewkd++": ["ce", "reviewkd", "nd"], "lshfm": ["ce", "l2", "lsh"], "l2": ["ce", "l2"],
}  # fmt: skip
SMALL_TIMM_DEIT = ["student=deit_ti", "+student.model_kwargs.img_size=32",
                   "+student.model_kwargs.patch_size=8", "+student.model_kwargs.depth=2"]  # fmt: skip
# Extra pairs: two epochs of two batches (and two validation batches); the default pair runs whole.
FEW_BATCHES = [
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
]
DEIT_TAPS = ["method.objective.student_embedding=patch_mean", "method.objective.kd_logits=distill_logits"]
PAIRS = {
    # The embedded default pair (convnet_wide -> convnet_narrow, 8x8 digits).
    "default": (METHOD_TERMS, []),
    # A CIFAR-zoo pair on 8x8 digits; the teacher's short CE recipe keeps the test fast.
    "cifar_zoo": (
        METHOD_TERMS,
        [
            "teacher=resnet20",
            "student=resnet8",
            "teacher.recipe.max_epochs=2",
            *FEW_BATCHES,
        ],
    ),
    # A timm CNN pair on digits resized to 32x32 RGB.
    "timm_cnn": (
        METHOD_TERMS,
        [
            "dataset.image_size=32",
            "dataset.channels=3",
            "teacher.arch=resnet18",
            "student.arch=resnet10t",
            "teacher.recipe.max_epochs=1",
            *FEW_BATCHES,
        ],
    ),  # fmt: skip
    # A timm CNN teacher and a two-headed DeiT student: the token-reading methods.
    "timm_deit": (
        {"deit": ["ce", "distill"], "vkd": ["ce", "kd", "vkd"], "srd": ["ce", "kd", "srd"]},
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


@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_runs_end_to_end_and_logs_its_terms(pair, workdir):
    methods, overrides = PAIRS[pair]
    if pair == "timm_deit":  # one multirun per method: only srd/vkd take the DeiT tap options
        runs = [[f"method={m}", *(DEIT_TAPS if m != "deit" else [])] for m in methods]
    else:
        runs = [[f"method={','.join(methods)}"]]
    for run in runs:
        result = run_cli("-m", *run, *overrides, "trainer.max_epochs=2", "logger=csv", cwd=workdir)
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


def test_nd_warmup_and_imagenet_projector_init():
    torch.manual_seed(0)
    method = NormDirection(warmup_epochs=5, warmup_epoch_base=0, projector_init="imagenet")
    student = NetworkOutput(torch.zeros(4, 10), embedding=torch.randn(4, 8))
    teacher = NetworkOutput(torch.zeros(4, 10), embedding=torch.randn(4, 32))
    method.setup(student, teacher)
    linear = method.projector[2]
    assert 0.005 < linear.weight.std().item() < 0.015 and linear.bias.abs().max().item() > 0
    method.set_teacher_statistics({"class_centers": torch.randn(10, 32)})
    method.eval()  # no dropout: compare the same projection at two epochs
    targets = torch.tensor([0, 1, 2, 3])
    method.epoch = 10  # past the warm-up
    full = method(student, teacher, targets)["nd"]
    assert full.item() > 0
    method.epoch = 0
    assert method(student, teacher, targets)["nd"].item() == 0.0  # base 0: the first epoch has weight 0
    method.epoch = 2
    torch.testing.assert_close(method(student, teacher, targets)["nd"], full * 2 / 5)
    with pytest.raises(ValueError, match="projector_init"):
        NormDirection(projector_init="zeros").setup(student, teacher)
