"""End-to-end runs of `python -m kd_experiments`: outputs, teacher cache, multirun, loggers, help."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import QUICK, clean_env, run_cli, run_main_in_process, run_summaries

cli = run_main_in_process  # the same entry point in this process: no interpreter start-up per run

SUMMARY_KEYS = {
    "status", "method", "teacher", "student", "dataset", "seed", "student_top1", "student_top1_best",
    "student_top5", "teacher_top1", "epochs", "wall_s", "train_images_per_s", "overrides",
}  # fmt: skip


def test_default_run_writes_summary_checkpoints_and_config(workdir):
    result = run_cli(*QUICK, "seed=1", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = run_summaries(workdir)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "completed"
    assert (summary["method"], summary["teacher"], summary["student"]) == (
        "kd",
        "convnet_wide",
        "convnet_narrow",
    )
    assert (summary["dataset"], summary["seed"], summary["epochs"]) == ("digits", 1, 2)
    assert summary["overrides"] == [*QUICK, "seed=1"]
    assert 0 < summary["student_top1"] <= summary["student_top1_best"] <= 100
    assert summary["student_top1"] <= summary["student_top5"] <= 100
    assert summary["teacher_top1"] > 90  # the cached CE teacher on digits
    assert summary["train_images_per_s"] > 0 and summary["wall_s"] > 0
    run_dir = workdir / "outputs/runs" / summary["output_dir"].split("outputs/runs/")[1]
    assert (run_dir / ".hydra/config.yaml").is_file()
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["teacher_identity"]["sha256"] == summary["teacher_sha256"]
    # per-epoch history: validation, the LR each epoch trained with (cosine over 2 epochs), loss-term means
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[-1]["top1"] == summary["student_top1"] and history[-1]["top5"] == summary["student_top5"]
    base_lr = OmegaConf.load(run_dir / ".hydra/config.yaml").optimizer.lr
    assert [h["lr"] for h in history] == pytest.approx([base_lr, base_lr / 2])
    assert all(set(h["train"]) == {"ce", "kd", "loss"} and h["train"]["loss"] > 0 for h in history)
    assert all(h["images_per_s"] > 0 for h in history)
    # and one log line per epoch, which is what a SLURM log shows
    line = re.search(r"epoch 2/2: loss ([\d.]+), val top-1 ([\d.]+)%, lr ", result.stdout + result.stderr)
    assert line and float(line[1]) == pytest.approx(history[1]["train"]["loss"], abs=1e-4)
    assert float(line[2]) == pytest.approx(summary["student_top1"], abs=0.005)
    # the closing table reports the same numbers
    assert f"{summary['student_top1']:.2f}%" in result.stdout
    assert f"{summary['teacher_top1']:.2f}%" in result.stdout
    assert str(run_dir) in result.stdout.replace("\n", "")


def test_teacher_is_trained_once_then_reused_from_the_cache(tmp_path, monkeypatch, capsys):
    fast_teacher = ["teacher.recipe.max_epochs=2", *QUICK, "trainer.max_epochs=1"]
    first = cli(*fast_teacher, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli(*fast_teacher, "seed=1", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert second.returncode == 0, second.stderr[-3000:]
    first_summary, second_summary = run_summaries(tmp_path)
    assert first_summary["teacher_source"] == "trained"
    assert second_summary["teacher_source"] == "cache"
    assert first_summary["teacher_sha256"] == second_summary["teacher_sha256"]
    assert len(list((tmp_path / "outputs/teachers").glob("*.pt"))) == 1
    meta = json.loads(next((tmp_path / "outputs/teachers").glob("*.json")).read_text())
    assert meta["recipe"]["max_epochs"] == 2 and meta["seed"] == 0
    # another recipe is another teacher: never a stale cache hit
    third = cli(
        "teacher.recipe.max_epochs=3",
        *QUICK,
        "trainer.max_epochs=1",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(list((tmp_path / "outputs/teachers").glob("*.pt"))) == 2


def test_multirun_sweep_gives_each_job_its_own_dir_and_summary(workdir, monkeypatch, capsys):
    result = cli(
        "-m",
        "method=ce,kd",
        "seed=0,1,2",
        "trainer.max_epochs=1",
        "logger=none",
        cwd=workdir,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in workdir.glob("outputs/multirun/*/*/*/summary.json")]
    assert sorted((s["method"], s["seed"]) for s in summaries) == [
        ("ce", 0), ("ce", 1), ("ce", 2), ("kd", 0), ("kd", 1), ("kd", 2),
    ]  # fmt: skip
    assert len({s["output_dir"] for s in summaries}) == 6
    assert all(s["status"] == "completed" for s in summaries)
    # ce needs no teacher forward in training, but still reports the teacher's accuracy
    assert all(s["teacher_top1"] > 90 for s in summaries)


def test_a_job_that_fails_in_one_line_does_not_stop_the_sweep(workdir, monkeypatch, capsys):
    # jobs 0 and 2 are refused (7 classes on the 10-class digits); jobs 1 and 3 must still run
    result = cli(
        "-m", "method=kd,ce", "student.num_classes=7,10", "trainer.max_epochs=1", "logger=none", cwd=workdir,
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in workdir.glob("outputs/multirun/*/*/*/summary.json")]
    # job folders are named by their number and the swept values
    assert sorted((Path(s["output_dir"]).name, s["status"]) for s in summaries) == [
        ("0_method=kd,student.num_classes=7,trainer.max_epochs=1", "failed"),
        ("1_method=kd,student.num_classes=10,trainer.max_epochs=1", "completed"),
        ("2_method=ce,student.num_classes=7,trainer.max_epochs=1", "failed"),
        ("3_method=ce,student.num_classes=10,trainer.max_epochs=1", "completed"),
    ]  # fmt: skip
    errors = [
        line for line in result.stderr.splitlines() if not line.startswith(" ") and "Warning" not in line
    ]
    message = "student.num_classes=7 but dataset digits has 10 classes"
    assert errors == [f"error: {message}; set student.num_classes=10"] * 2 + ["error: 2 sweep job(s) failed:"]
    assert (
        f"  #0 (method=kd student.num_classes=7 trainer.max_epochs=1 logger=none): {message}" in result.stderr
    )
    assert "  #2 (method=ce student.num_classes=7" in result.stderr and "Traceback" not in result.stderr


def test_wandb_runs_offline_without_credentials_and_keeps_the_history(workdir):
    result = run_cli("trainer.max_epochs=2", "logger=wandb", cwd=workdir, env=clean_env(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = run_summaries(workdir)
    (history_file,) = workdir.glob("outputs/runs/*/*/wandb/offline-run-*/run-*.wandb")
    data = history_file.read_bytes()
    for key in (b"train/kd", b"train/ce", b"train/loss", b"val/teacher_top1", b"lr-SGD"):
        assert key in data, key
    logged_top1 = [float(v) for v in re.findall(rb"val/student_top1\x82\x01.([0-9.eE+-]+)", data)]
    assert len(logged_top1) >= 2  # one per epoch
    assert abs(logged_top1[-1] - summary["student_top1"]) < 1e-3


def test_wandb_group_of_a_multirun_is_the_sweep(workdir):
    result = run_cli(
        "-m", "seed=0,1", "trainer.max_epochs=1", "logger=wandb", "logger.tags=[study]", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = workdir.glob("outputs/multirun/*/*")
    history_files = list(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(history_files) == 2
    for history_file in history_files:
        data = history_file.read_bytes()
        assert sweep_dir.name.encode() in data  # the W&B group
        assert b"study" in data and b"kd_experiments" in data  # tag and project from config


def test_wandb_mode_env_is_honoured(workdir):
    env = clean_env(workdir) | {"WANDB_MODE": "disabled"}
    result = run_cli("trainer.max_epochs=1", "logger=wandb", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(workdir.glob("outputs/runs/*/*/wandb/offline-run-*"))


def test_csv_logger_records_loss_terms_and_metrics(workdir, monkeypatch, capsys):
    result = cli("trainer.max_epochs=2", "logger=csv", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = workdir.glob("outputs/runs/*/*/csv/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for column in (
        "train/ce",
        "train/kd",
        "train/loss",
        "train/kd_epoch",
        "val/student_top1",
        "val/student_top5",
    ):
        assert column in header, column
    assert "train/images_per_s" in header and "lr-SGD" in header


def test_tensorboard_logger_writes_event_files(workdir, monkeypatch, capsys):
    result = cli(
        "trainer.max_epochs=1", "logger=tensorboard", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (events,) = workdir.glob("outputs/runs/*/*/tensorboard/events.out.tfevents.*")
    assert b"val/student_top1" in events.read_bytes()


def test_the_documented_benchmark_command_runs(workdir, monkeypatch, capsys):
    result = cli(
        "dataset=fake", "dataset.image_size=32", "dataset.num_classes=100", "dataset.batch_size=64",
        "teacher=resnet56", "student=resnet20", "teacher.weights=random", "method=kd",
        "trainer.max_steps=3", "++trainer.limit_val_batches=0", "logger=none", cwd=workdir,
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = run_summaries(workdir)
    assert summary["steps"] == 3 and summary["teacher_source"] == "random"
    assert (
        summary["student_top1"] is None and summary["teacher_top1"] is None
    )  # no validation: nothing made up
    assert "TEACHER WEIGHTS ARE RANDOM" in result.stdout + result.stderr


def test_help_and_cfg_job(workdir, monkeypatch, capsys):
    helped = cli("--help", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert helped.returncode == 0
    for group in ("teacher", "student", "method", "dataset", "trainer", "optimizer", "scheduler", "logger"):
        assert f"{group}:" in helped.stdout, group
    assert "python -m kd_experiments -m method=ce,kd seed=0,1,2" in helped.stdout
    shown = cli(
        "method=ce",
        "trainer.max_epochs=3",
        "--cfg",
        "job",
        cwd=workdir,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert shown.returncode == 0
    assert "name: ce" in shown.stdout and "max_epochs: 3" in shown.stdout
    recipe = cli("experiment=digits_kd", "--cfg", "job", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert recipe.returncode == 0 and "temperature: 4.0" in recipe.stdout
    completion = cli(
        "--shell-completion", "install=bash", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert completion.returncode == 0 and "complete" in completion.stdout
