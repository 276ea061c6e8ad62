"""The detection task end to end through `train(cfg)`: the shapes experiment (a teacher trained on the fly
and cached, a student distilled from it), a VOC tree and a COCO tree in their on-disk formats trained for an
epoch and scored, each detection method's terms, and the one-line refusals."""

import json
from pathlib import Path

import pytest
import torch

from kd_experiments.train import train
from tests.conftest import compose_config, refusal_line
from tests.detection_fixtures import write_coco_tree, write_voc_tree

SMALL = ["fpn_channels=16", "representation_size=32", "rpn_post_nms_top_n_train=50"]
SMALL += ["box_batch_size_per_image=16", "rpn_batch_size_per_image=16", "box_detections_per_img=10"]


def small(role: str, anchors: str, size: int = 64) -> list[str]:
    kwargs = [f"{role}.model_kwargs.{value}" for value in SMALL]
    kwargs += [f"{role}.model_kwargs.min_size={size}", f"{role}.model_kwargs.max_size={size}"]
    return [*kwargs, f"{role}.model_kwargs.anchor_sizes={anchors}"]


def quick(root: Path, out: Path, *overrides: str):
    """experiment=detection_shapes scaled down to seconds: 8 training and 4 validation images, one epoch
    of teacher and student, narrow detectors."""
    return compose_config(
        "experiment=detection_shapes", "logger=none", "dataset.num_train=8", "dataset.num_val=4",
        "dataset.batch_size=4", "trainer.max_epochs=1", "teacher.recipe.max_epochs=1",
        "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
        *small("teacher", "[8,16,32,64,128]"), *small("student", "[8,16,32,64]"),
        f"paths.root_dir={root}", f"paths.output_dir={out}", *overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    """A project folder whose teacher cache holds the tiny shapes teacher, trained by a first run."""
    root = tmp_path_factory.mktemp("detection")
    train(quick(root, root / "first", "method=detection_l2"))
    return root


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_shapes_run_trains_and_caches_a_teacher_then_distils(shapes_root, capsys):
    first = read_summary(shapes_root / "first")
    assert first["status"] == "completed" and first["task"] == "detection"
    assert first["teacher_source"] == "trained" and first["method"] == "detection_l2"
    assert first["epochs"] == 1 and first["steps"] == 2 and first["val_images"] == 4
    for key in ("map", "map50", "voc07_map50"):
        for role in ("teacher", "student"):
            assert 0.0 <= first[f"{role}_{key}"] <= 100.0
    assert first["student_map_reported"] == first["student_map"]
    assert set(first["history"][0]) >= {"epoch", "train", "map", "map50", "voc07_map50"}
    assert set(first["history"][0]["train"]) >= {
        "detection",
        "l2",
        "loss",
        "loss_classifier",
        "loss_objectness",
    }
    assert Path(first["last_checkpoint"]).is_file() and Path(first["best_checkpoint"]).is_file()
    # A second run reads the cached teacher and scores it the same.
    capsys.readouterr()
    result = train(quick(shapes_root, shapes_root / "second", "method=detection_lshl2"))
    second = read_summary(shapes_root / "second")
    assert second["teacher_source"] == "cache" and second["teacher_sha256"] == first["teacher_sha256"]
    assert second["teacher_map"] == pytest.approx(first["teacher_map"])
    assert result == second["student_map_reported"]  # what a sweeper optimises
    table = capsys.readouterr().out
    assert "mAP@[.5:.95]" in table and "VOC07 mAP@.5" in table and "detection_lshl2 on shapes" in table


@pytest.mark.parametrize(
    "method, terms",
    [
        ("detection", {"detection"}),
        ("detection_lsh", {"detection", "lsh"}),
        ("detection_kd", {"detection", "kd"}),
        ("detection_vkd", {"detection", "vkd"}),
    ],
)
def test_every_detection_method_trains_its_terms(method, terms, shapes_root, tmp_path):
    train(quick(shapes_root, tmp_path / "run", f"method={method}"))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["teacher_source"] == "cache"
    logged = set(summary["history"][0]["train"])
    assert terms <= logged and {"loss_box_reg", "loss_rpn_box_reg"} <= logged
    for term in terms:
        assert torch.isfinite(torch.tensor(summary["history"][0]["train"][term]))


def test_the_lsh_hash_std_is_the_teacher_classifier_std(shapes_root, tmp_path):
    checkpoint_dir = tmp_path / "run"
    train(quick(shapes_root, checkpoint_dir, "method=detection_lsh"))
    state = torch.load(checkpoint_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    teacher = torch.load(next((shapes_root / "outputs/teachers").glob("*.pt")), map_location="cpu")
    std = teacher["roi_heads.box_predictor.cls_score.weight"].std().item()
    assert state["state_dict"]["method.objectives.lsh.hash_std"].item() == pytest.approx(std)
    assert state["state_dict"]["method.objectives.lsh.hash_weight"].shape == (4 * 32, 32)


def test_a_voc_tree_trains_one_epoch_and_scores_map(tmp_path):
    write_voc_tree(tmp_path / "VOC2007")
    cfg = compose_config(
        "experiment=detection_shapes", "dataset=voc", f"dataset.root={tmp_path / 'VOC2007'}",
        "dataset.num_workers=0", "logger=none", "trainer.max_epochs=1", "teacher.weights=random",
        "teacher.train_if_missing=false", "++trainer.enable_progress_bar=false",
        *small("teacher", "[8,16,32,64,128]"), *small("student", "[8,16,32,64]"),
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    train(cfg)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["dataset"] == "voc"
    assert summary["steps"] == 2  # trainval: 3 images, batch 2 (voc.yaml): 2 batches
    assert summary["val_images"] == 2  # the two test images
    assert 0.0 <= summary["student_map50"] <= 100.0


def test_a_coco_tree_trains_one_epoch_and_scores_map(tmp_path):
    write_coco_tree(tmp_path / "coco")
    cfg = compose_config(
        "experiment=detection_shapes", "dataset=coco", f"dataset.root={tmp_path / 'coco'}",
        "dataset.num_classes=3", "dataset.num_workers=0", "logger=none", "trainer.max_epochs=1",
        "teacher.weights=random", "teacher.train_if_missing=false", "++trainer.enable_progress_bar=false",
        *small("teacher", "[8,16,32,64,128]"), *small("student", "[8,16,32,64]"),
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    train(cfg)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["dataset"] == "coco"
    assert summary["val_images"] >= 1 and 0.0 <= summary["student_map"] <= 100.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student=resnet20"], "student=resnet20 is a classifier but dataset.task is detection"),
        (["teacher.output_cache=true"], "teacher.output_cache applies to classification"),
        (["report=weight_average"], "a detection run reports its last or best epoch's mAP"),
        (["student.num_classes=5"], "student.num_classes=5 but dataset shapes has 3 object classes"),
        (["method=kd"], "method kd is a classification method but dataset shapes is detection data"),
        (
            ["dataset=digits"],
            "method detection_l2 is a detection method but dataset digits is classification",
        ),
    ],
)
def test_detection_refusals_are_one_line(overrides, message, tmp_path, monkeypatch, capsys):
    line = refusal_line(
        "experiment=detection_shapes", "logger=none", "teacher.weights=random",
        "teacher.train_if_missing=false",
        *overrides, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert message in line


def test_a_report_groups_detection_runs_by_their_reported_map(shapes_root, tmp_path):
    from kd_experiments.report import main as report

    for seed in (0, 1):
        train(quick(shapes_root, tmp_path / f"runs/l2_{seed}", "method=detection_l2", f"seed={seed}"))
    train(quick(shapes_root, tmp_path / "runs/kd_0", "method=detection_kd", "report_map=map50"))
    assert (
        report([str(tmp_path / "runs/l2_0"), str(tmp_path / "runs/l2_1"), "--out", str(tmp_path / "l2")]) == 0
    )
    text = (tmp_path / "l2/report.md").read_text()
    assert "mAP@[.5:.95] (%)" in text and "student_map_reported" in text
    maps = [read_summary(tmp_path / f"runs/l2_{seed}")["student_map_reported"] for seed in (0, 1)]
    row = (tmp_path / "l2/report.csv").read_text().splitlines()
    assert row[0].startswith("method,n,map_mean,map_std,paper_map,delta_to_paper,teacher_map_mean")
    assert float(row[1].split(",")[2]) == pytest.approx(sum(maps) / 2, abs=1e-4)
    kd = read_summary(tmp_path / "runs/kd_0")
    assert kd["report_map"] == "map50" and kd["student_map_reported"] == kd["student_map50"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step called without a Trainer
def test_the_detection_teacher_is_frozen_and_outside_the_module(shapes_root, tmp_path):
    """Eval mode, no gradient, not in parameters() (so not in the optimizer) nor in state_dict(), and its
    weights unchanged by a training step that reads its RoI features."""
    from kd_experiments.detection import run as detection_run
    from kd_experiments.detection.data import collate_detection

    cfg = quick(shapes_root, tmp_path / "run", "method=detection_lshl2")
    datamodule = detection_run.data_phase(cfg)
    module = detection_run.build_parts(cfg, datamodule)
    teacher = module.teacher
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    assert not teacher.training
    owned = {id(p) for p in module.parameters()}
    assert not any(id(p) in owned for p in teacher.parameters())
    assert not any(key.startswith("teacher") or "_frozen_teacher" in key for key in module.state_dict())
    module.train()
    images, targets = collate_detection([datamodule.train_set[i] for i in range(4)])[:2]
    loss = module.training_step((images, targets, None), 0)
    loss.backward()
    assert not teacher.training  # module.train() does not reach it
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert any(p.grad is not None for p in module.student.parameters())
