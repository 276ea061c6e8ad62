"""Hydra callbacks (conf/hydra/default.yaml). Sweeps: a job that fails with a one-line error never stops the
jobs after it, and the sweep says which failed and ends non-zero. Output folders: one that cannot be
written is one line before Hydra tries to create it (which would end in a traceback)."""

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kd_experiments.errors import UserError
from kd_experiments.files import require_writable

# The failed jobs of the sweep running in this process (Hydra's basic launcher runs every job here).
FAILED_JOBS: list[str] = []


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(message: str) -> None:
    job = HydraConfig.get().job
    FAILED_JOBS.append(f"#{job.num} ({' '.join(HydraConfig.get().overrides.task)}): {message}")


class FailedJobs(Callback):
    """Hydra callback (conf/hydra/default.yaml): after the last job, name the failed ones on stderr and
    exit 2, so a sweep with failures never looks like a success to a shell or a scheduler."""

    def on_multirun_start(self, config, **kwargs) -> None:
        FAILED_JOBS.clear()

    def on_multirun_end(self, config, **kwargs) -> None:
        if FAILED_JOBS:
            print(f"error: {len(FAILED_JOBS)} sweep job(s) failed:", file=sys.stderr)
            for line in FAILED_JOBS:
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
