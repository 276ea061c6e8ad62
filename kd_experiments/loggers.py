"""Experiment loggers. W&B runs offline without credentials, and a W&B failure never fails a run."""

import csv
import logging
import netrc
import os
import sys
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class ForgivingWandbLogger(WandbLogger):
    """WandbLogger whose logging calls warn once instead of raising: losing a metric beats losing a run."""

    _failed = False

    def _guard(self, call, *args, **kwargs):
        if self._failed:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as error:
            self._failed = True
            reason = " ".join(str(error).split())[:300]
            log.warning(
                f"W&B logging failed ({type(error).__name__}: {reason}); the run continues without it"
            )
            return None

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self._guard(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        self._guard(super().log_hyperparams, params)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard(super().finalize, status)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes the metrics.csv it finds; this one appends to it, so a resumed run
    keeps the rows of the epochs before the interruption (those of an interrupted epoch appear twice, each
    row with its step)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that continues the metrics.csv of the run it resumes instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(
    save_dir: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
    mode: str | None = None,
    run_id: str | None = None,
    job_type: str | None = None,
    quiet: bool = True,
) -> Logger:
    """Build the W&B logger. Mode: `mode` if set, else WANDB_MODE if set, else online with credentials and
    offline without. `run_id` continues that W&B run (a resumed run). `quiet`: W&B's console output without
    its end-of-run history and summary blocks (warnings and errors still show). If W&B cannot start at all,
    fall back to CSV logs in the run directory."""
    if mode is None and not os.environ.get("WANDB_MODE"):
        mode = "online" if has_wandb_credentials() else "offline"
        if mode == "offline":
            log.info(
                f"No W&B credentials: logging offline under {save_dir}/wandb (upload later with `wandb sync`)"
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        logger = ForgivingWandbLogger(
            save_dir=save_dir,
            project=project,
            name=name,
            group=group,
            entity=entity,
            tags=list(tags or []),
            job_type=job_type,
            settings=wandb.Settings(quiet=bool(quiet)),
            **({"mode": mode} if mode else {}),
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        init_args = getattr(logger, "_wandb_init", {})
        if "anonymous" in init_args and init_args["anonymous"] is None:  # W&B warns of it, even of None
            del init_args["anonymous"]
        _ = logger.experiment  # start the run now, so a failure here falls back instead of failing later
        return logger
    except Exception as error:
        log.warning(
            f"W&B could not start ({type(error).__name__}: {error}); logging to CSV in {save_dir} instead"
        )
        return ResumableCSVLogger(save_dir=save_dir, name="csv", version="")


def finish_logger(logger, summary: dict | None = None, exit_code: int = 0) -> None:
    """End the W&B run of this job: write the run's final numbers (`summary`: its scalar values) into the
    run summary, finish the run (a non-zero `exit_code` marks it failed) and, for an offline run, print the
    `wandb sync` command that uploads it. Lightning leaves the run open, and the next job of a multirun
    (same process) would otherwise log into it. A W&B failure here warns and never fails the run."""
    if not isinstance(logger, WandbLogger) or logger._experiment is None:
        return
    run = logger._experiment
    values = {k: v for k, v in (summary or {}).items() if isinstance(v, (bool, int, float, str))}
    try:
        if values:
            run.summary.update(values)
    except Exception as error:
        log.warning(f"W&B could not record the run's final numbers ({type(error).__name__}: {error})")
    try:
        offline_dir = Path(run.sync_dir) if run.offline else None
    except Exception:
        offline_dir = None
    try:
        run.finish(exit_code=exit_code)
    except Exception as error:
        log.warning(f"W&B could not finish the run cleanly ({type(error).__name__}: {error})")
    if offline_dir is not None and offline_dir.is_dir():
        print(f"W&B logged offline; upload with: wandb sync {offline_dir}", file=sys.stderr)
