"""Studies: the Optuna preset (hparams_search=kd_optuna) through the real CLI, parallel joblib sweeps (one
thread budget split between the jobs; a failed job recorded in its folder, named by the sweep's process),
and the number a run returns to a sweeper (`optimized_metric`)."""

import json
import subprocess
from pathlib import Path

import pytest
from joblib import cpu_count
from omegaconf import OmegaConf

from kd_experiments import sweep
from kd_experiments.errors import UserError
from kd_experiments.sweep import FAILED_MARKER, failed_jobs, objective_value
from tests.conftest import clean_env, compose_config, run_cli, run_main_in_process

QUIET = ["logger=none", "++trainer.enable_model_summary=false", "++trainer.enable_progress_bar=false"]


def sweep_summaries(root: Path) -> list[dict]:
    """The summary.json of every job of the one sweep under `root` (job folders may be named anything:
    found at any depth)."""
    (sweep_dir,) = root.glob("outputs/multirun/*/*")
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]


def test_optuna_preset_runs_a_study_and_names_its_best_trial(workdir):
    result = run_cli(
        "-m", "hparams_search=kd_optuna", "hydra.sweeper.n_trials=3", "trainer.max_epochs=1", *QUIET,
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sweep_summaries(workdir)
    assert [s["status"] for s in summaries] == ["completed"] * 3
    (sweep_dir,) = workdir.glob("outputs/multirun/*/*")
    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    best = results["best_params"]
    assert set(best) == {"method.objectives.kd.temperature", "method.weights.kd"}
    assert 1.0 <= best["method.objectives.kd.temperature"] <= 8.0 and 0.1 <= best["method.weights.kd"] <= 2.0
    # direction maximize of optimized_metric (student_top1_reported), over three different trials
    assert results["best_value"] == max(s["student_top1_reported"] for s in summaries)
    assert len({s["overrides"][0] for s in summaries}) == 3
    best_overrides = {f"{key}={value}" for key, value in best.items()}
    (best_job,) = [s for s in summaries if best_overrides <= set(s["overrides"])]
    assert best_job["student_top1_reported"] == results["best_value"]
    assert f"Optuna: best student_top1_reported {results['best_value']}" in result.stdout
    assert f"job folder: {Path(best_job['output_dir']).relative_to(workdir)}" in result.stdout


@pytest.fixture(scope="module")
def joblib_sweep(project_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Three jobs, two at a time, on the joblib launcher; seed -1 is refused in one line. No thread count
    inherited from the caller's environment (OMP_NUM_THREADS=1 under pytest): the launcher's split shows."""
    root = tmp_path_factory.mktemp("joblib")
    env = {k: v for k, v in clean_env(root).items() if not k.endswith("_NUM_THREADS")}
    result = run_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,-1", "trainer.max_epochs=1",
        f"paths.teacher_cache_dir={project_dir}/outputs/teachers", *QUIET, cwd=root, env=env,
    )  # fmt: skip
    return root, result


def test_joblib_jobs_run_in_parallel_with_the_cores_split_between_them(joblib_sweep):
    root, result = joblib_sweep
    summaries = {s["seed"]: s for s in sweep_summaries(root)}
    statuses = {seed: summary["status"] for seed, summary in summaries.items()}
    assert statuses == {0: "completed", 1: "completed", -1: "failed"}
    # loky starts each worker with OMP_NUM_THREADS = cores // n_jobs: 1 torch thread each on 2 cores
    assert [summaries[seed]["torch_threads"] for seed in (0, 1)] == [max(1, cpu_count() // 2)] * 2


def test_a_failed_joblib_job_does_not_stop_the_sweep_and_is_named(joblib_sweep):
    root, result = joblib_sweep
    message = "seed must be an integer from 0 to 2**32 - 1, got -1"
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert f"error: {message}" in lines  # the job's own line, from its worker process
    # ... and the sweep's list, read from the job's failed.txt by the process that ran the sweep
    assert lines.count("error: 1 sweep job(s) failed:") == 1
    (listed,) = [line for line in lines if line.startswith("  #2 (seed=-1 trainer.max_epochs=1 paths.")]
    assert listed.endswith(f"): {message}") and "Traceback" not in result.stderr
    (marker,) = root.glob(f"outputs/multirun/*/*/**/{FAILED_MARKER}")
    assert marker.read_text() == listed.strip() + "\n"


def test_failed_job_records_are_found_at_any_depth_in_job_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "FAILED_JOBS", [])  # none left by an earlier in-process sweep
    for folder, number in (("10_seed=3", 10), ("2_a=b/c", 2), ("0", 0)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / FAILED_MARKER).write_text(f"#{number} (x={number}): refused\n")
    (tmp_path / "1").mkdir()  # a job that did not fail
    assert failed_jobs(tmp_path) == ["#0 (x=0): refused", "#2 (x=2): refused", "#10 (x=10): refused"]


def test_a_rerun_job_starts_without_its_earlier_failure_record(workdir, monkeypatch, capsys):
    # resume= is refused in a sweep and is not part of the job folder's name: the same folder again
    command = ["-m", "seed=0", "trainer.max_epochs=1", f"hydra.sweep.dir={workdir}/sweep", *QUIET]
    first = run_main_in_process(
        *command, "resume=elsewhere", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert first.returncode == 2 and "error: 1 sweep job(s) failed:" in first.stderr
    (marker,) = (workdir / "sweep").rglob(FAILED_MARKER)
    again = run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not marker.exists()
    assert json.loads((marker.parent / "summary.json").read_text())["status"] == "completed"


def test_the_optimized_metric_is_what_a_run_returns():
    cfg = compose_config()
    assert cfg.optimized_metric == "student_top1_reported"
    summary = {"student_top1_reported": 91.5, "student_top1_best": 93.0, "student_top1_ema": None}
    assert objective_value(summary, cfg) == 91.5
    assert objective_value(summary, compose_config("optimized_metric=student_top1_best")) == 93.0
    assert objective_value({"student_top1_reported": float("nan")}, cfg) is None  # a failed Optuna trial
    with pytest.raises(UserError, match="optimized_metric='wall_s' is not a number summary.json reports"):
        objective_value(summary, compose_config("optimized_metric=wall_s"))


def test_a_misspelt_optimized_metric_stops_the_run_before_training(workdir, monkeypatch, capsys):
    result = run_main_in_process("optimized_metric=student_top1_bset", *QUIET, cwd=workdir,
                                 monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: optimized_metric='student_top1_bset' is not a number summary.json reports; use one of: "
        "student_top1_reported, student_top1, student_top1_best, student_top1_ema, student_top5, "
        "student_map_reported, student_map, student_map_best, student_map50, student_voc07_map50"
    )
    assert not list(workdir.glob("outputs/runs/*/*/summary.json"))
