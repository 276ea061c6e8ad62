"""Every recipe in conf/experiment/ composes and trains 2 optimizer steps on CPU with its real models and a
generated stand-in for its data set (CIFAR-format archive; a 10-class ImageFolder tree at 32 px). The
detection and multi-label paper recipes train on generated VOC / COCO trees in tests/test_detection_recipes.py
and tests/test_multilabel.py instead."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_experiments.train import train
from tests.conftest import REPO, compose_config, recipe_task

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml"))
RECIPES = [name for name in EXPERIMENTS if not name.startswith("ablation_")]
# The classification recipes; the detection and multi-label ones train on generated VOC / COCO trees in
# tests/test_detection_recipes.py and tests/test_multilabel.py.
CLASSIFICATION_RECIPES = [name for name in RECIPES if recipe_task(name) == "classification"]
# Examples on embedded or generated data (the digits, the shapes), not paper rows: no `paper` block.
EXAMPLES = ("digits_kd", "detection_shapes")
STAND_IN_IMAGE_SIZE = 32  # ImageNet recipes run at 32 px here (224 in the recipe)
STAND_IN_IMAGENET_CLASSES = 10  # and with 10 classes (the models' heads follow dataset.num_classes)


@pytest.fixture(scope="module")
def stand_in_data(tmp_path_factory) -> Path:
    """`data/cifar/cifar-100-python` (200 train images covering all 100 classes, 8 test images) and
    `data/imagenet/{train,val}/<10 classes>/{0,1}.png` (the ImageNet recipes run with 10 classes here), so
    per-class statistics (ND) see every class without a teacher pass over 1000 classes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cifar = root / "cifar/cifar-100-python"
    cifar.mkdir(parents=True)
    for split, count in (("train", 200), ("test", 8)):
        payload = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(count)],
        }
        (cifar / split).write_bytes(pickle.dumps(payload))
    (cifar / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for index in range(STAND_IN_IMAGENET_CLASSES):
            folder = root / f"imagenet/{split}/n{index:08d}"
            folder.mkdir(parents=True)
            for image in range(2):
                Image.fromarray(pixels).save(folder / f"{image}.png")
    return root


def recipe_overrides(name: str, data_dir: Path, work_dir: Path) -> list[str]:
    cfg = compose_config(f"experiment={name}")
    overrides = [
        f"experiment={name}", f"paths.data_dir={data_dir}", f"paths.log_dir={work_dir}/outputs",
        f"paths.output_dir={work_dir}/run", "logger=none", "trainer.max_steps=2", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto", "trainer.precision=32-true",
        "++trainer.limit_val_batches=1", "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false", "dataset.batch_size=4", "dataset.num_workers=0",
        "teacher.checkpoint=null", "teacher.pretrained=null", "teacher.weights=random",
        "teacher.reference_top1=null",
        # Checkpoint files are not what this test checks (test_resume does): for the DeiT-B and RegNetY
        # recipes, writing a GB of weights and optimizer state was most of each test's time.
        "++trainer.enable_checkpointing=false",
    ]  # fmt: skip
    if cfg.dataset.name == "imagenet":
        overrides += [
            f"dataset.image_size={STAND_IN_IMAGE_SIZE}",
            f"dataset.num_classes={STAND_IN_IMAGENET_CLASSES}",
        ]
        for role in ("teacher", "student"):
            if any(token in cfg[role].arch for token in ("vit", "deit")):
                overrides.append(f"++{role}.model_kwargs.img_size={STAND_IN_IMAGE_SIZE}")
    return overrides


def test_there_are_recipes():
    assert len(RECIPES) >= 1


@pytest.mark.parametrize("name", CLASSIFICATION_RECIPES)
def test_recipe_trains_two_steps_on_a_stand_in(name, stand_in_data, tmp_path):
    cfg = compose_config(*recipe_overrides(name, stand_in_data, tmp_path))
    paper_recipe = name not in EXAMPLES
    if paper_recipe:
        assert cfg.get("paper") and "top1" in cfg.paper, "every recipe names its paper number"
        if cfg.paper.top1 is None:  # a row the paper shows only in a figure (ND's larger-teacher study)
            assert "figure only" in cfg.paper.source
    train(cfg)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    if paper_recipe:
        assert summary["paper"]["top1"] == cfg.paper.top1


def test_readme_lists_every_recipe_with_its_paper_number():
    from kd_experiments.recipes import markdown_table, recipe_rows

    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README table: python -m kd_experiments.recipes"
    # a two-stage recipe's first stage (`*_stage1`) is not a table row: its second stage is
    assert len(recipe_rows()) == len([n for n in RECIPES if n not in EXAMPLES and not n.endswith("_stage1")])
