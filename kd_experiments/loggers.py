"""Experiment loggers. W&B runs offline without credentials, and a W&B failure never fails a run."""

import logging
import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
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


def wandb_logger(
    save_dir: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
    mode: str | None = None,
) -> Logger:
    """Build the W&B logger. Mode: `mode` if set, else WANDB_MODE if set, else online with credentials and
    offline without. If W&B cannot start at all, fall back to CSV logs in the run directory."""
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
        )
        _ = logger.experiment  # start the run now, so a failure here falls back instead of failing later
        return logger
    except Exception as error:
        log.warning(
            f"W&B could not start ({type(error).__name__}: {error}); logging to CSV in {save_dir} instead"
        )
        return CSVLogger(save_dir=save_dir, name="csv", version="")


def finish_logger(logger) -> None:
    """End the W&B run of this job: Lightning leaves it open, and the next job of a multirun (same
    process) would otherwise log into it."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        try:
            logger._experiment.finish()
        except Exception as error:
            log.warning(f"W&B could not finish the run cleanly ({type(error).__name__}: {error})")
