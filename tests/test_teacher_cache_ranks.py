"""Multi-process launches (srun, torchrun): only global rank zero trains the on-the-fly teacher and
computes teacher statistics; the other ranks wait for its cache files and load exactly those."""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from pytorch_lightning.utilities import rank_zero_only

from kd_experiments import teachers
from kd_experiments.data.digits import DigitsData
from kd_experiments.errors import UserError
from kd_experiments.methods.nd import NormDirection
from kd_experiments.models import create_model
from kd_experiments.teachers import Teacher, build_teacher, prepare_teacher_statistics, teacher_cache_key
from tests.conftest import QUICK, clean_env, compose_config

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@pytest.fixture
def rank_one(monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(teachers, "CACHE_POLL_S", 0.05)


def write_later(delay_s: float, write) -> threading.Thread:
    """Rank zero, played by a thread: `write()` after `delay_s` seconds."""
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), write()))
    thread.start()
    return thread


def teacher_paths(cfg, cache_dir):
    weights = cache_dir / f"{cfg.teacher.arch}-digits-{teacher_cache_key(cfg.teacher, cfg.dataset)}.pt"
    return weights, weights.with_suffix(".json")


def test_rank_one_waits_for_both_teacher_files_then_loads_them(rank_one, monkeypatch, tmp_path, caplog):
    cfg = compose_config("teacher.train_if_missing=true")
    weights_path, meta_path = teacher_paths(cfg, tmp_path)
    written = create_model("convnet_wide", num_classes=10, in_chans=1).state_dict()

    def never_train(*args):
        raise AssertionError("a rank > 0 trained a teacher")

    # The weights alone are not a finished cache entry: the .json, written last, comes 0.5 s later.
    weights_thread = write_later(0.3, lambda: torch.save(written, weights_path))
    meta_thread = write_later(0.8, lambda: meta_path.write_text('{"val_top1": 12.5, "train_s": 3.0}'))
    started = time.monotonic()
    with caplog.at_level("INFO", logger="kd_experiments.teachers"):
        built = build_teacher(
            cfg.teacher, cfg.dataset, DigitsData(), str(tmp_path), train_with_ce=never_train
        )
    teacher, identity = built.network, built.identity
    weights_thread.join()
    meta_thread.join()
    assert time.monotonic() - started >= 0.8
    assert "Rank 1: waiting for rank 0 to write the CE-trained teacher convnet_wide" in caplog.text
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, written[key]), key
    assert identity["source"] == "cache" and identity["trained_top1"] == 12.5


def test_rank_one_waits_for_the_statistics_file_then_loads_it(rank_one, monkeypatch, tmp_path, caplog):
    data = DigitsData()
    data.setup()
    network = create_model("convnet_wide", num_classes=10, in_chans=1)
    teacher = Teacher(network, identity={"arch": "convnet_wide", "sha256": "a" * 64})
    dataset_cfg = compose_config().dataset
    # Rank zero's file name, found by letting rank zero compute into another directory.
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    prepare_teacher_statistics(NormDirection(), teacher, dataset_cfg, data, str(tmp_path / "zero"))
    (computed,) = (tmp_path / "zero/statistics").glob("class_centers-*.pt")
    monkeypatch.setattr(rank_zero_only, "rank", 1)

    def never_compute(*args):
        raise AssertionError("a rank > 0 computed teacher statistics")

    monkeypatch.setattr(NormDirection, "compute_teacher_statistics", never_compute)
    written = {"class_centers": torch.arange(10 * 32, dtype=torch.float32).reshape(10, 32)}
    path = tmp_path / "shared/statistics" / computed.name
    path.parent.mkdir(parents=True)
    thread = write_later(0.5, lambda: torch.save(written, path))
    method = NormDirection()
    with caplog.at_level("INFO", logger="kd_experiments.teachers"):
        prepare_teacher_statistics(method, teacher, dataset_cfg, data, str(tmp_path / "shared"))
    thread.join()
    assert "Rank 1: waiting for rank 0 to write teacher statistics class_centers" in caplog.text
    assert torch.equal(method.class_centers, written["class_centers"])


def test_rank_one_gives_up_with_one_line_that_says_what_to_fix(rank_one, monkeypatch, tmp_path):
    monkeypatch.setenv("KD_CACHE_WAIT_S", "0.3")
    cfg = compose_config("teacher.train_if_missing=true")
    weights_path, _ = teacher_paths(cfg, tmp_path)
    with pytest.raises(UserError) as caught:
        build_teacher(cfg.teacher, cfg.dataset, DigitsData(), str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert "rank 1 waited 0.3s for rank 0" in message and str(weights_path) in message
    assert "paths.teacher_cache_dir must be on a filesystem every node shares" in message


def launch(rank: int, cwd, cache_dir, log_path) -> subprocess.Popen:
    """The CLI as one task of `srun` (SLURM_PROCID), KD++ (ND class centres) with a fresh teacher."""
    env = {k: v for k, v in clean_env(cwd).items() if k not in RANK_VARIABLES}
    env |= {"SLURM_PROCID": str(rank), "KD_CACHE_WAIT_S": "120"}
    cwd.mkdir()
    args = [*QUICK, "method=kd++", "teacher.recipe.max_epochs=3", f"paths.teacher_cache_dir={cache_dir}"]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kd_experiments", *args], cwd=cwd, env=env, stdout=log, stderr=log
        )


def test_srun_tasks_share_the_teacher_and_statistics_rank_zero_computed(tmp_path):
    cache_dir = tmp_path / "cache"
    logs = {rank: tmp_path / f"rank{rank}.log" for rank in (0, 1)}
    rank_one = launch(1, tmp_path / "rank1", cache_dir, logs[1])
    try:
        # Rank zero starts only once rank one waits, so that rank one cannot find a finished cache.
        deadline = time.monotonic() + 120
        while "waiting for rank 0" not in logs[1].read_text():
            assert rank_one.poll() is None, logs[1].read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 never started waiting"
            time.sleep(0.2)
        rank_zero = launch(0, tmp_path / "rank0", cache_dir, logs[0])
        assert rank_zero.wait(timeout=180) == 0, logs[0].read_text()[-3000:]
        assert rank_one.wait(timeout=180) == 0, logs[1].read_text()[-3000:]
    finally:
        rank_one.kill()
    zero, one = logs[0].read_text(), logs[1].read_text()
    (weights,) = cache_dir.glob("convnet_wide-digits-*.pt")
    (centres,) = cache_dir.glob("statistics/class_centers-convnet_wide-*.pt")
    assert "training it with CE" in zero and "training it with CE" not in one
    assert f"Teacher convnet_wide: reusing cached weights {weights}" in one
    assert "Teacher statistics class_centers: computed" in zero
    assert f"Teacher statistics class_centers: reusing {centres}" in one
    assert "waiting for rank 0" not in zero


def test_lightning_ddp_children_reuse_what_the_main_process_cached(tmp_path):
    """Lightning's own launcher starts rank 1 inside trainer.fit (LOCAL_RANK=1), after the main process
    filled the cache: it must load at once, never wait."""
    env = {k: v for k, v in clean_env(tmp_path).items() if k not in RANK_VARIABLES}
    env["KD_CACHE_WAIT_S"] = "5"  # a child that waited would wait for a main process stuck in fit
    cache_dir = tmp_path / "cache"
    args = ["trainer.max_epochs=1", "logger=none", "++trainer.enable_model_summary=false", "method=kd++"]
    args += ["teacher.recipe.max_epochs=3", f"paths.teacher_cache_dir={cache_dir}"]
    args += ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    result = subprocess.run(
        [sys.executable, "-m", "kd_experiments", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    assert output.count("training it with CE") == 1 and output.count("class_centers: computed") == 1
    assert output.count("reusing cached weights") == 1 and output.count("class_centers: reusing") == 1
    assert "waiting for rank 0" not in output


def test_the_main_process_of_another_node_waits_too(monkeypatch, tmp_path):
    """Nodes started by hand for Lightning's multi-node mode set only NODE_RANK: node 1's main process is
    local rank 0 but must not compute its own copy."""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("KD_CACHE_WAIT_S", "0.1")
    assert not teachers._is_rank_zero()
    with pytest.raises(UserError, match="rank 0 of node 1 waited 0.1s for rank 0"):
        teachers.wait_for_files([tmp_path / "never.pt"], "a test file")
    monkeypatch.setenv("NODE_RANK", "0")
    assert teachers._is_rank_zero()


def test_two_runs_started_together_train_their_teacher_once(tmp_path):
    # Two independent runs (a parallel sweep, two shells) that need one uncached teacher: the file lock lets
    # one train it while the other waits, then reads the cached file.
    cache = tmp_path / "teachers"
    command = [
        sys.executable, "-m", "kd_experiments", "method=ce", *QUICK, "teacher.recipe.max_epochs=40",
        f"paths.teacher_cache_dir={cache}",
    ]  # fmt: skip
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = clean_env(tmp_path / name) | {"OMP_NUM_THREADS": "1"}
        runs.append(
            subprocess.Popen(command, cwd=tmp_path / name, env=env, stderr=subprocess.PIPE, text=True)
        )
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    sources = sorted(
        json.loads(p.read_text())["teacher_source"] for p in tmp_path.glob("*/outputs/runs/*/*/summary.json")
    )
    assert sources == ["cache", "trained"]
    assert len(list(cache.glob("convnet_wide-*.pt"))) == 1
