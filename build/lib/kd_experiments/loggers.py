"""Experiment loggers. W&B runs offline without credentials, and a W&B failure never fails a run."""

import csv
import logging
import netrc
import os
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
) -> Logger:
    """Build the W&B logger. Mode: `mode` if set, else WANDB_MODE if set, else online with credentials and
    offline without. `run_id` continues that W&B run (a resumed run). If W&B cannot start at all, fall back
    to CSV logs in the run directory."""
    if mode is None and not os.environ.get("WANDB_MODE"):
        mode = "online" if has_wandb_credentials() else "offline"
        if mode == "offline":
            log.info(
                f"No W&B credentials: logging offline under {save_dir}/wandb (upload later with `wandb sync`)"
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    try:
        logger = ForgivingWandbLogger(
            save_dir=save_dir,
            project=project,
            name=name,
            group=group,
            entity=entity,
            tags=list(tags or []),
            **({"mode": mode} if mode else {}),
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        _ = logger.experiment  # start the run now, so a failure here falls back instead of failing later
        return logger
    except Exception as error:
        log.warning(
            f"W&B could not start ({type(error).__name__}: {error}); logging to CSV in {save_dir} instead"
        )
        return ResumableCSVLogger(save_dir=save_dir, name="csv", version="")


def finish_logger(logger) -> None:
    """End the W&B run of this job: Lightning leaves it open, and the next job of a multirun (same
    process) would otherwise log into it."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        try:
            logger._experiment.finish()
        except Exception as error:
            log.warning(f"W&B could not finish the run cleanly ({type(error).__name__}: {error})")
