"""Hydra sweeps (callbacks in conf/hydra/default.yaml). A job that fails with a one-line error never stops the
jobs after it, and the sweep says which failed and ends non-zero, whichever process ran the job (Hydra's
basic launcher: this one; joblib, submitit: others): the job leaves `failed.txt` in its folder and the sweep
reads them at the end. The number a job returns to a sweeper (`optimized_metric`), and the Optuna result
said at the end. Output folders: one that cannot be written is one line before Hydra tries to create it
(which would end in a traceback)."""

import json
import math
import re
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_experiments.errors import UserError
from kd_experiments.files import atomic_write_text, require_writable

# A failed job's record in its own folder: one line, `#<job num> (<overrides>): <error>`.
FAILED_MARKER = "failed.txt"
# The failed jobs this process ran: with Hydra's basic launcher every job, and the record of a job whose
# folder could not take `failed.txt` (an unwritable output folder is such an error).
FAILED_JOBS: list[str] = []
# What `optimized_metric` may name: the summary.json numbers a sweeper can optimise (`train()` returns it).
METRICS = ("student_top1_reported", "student_top1", "student_top1_best", "student_top1_ema", "student_top5")
# A detection run's (detection/run.py): mAP@[.5:.95] as reported (`report`: last or best), mAP@.5,
# VOC07 mAP@.5.
METRICS += ("student_map_reported", "student_map", "student_map_best", "student_map50", "student_voc07_map50")
DEFAULT_METRIC = "student_top1_reported"
OPTUNA_RESULTS = "optimization_results.yaml"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(message: str) -> None:
    """Record this job as failed: `failed.txt` in its folder for the sweep's process, wherever that runs."""
    hydra_cfg = HydraConfig.get()
    line = f"#{hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): {message}"
    FAILED_JOBS.append(line)
    try:
        atomic_write_text(line + "\n", Path(hydra_cfg.runtime.output_dir) / FAILED_MARKER)
    except OSError as error:
        print(f"warning: job #{hydra_cfg.job.num}: {FAILED_MARKER} not written: {error}", file=sys.stderr)


def failed_jobs(sweep_dir: Path) -> list[str]:
    """The failed jobs' lines under `sweep_dir` (any depth: job folders may be named anything) and this
    process's own, once each, in job order."""
    lines = {line.strip() for line in FAILED_JOBS}
    if sweep_dir.is_dir():
        for marker in sweep_dir.rglob(FAILED_MARKER):
            try:
                lines.add(marker.read_text().strip())
            except OSError:
                continue
    lines.discard("")

    def job_order(line: str) -> tuple[int, str]:
        number = re.match(r"#(\d+) ", line)
        return (int(number.group(1)) if number else sys.maxsize, line)

    return sorted(lines, key=job_order)


def check_optimized_metric(cfg: DictConfig) -> str:
    """`optimized_metric`, checked before anything trains; a name summary.json has no number for is one
    line naming the ones it has."""
    name = cfg.get("optimized_metric", DEFAULT_METRIC)
    if name not in METRICS:
        choices = ", ".join(METRICS)
        raise UserError(
            f"optimized_metric={name!r} is not a number summary.json reports; use one of: {choices}"
        )
    if name == "student_top1_ema" and cfg.get("ema_decay") is None:
        raise UserError("optimized_metric=student_top1_ema needs a student EMA: set ema_decay, e.g. 0.99996")
    return name


def objective_value(summary: dict, cfg: DictConfig) -> float | None:
    """What a job returns to the sweeper: summary[optimized_metric], or None where the run has no such number
    (the Optuna sweeper then marks the trial failed and the study goes on)."""
    name = check_optimized_metric(cfg)
    if name == DEFAULT_METRIC and "student_map_reported" in summary:  # a detection / multi-label run
        name = "student_map_reported"  # the default is the reported number, whichever the task's is
    value = summary.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None  # not NaN: Optuna 2.x refuses a NaN in a way that stops the whole study
    return float(value)


def optuna_result(config: DictConfig) -> str | None:
    """What to say of the Optuna study that just ended (its `optimization_results.yaml`): the best value, its
    parameters and the job folder that got it."""
    sweep_dir = Path(config.hydra.sweep.dir)
    results_path = sweep_dir / OPTUNA_RESULTS
    if "optuna" not in str(config.hydra.sweeper.get("_target_", "")) or not results_path.exists():
        return None
    results = OmegaConf.to_container(OmegaConf.load(results_path))
    if "best_params" not in results:  # several directions: a Pareto front, listed in the file itself
        return f"Optuna: {len(results.get('solutions', []))} Pareto-optimal trials in {results_path}"
    overrides = [f"{key}={value}" for key, value in results["best_params"].items()]
    job = _job_with_overrides(sweep_dir, overrides)
    metric = config.get("optimized_metric", DEFAULT_METRIC)
    lines = [f"Optuna: best {metric} {results['best_value']} ({results_path})", f"  {' '.join(overrides)}"]
    if job is not None:
        lines.append(f"  job folder: {job}")
    return "\n".join(lines)


def _job_with_overrides(sweep_dir: Path, overrides: list[str]) -> Path | None:
    for path in sorted(sweep_dir.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if set(overrides) <= set(summary.get("overrides") or []):
            return path.parent
    return None


class FailedJobs(Callback):
    """Hydra callback (conf/hydra/default.yaml): after the last job, say the Optuna result (an Optuna study),
    then name the failed jobs on stderr and exit 2, so a sweep with failures never looks like a success to
    a shell or a scheduler."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        FAILED_JOBS.clear()

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # A job run again in its folder (a re-run sweep) starts without its earlier failure record.
        if in_multirun():
            (Path(HydraConfig.get().runtime.output_dir) / FAILED_MARKER).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        result = optuna_result(config)
        if result:
            print(result)
        failed = failed_jobs(Path(config.hydra.sweep.dir))
        if failed:
            print(f"error: {len(failed)} sweep job(s) failed:", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(2)


class WritableOutputs(Callback):
    """Check `hydra.run.dir` (a run) or `hydra.sweep.dir` (a sweep) before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, key: str) -> None:
        try:
            require_writable(directory, key)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
