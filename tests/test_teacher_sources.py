"""Where teacher weights come from: checkpoint files of each supported layout, timm pretrained weights
from a local file, and what a W&B failure does to a run."""

import hashlib
import json

import pytest
import timm
import torch
from omegaconf import OmegaConf

from kd_experiments.models import create_model
from kd_experiments.teachers import build_teacher, state_dict_sha256
from tests.conftest import QUICK, run_cli, run_summaries


def teacher_cfg(**values):
    base = {
        "arch": "convnet_wide", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "checkpoint": None,
        "pretrained": None, "weights": None, "train_if_missing": False, "seed": 0,
    }  # fmt: skip
    return OmegaConf.create(base | values)


def assert_same_weights(model, state_dict):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@pytest.mark.parametrize("layout", ["plain", "mdistiller", "module_prefixed"])
def test_checkpoint_file_layouts(tmp_path, layout):
    source = create_model("convnet_wide", num_classes=10, in_chans=1).state_dict()
    content = {
        "plain": source,
        "mdistiller": {"model": source, "epoch": 240},
        "module_prefixed": {f"module.{k}": v for k, v in source.items()},
    }[layout]
    path = tmp_path / "teacher.pth"
    torch.save(content, path)
    built = build_teacher(teacher_cfg(checkpoint=str(path)), None, None, str(tmp_path))
    teacher, identity = built.network, built.identity
    assert_same_weights(teacher, source)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert identity["source"] == "checkpoint"
    assert identity["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity["sha256"] == state_dict_sha256(source)  # the weights, however they were stored


def test_two_saves_of_one_teacher_have_one_identity(tmp_path):
    # torch.save names the zip's members after the file, so two files of the same tensors differ in bytes
    weights = create_model("convnet_wide", num_classes=10, in_chans=1).state_dict()
    identities = []
    for name in ("a.pt", "b.pt"):
        torch.save(weights, tmp_path / name)
        identities.append(
            build_teacher(teacher_cfg(checkpoint=str(tmp_path / name)), None, None, str(tmp_path)).identity
        )
    assert identities[0]["file_sha256"] != identities[1]["file_sha256"]
    assert identities[0]["sha256"] == identities[1]["sha256"] == state_dict_sha256(weights)


def test_lightning_checkpoint_of_an_earlier_run_is_a_teacher(project_dir, tmp_path):
    (checkpoint,) = project_dir.glob("outputs/runs/*/*/checkpoints/last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    cfg = teacher_cfg(arch="convnet_narrow", checkpoint=str(checkpoint))
    built = build_teacher(cfg, None, None, str(tmp_path))
    teacher, identity = built.network, built.identity
    assert_same_weights(teacher, {k.removeprefix("student."): v for k, v in saved.items()})
    assert identity["path"] == str(checkpoint.resolve())


def test_timm_pretrained_weights_from_a_local_file(tmp_path):
    reference = timm.create_model("resnet10t", num_classes=1000)
    weights_file = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), weights_file)
    cfg = teacher_cfg(
        arch="resnet10t", in_chans=3, pretrained=True,
        model_kwargs={"pretrained_cfg_overlay": {"file": str(weights_file)}},
    )  # fmt: skip
    built = build_teacher(cfg, None, None, str(tmp_path))
    teacher, identity = built.network, built.identity
    assert torch.equal(teacher.conv1[0].weight, reference.conv1[0].weight)
    assert teacher.get_classifier().out_features == 10  # a new head for the data set's classes
    assert identity["source"] == "timm:default" and len(identity["sha256"]) == 64


def test_random_teacher_is_an_explicit_opt_in(tmp_path):
    identity = build_teacher(teacher_cfg(weights="random"), None, None, str(tmp_path)).identity
    assert identity["source"] == "random"


def test_a_wandb_that_cannot_start_falls_back_to_csv(workdir):
    result = run_cli(*QUICK, "logger=wandb", "logger.mode=not_a_mode", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B could not start" in result.stdout + result.stderr
    (summary,) = run_summaries(workdir)
    assert summary["status"] == "completed"
    assert list(workdir.glob("outputs/runs/*/*/csv/metrics.csv"))


def test_wandb_logging_errors_do_not_fail_a_run(monkeypatch, tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    from kd_experiments.loggers import ForgivingWandbLogger

    def broken(*args, **kwargs):
        raise ConnectionError("network down")

    monkeypatch.setattr(WandbLogger, "log_metrics", broken)
    monkeypatch.setattr(WandbLogger, "finalize", broken)
    logger = ForgivingWandbLogger(save_dir=str(tmp_path), mode="disabled")
    logger.log_metrics({"val/student_top1": 50.0}, step=1)  # warns instead of raising
    logger.log_metrics({"val/student_top1": 51.0}, step=2)
    logger.finalize("success")
    assert logger._failed


def test_a_truncated_cache_entry_is_a_miss_that_is_trained_or_computed_anew(tmp_path, caplog):
    from kd_experiments.train import train
    from tests.conftest import compose_config

    cache = tmp_path / "teachers"

    def run(name: str) -> dict:
        out = tmp_path / name
        train(
            compose_config(
                "method=kd++",
                "logger=none",
                "trainer.max_epochs=1",
                "++trainer.limit_train_batches=2",
                "teacher.recipe.max_epochs=2",
                f"paths.teacher_cache_dir={cache}",
                f"paths.output_dir={out}",
                "++trainer.enable_progress_bar=false",
                "++trainer.enable_model_summary=false",
            )  # fmt: skip
        )
        return json.loads((out / "summary.json").read_text())

    first = run("first")
    assert first["teacher_source"] == "trained"
    (weights,) = cache.glob("convnet_wide-*.pt")
    (statistics,) = cache.glob("statistics/*.pt")
    for damaged in (weights, statistics):
        damaged.write_bytes(damaged.read_bytes()[:100])  # what a crash or a full disk leaves
    second = run("second")
    assert second["status"] == "completed" and second["teacher_source"] == "trained"
    assert second["teacher_sha256"] == first["teacher_sha256"]  # the same seed trains the same teacher
    assert (
        "is unreadable" in caplog.text
        and "training anew" in caplog.text
        and "computing it anew" in caplog.text
    )
    weights.with_suffix(".json").write_text('{"val_top1": 9')  # a truncated metadata file
    assert run("third")["teacher_source"] == "trained"
    assert run("fourth")["teacher_source"] == "cache"  # and the entry is whole again
