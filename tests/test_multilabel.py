"""Multi-label classification: the AP / mAP against hand-computed values, the BCE term, and the task end to
end through `train(cfg)` on VOC- and COCO-format trees (multilabel/, methods/bce.py)."""

import math

import pytest
import torch

from kd_experiments.errors import UserError
from kd_experiments.methods.bce import MultiLabelBCE
from kd_experiments.models.features import NetworkOutput
from kd_experiments.multilabel.module import MultiLabelMAP, average_precision


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # the -1 entry is left out: ranks 1 (hit, P 1), 2 (miss), 3 (hit, P 2/3) -> (1 + 2/3) / 2
    targets = torch.tensor([1, 0, 1, -1])
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)
    # a miss first: precisions 0, 1/2, 2/3 at ranks 1-3; non-interpolated (1/2 + 2/3) / 2 = 0.5833; the VOC
    # envelope lifts the precision at rank 2 to the best later one, 2/3: (2/3 + 2/3) / 2
    targets = torch.tensor([0, 1, 1, 0])
    assert average_precision(scores, targets, "none") == pytest.approx((0.5 + 2 / 3) / 2)
    assert average_precision(scores, targets, "envelope") == pytest.approx(2 / 3)
    assert average_precision(scores, torch.tensor([0, 0, -1, 0])) == 0.0  # no positive
    # ties keep the data order (a stable sort): the positive second of two equal scores ranks second
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)


def test_map_averages_the_classes_with_a_positive_over_all_updates():
    metric = MultiLabelMAP()
    logits = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, -1.0], [0.0, 1.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, -1.0, 0.0]])
    metric.update(logits[:2], targets[:2])
    metric.update(logits[2:], targets[2:])
    # class 0: scores 3, 1, 0 -> positives at ranks 1 and 3: (1 + 2/3) / 2; class 1: the one positive
    # ranks first (the -1 entry is out): 1; class 2 has no positive and is left out of the mean
    assert metric.compute() == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


def test_bce_leaves_out_unknown_entries_and_refuses_class_indices():
    student = NetworkOutput(logits=torch.tensor([[0.0, 0.0], [2.0, -2.0]]))
    targets = torch.tensor([[1.0, -1.0], [1.0, 0.0]])
    # three known entries: BCE(0, 1) = ln 2, BCE(2, 1) = ln(1 + e^-2), BCE(-2, 0) = ln(1 + e^-2)
    expected = (math.log(2) + 2 * math.log1p(math.exp(-2))) / 3
    assert MultiLabelBCE()(student, None, targets).item() == pytest.approx(expected)
    with pytest.raises(UserError, match="needs multi-hot targets shaped like the logits"):
        MultiLabelBCE()(student, None, torch.tensor([0, 1]))


def quick(root, out, *overrides: str):
    from tests.conftest import compose_config

    return compose_config(
        "dataset=voc_multilabel", f"dataset.root={root}", "dataset.image_size=32", "dataset.num_workers=0",
        "dataset.batch_size=2", "dataset.eval_batch_size=2", "teacher=resnet20", "student=resnet8",
        "teacher.train_if_missing=true", "teacher.recipe.max_epochs=1", "logger=none", "trainer.max_epochs=1",
        "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
        f"paths.root_dir={out.parent}", f"paths.output_dir={out}", *overrides,
    )  # fmt: skip


def test_voc_multilabel_trains_a_bce_teacher_and_distils_with_lshl2(tmp_path, capsys):
    import json

    from kd_experiments.train import train
    from tests.detection_fixtures import write_voc_tree

    write_voc_tree(tmp_path / "VOC2007")
    result = train(quick(tmp_path / "VOC2007", tmp_path / "run", "method=multilabel_lshl2"))
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "multilabel"
    assert summary["teacher_source"] == "trained" and summary["steps"] == 2  # 3 trainval images, batch 2
    assert summary["val_images"] == 2
    for key in ("student_map", "student_map_best", "teacher_map"):
        assert 0.0 <= summary[key] <= 100.0
    assert result == summary["student_map_reported"] == summary["student_map"]
    assert set(summary["history"][0]["train"]) >= {"bce", "l2", "lsh", "loss"}
    assert "mAP" in capsys.readouterr().out
    teacher_meta = json.loads(next((tmp_path / "outputs/teachers").glob("*.json")).read_text())
    assert teacher_meta["val_top1"] == pytest.approx(
        summary["teacher_map"]
    )  # trained with BCE, scored by mAP


def test_multilabel_refusals_are_one_line(tmp_path):
    from kd_experiments.train import train
    from tests.detection_fixtures import write_voc_tree

    write_voc_tree(tmp_path / "VOC2007")
    with pytest.raises(UserError, match="a multi-label run reports its last or best epoch's mAP"):
        train(quick(tmp_path / "VOC2007", tmp_path / "a", "method=multilabel_bce", "report=weight_average"))
    with pytest.raises(
        UserError, match="method kd is a classification method but dataset voc_multilabel is multilabel data"
    ):
        train(quick(tmp_path / "VOC2007", tmp_path / "b", "method=kd", "teacher.weights=random"))


def test_coco_multilabel_trains_one_epoch_with_bce_and_scores_map(tmp_path):
    import json

    from kd_experiments.train import train
    from tests.conftest import compose_config
    from tests.detection_fixtures import write_coco_tree

    write_coco_tree(tmp_path / "coco", splits=("train2014", "val2014"))
    cfg = compose_config(
        "dataset=coco_multilabel", f"dataset.root={tmp_path / 'coco'}", "dataset.num_classes=3",
        "dataset.image_size=32", "dataset.num_workers=0", "dataset.batch_size=2", "teacher=resnet20",
        "student=resnet8", "teacher.weights=random", "method=multilabel_bce", "logger=none",
        "trainer.max_epochs=1", "++trainer.enable_progress_bar=false", f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    train(cfg)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["dataset"] == "coco_multilabel"
    assert summary["val_images"] >= 1 and 0.0 <= summary["student_map"] <= 100.0
    assert set(summary["history"][0]["train"]) == {"bce", "loss"}


MULTILABEL_RECIPES = [
    ("lshfm_voc_multilabel_resnet101_resnet50", 93.17, 8192, 0.5),
    ("lshfm_voc_multilabel_resnet101_mobilenetv2", 90.14, 8192, 0.5),
    ("lshfm_coco_multilabel_resnet101_resnet50", 77.16, 2048, 3.0),
    ("lshfm_coco_multilabel_resnet101_mobilenetv2", 73.73, 2048, 3.0),
]


@pytest.mark.parametrize("name, paper, hashes, beta", MULTILABEL_RECIPES)
def test_lshfm_multilabel_recipe_trains_two_steps_on_a_generated_tree(
    name, paper, hashes, beta, tmp_path, monkeypatch
):
    """Each recipe composes with LSHFM's values and trains 2 steps on a tree in its real on-disk format, at
    64 px, with a random teacher and no ImageNet download; the pretrained tag does reach the student."""
    import json

    from kd_experiments import teachers
    from kd_experiments.train import train
    from tests.conftest import compose_config
    from tests.detection_fixtures import write_coco_tree, write_voc_tree

    recipe = compose_config(f"experiment={name}")
    assert recipe.paper.map == paper and recipe.method.objectives.lsh.num_hashes == hashes
    assert recipe.method.weights == {"bce": 1.0, "l2": beta, "lsh": beta} and recipe.optimizer.lr == 0.01
    assert recipe.scheduler.interval == "step" and recipe.trainer.max_epochs == 60 and recipe.report == "best"
    if "voc" in name:
        write_voc_tree(tmp_path / "data")
        data = [f"dataset.root={tmp_path / 'data'}"]
    else:
        write_coco_tree(tmp_path / "data", splits=("train2014", "val2014"))
        data = [f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3"]
    requested = []
    build = teachers.create_model

    def no_download(arch, *args, pretrained=False, **kwargs):
        requested.append((arch, pretrained))
        return build(arch, *args, pretrained=False, **kwargs)

    monkeypatch.setattr(teachers, "create_model", no_download)
    cfg = compose_config(
        f"experiment={name}", *data, "dataset.image_size=64", "dataset.num_workers=0", "dataset.batch_size=2",
        "dataset.eval_batch_size=2", "teacher.weights=random", "student.checkpoint=null", "logger=none",
        "trainer.max_steps=2",
        "++trainer.enable_progress_bar=false", "++trainer.enable_checkpointing=false",
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    train(cfg)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["paper"]["map"] == paper and summary["report"] == "best"
    assert (recipe.student.arch, recipe.student.pretrained) in requested  # student.pretrained is used


def test_a_two_stage_recipe_trains_feat_fc_alone_then_starts_stage_two_from_it(tmp_path, monkeypatch):
    """Stage 1 (`*_stage1`) trains only feat_fc (the optimizer holds state for its weight and bias alone)
    into the run folder stage 2 reads by default; stage 2 then starts from that checkpoint's student, and
    without it stops in one line."""
    import json

    from kd_experiments import teachers
    from kd_experiments.train import train
    from tests.conftest import compose_config
    from tests.detection_fixtures import write_coco_tree

    build = teachers.create_model
    monkeypatch.setattr(teachers, "create_model", lambda *a, pretrained=False, **k: build(*a, **k))
    write_coco_tree(tmp_path / "data", splits=("train2014", "val2014"))
    name = "lshfm_coco_multilabel_resnet101_mobilenetv2"

    def config(recipe: str, out: str, *extra: str):
        return compose_config(
            f"experiment={recipe}", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3",
            "dataset.image_size=64", "dataset.num_workers=0", "dataset.batch_size=2",
            "dataset.eval_batch_size=2", "teacher.weights=random", "logger=none", "trainer.max_steps=2",
            "++trainer.enable_progress_bar=false",
            f"paths.root_dir={tmp_path}", f"paths.output_dir={out}", *extra,
        )  # fmt: skip

    stage1 = config(f"{name}_stage1", str(tmp_path / f"outputs/lshfm_stage1/{name}"))
    assert list(stage1.student.trainable) == ["feat_fc"] and stage1.method.weights.bce == 0.0
    with pytest.raises(UserError, match="student checkpoint not found: .*set student.checkpoint"):
        train(config(name, str(tmp_path / "early")))
    train(stage1)
    checkpoint = torch.load(
        tmp_path / f"outputs/lshfm_stage1/{name}/checkpoints/last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    moved = checkpoint["optimizer_states"][0]["state"]
    assert len(moved) == 2  # feat_fc's weight and bias: nothing else was trained
    train(config(name, str(tmp_path / "stage2")))
    summary = json.loads((tmp_path / "stage2/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2


def test_student_trainable_names_must_exist():
    from omegaconf import OmegaConf

    from kd_experiments.assembly import freeze_student
    from kd_experiments.models import create_model

    student = create_model("resnet8", 10)
    with pytest.raises(UserError, match=r"student.trainable names \['feat_fc'\], which the student has no"):
        freeze_student(OmegaConf.create({"trainable": ["feat_fc"]}), student)
    freeze_student(OmegaConf.create({"trainable": ["fc"]}), student)
    trained = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trained == ["fc.weight", "fc.bias"]
