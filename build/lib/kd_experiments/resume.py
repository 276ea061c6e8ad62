"""Continuing a run: where it stands in its directory, which checkpoint it resumes from, and the random
state that makes a resumed run the uninterrupted one.

A run directory holds `.hydra/config.yaml` from the moment training starts. Starting a run there again
(`resume=RUN_DIR`, or the identical command with the same `hydra.run.dir`, which is what SLURM requeue and
Hydra's submitit launcher do) continues from `checkpoints/last.ckpt`, the end of the latest finished epoch:
an interrupted epoch is trained again from its start, on the same random stream, so the resumed run equals
the uninterrupted one. A different config there is refused before any file is touched.
"""

import json
import os
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_experiments.errors import UserError
from kd_experiments.files import atomic_torch_save
from kd_experiments.sweep import in_multirun

LAST_CHECKPOINT = Path("checkpoints/last.ckpt")
SAVED_CONFIG = Path(".hydra/config.yaml")
# The only key `resume=RUN_DIR` may change: a finished or stopped run may be trained for longer.
EXTENDABLE = "trainer.max_epochs"


@dataclass
class RunStart:
    """How this run begins in its directory: `cfg` to train with, the checkpoint to continue from (None:
    from scratch), and whether the directory already holds this run, finished."""

    cfg: DictConfig
    checkpoint: Path | None = None
    finished: dict | None = None
    previous: dict = field(default_factory=dict)  # the directory's summary.json of an earlier attempt
    continuing: bool = False  # the directory already holds this run's saved config
    saved: dict | None = None  # the checkpoint's epoch, step and logger run id (checkpoint_info)


def start_in(cfg: DictConfig, output_dir: Path, summary_path: Path) -> RunStart:
    """Decide, touching no file, how a run begins in `output_dir`; a UserError where it may not."""
    if cfg.get("resume"):
        cfg = _resumed_config(cfg, output_dir)
    saved_path = output_dir / SAVED_CONFIG
    previous = _read_summary(summary_path)
    if not saved_path.exists():
        if previous is not None:  # a finished run of an older version, or one whose config was removed
            raise UserError(
                f"{output_dir} already holds a finished run (summary.json); pick a new hydra.run.dir"
            )
        return RunStart(cfg)
    _check_same_config(cfg, saved_path, output_dir)
    if cfg.get("resume"):  # the saved path is Hydra's run dir, which a run outside the CLI does not have
        cfg.paths.output_dir = str(output_dir)
    epochs_done = previous.get("epochs") if previous else None
    if previous and previous.get("status") == "completed":
        if not cfg.get("resume"):  # the identical command again: nothing left to do
            return RunStart(cfg, finished=previous)
        if cfg.trainer.max_epochs <= (epochs_done or 0):
            raise UserError(
                f"{output_dir} finished all {epochs_done} epochs; to train it longer give a larger "
                f"{EXTENDABLE} (resume={output_dir} {EXTENDABLE}=N)"
            )
    checkpoint = output_dir / LAST_CHECKPOINT if (output_dir / LAST_CHECKPOINT).exists() else None
    saved = checkpoint_info(checkpoint) if checkpoint is not None else None
    return RunStart(cfg, checkpoint, previous=previous or {}, continuing=True, saved=saved)


def _read_summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable"}


def _resumed_config(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """`resume=RUN_DIR`: the config saved in that run, with at most a longer `trainer.max_epochs`."""
    if in_multirun():
        raise UserError(
            "resume= continues one run; to continue a sweep, run the same -m command again with the same "
            "hydra.sweep.dir"
        )
    run_dir = Path(cfg.resume).expanduser().resolve()
    saved_path = run_dir / SAVED_CONFIG
    if not saved_path.exists():
        raise UserError(
            f"resume={cfg.resume}: no run there ({saved_path} not found); give a run directory such as "
            "outputs/runs/<date>/<time>_<method>"
        )
    if run_dir != output_dir:
        raise UserError(
            f"resume={cfg.resume} continues that run in its own directory; drop hydra.run.dir, which "
            f"points at {output_dir}"
        )
    changed = [key for key in _override_keys() if key not in ("resume", EXTENDABLE)]
    if changed:
        raise UserError(
            f"resume= continues a run with its saved config; drop {', '.join(changed)} (only a longer "
            f"{EXTENDABLE} may be given)"
        )
    saved = OmegaConf.load(saved_path)
    epochs = cfg.trainer.max_epochs if EXTENDABLE in _override_keys() else saved.trainer.max_epochs
    if epochs < saved.trainer.max_epochs:
        raise UserError(
            f"{EXTENDABLE}={epochs} is shorter than the run's {saved.trainer.max_epochs}; a resumed run "
            "may only be made longer"
        )
    saved.trainer.max_epochs = epochs
    saved.resume = cfg.resume
    return saved


def _override_keys() -> list[str]:
    """The keys the command line set (`a.b=1`, `+a.b=1`, `~a.b`), or none outside the Hydra CLI."""
    if not HydraConfig.initialized():
        return []
    return [text.split("=", 1)[0].lstrip("+~") for text in HydraConfig.get().overrides.task]


def _check_same_config(cfg: DictConfig, saved_path: Path, output_dir: Path) -> None:
    """The run in `output_dir` must be this one (a longer `trainer.max_epochs` aside, through resume=)."""
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False))
    current = _flat(OmegaConf.to_container(cfg, resolve=False))
    ignored = {"resume"} | ({EXTENDABLE} if cfg.get("resume") else set())
    # changed values first, then keys only one side has (a config from another version of the framework)
    keys = sorted(set(saved) | set(current), key=lambda k: (k not in saved or k not in current, k))
    differences = [
        f"{key}: {saved.get(key, '<unset>')!r} there, {current.get(key, '<unset>')!r} now"
        for key in keys
        if key not in ignored and saved.get(key) != current.get(key)
    ]
    if differences:
        more = len(differences) - 3
        shown = "; ".join(differences[:3]) + (f" (and {more} more)" if more > 0 else "")
        raise UserError(
            f"{output_dir} holds a run with a different config ({shown}); pick a new hydra.run.dir, or "
            f"continue that run with resume={output_dir}"
        )


def _flat(tree, prefix: str = "") -> dict:
    """{"a.b": leaf, ...}; an empty mapping (no callbacks) adds nothing, as an absent one."""
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat |= _flat(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: tree}


def checkpoint_info(checkpoint: Path) -> dict:
    """The epoch, step and logger run id saved in `checkpoint`, read without loading its tensors."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split()).split(". ")[0]
        raise UserError(
            f"cannot resume from {checkpoint}: it is unreadable ({reason}); move it away to start the run "
            "over in this directory"
        ) from None
    return {
        "epoch": saved.get("epoch"),
        "step": saved.get("global_step"),
        "logger_run_id": saved.get("logger_run_id"),
    }


class RandomState(pl.Callback):
    """Saves the random generators (torch CPU and CUDA, numpy, Python) in every checkpoint and puts them
    back when training continues from one: the next epoch draws its shuffle and augmentations exactly as the
    uninterrupted run did. Lightning itself restores weights, optimizer, scheduler, loops and callbacks, but
    not the generators. They are set as the checkpoint is restored, because Lightning creates the first
    epoch's data iterator (drawing the shuffle) before any `on_train_start` hook runs."""

    def state_dict(self) -> dict:
        # Tensors, ints and tuples only: Lightning reads checkpoints with torch.load(weights_only=True).
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


INTERRUPTED_CHECKPOINT = Path("checkpoints/interrupted.ckpt")


class Interrupted(Exception):
    """The run was stopped by a signal (SIGTERM, SIGUSR1) after saving a checkpoint; exit 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Preemption(pl.Callback):
    """SIGTERM (a scheduler's pre-emption, `kill`) and SIGUSR1 (SLURM's warning before the time limit)
    stop the run cleanly: Lightning finishes the current step and raises; this saves that step as
    `checkpoints/interrupted.ckpt` and the run layer marks the run interrupted and exits non-zero.

    Lightning turns SIGTERM into a stop after the current batch. SIGUSR1 is passed on as a SIGTERM to this
    process, except under SLURM with auto-requeue, where Lightning's own SIGUSR1 handler saves
    `hpc_ckpt_N.ckpt` and requeues the job, and SLURM's SIGTERM then stops it here."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / INTERRUPTED_CHECKPOINT
        self.signum: int | None = None
        self.saved: Path | None = None

    @contextmanager
    def signals(self, trainer: pl.Trainer):
        """Install the handlers around `trainer.fit` (Lightning adds its own on top and restores ours
        after; ours are undone here, whether fit returns or raises)."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeues = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        # Lightning calls the SIGTERM handler it finds installed after its own; SIGUSR1 stays Lightning's
        # under SLURM.
        wanted = {signal.SIGTERM: self._record}
        if not slurm_requeues:
            wanted[signal.SIGUSR1] = self._as_sigterm
        previous = {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def _as_sigterm(self, signum, frame) -> None:
        self.signum = signum
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this step, as for a SIGTERM

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            self.saved = self.path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but whole or not at all: a run killed while saving `last.ckpt` keeps
    the previous epoch's file, so it can still be resumed."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported here, got {storage_options!r}")
        atomic_torch_save(checkpoint, Path(path))
