"""DDP under Hydra: the command Lightning starts the other local ranks with, and work done once on global rank
zero with the result shared.

Lightning's `_SubprocessScriptLauncher` starts local ranks 1..N-1 inside `trainer.fit` by running the command
line again. Under Hydra it appends `hydra.run.dir=<run.dir>` to `sys.argv`, which is wrong for a sweep:
`sys.argv` holds `-m` and every sweep value, so each child ran the whole sweep again (a second
`outputs/multirun/<time>/` folder, jobs that join the wrong process group), and `hydra.run.dir` is not the
job's folder in a multirun. `child_command` starts the child as this one job instead: the job's own
overrides, in run mode, in the job's resolved output folder. Importing this module installs it
(`install_child_command`; train.py imports it).

A sweep runs its jobs one after another in one process (Hydra's basic launcher; a joblib worker too), and
Lightning leaves the first job's process group and rendezvous variables behind: the next job would train on
a group whose other rank has exited. `end_previous_job` undoes both at the start of each job."""

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.utils import get_original_cwd, to_absolute_path

log = logging.getLogger(__name__)

T = TypeVar("T")
# Where Lightning builds the command of a child rank under Hydra (a private name: see install_child_command).
LAUNCHER_MODULE = "pytorch_lightning.strategies.launchers.subprocess_script"
LAUNCHER_FUNCTION = "_hydra_subprocess_cmd"
# What Lightning's subprocess launcher puts in its own process's environment before starting the children.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Those this process was started with (torchrun, srun, a Lightning child rank): never ours to remove.
STARTED_WITH = frozenset(name for name in LAUNCHER_ENV if name in os.environ)


def hydra_quoted(value: str) -> str:
    """`value` as a Hydra override value that parses back to exactly `value`: single-quoted (the grammar's
    escapes for quotes and backslashes, Hydra's own `QuotedString`), with `${` escaped so that a folder name
    holding one is not read as an interpolation. A job folder such as `3_method=kd,seed=1` holds `=` and `,`,
    which an unquoted value may not."""
    return QuotedString(text=value.replace("${", "\\${"), quote=Quote.single).with_quotes()


def child_command(
    program: Sequence[str], task_overrides: Sequence[str], output_dir: str, local_rank: int
) -> list[str]:
    """The command line of local rank `local_rank` of this job: `program` (python -m module), the job's own
    overrides (what the sweeper chose for this job, never `-m` nor the sweep's lists), run mode (a config
    such as hparams_search sets `hydra.mode: MULTIRUN`, which would start a sweep again), and the job's
    resolved output folder, where rank 0 already writes; no Hydra config copy (`output_subdir=null`)."""
    return [
        *program,
        *task_overrides,
        "hydra.mode=RUN",
        f"hydra.run.dir={hydra_quoted(str(output_dir))}",
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]


def hydra_child_command(local_rank: int) -> tuple[list[str], str]:
    """Replacement for Lightning's `_hydra_subprocess_cmd(local_rank)`: (command, working directory) of a
    child rank of the current Hydra job."""
    import __main__  # at call time, as Lightning does (Lightning-AI/pytorch-lightning#15218)

    if __main__.__spec__ is None:  # python path/to/script.py
        program = [sys.executable, to_absolute_path(sys.argv[0])]
    else:  # python -m kd_experiments
        program = [sys.executable, "-m", __main__.__spec__.name]
    hydra_cfg = HydraConfig.get()
    command = child_command(program, list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir, local_rank)
    return command, get_original_cwd()


def install_child_command() -> bool:
    """Point Lightning's launcher at `hydra_child_command`. The launcher module imported the function by
    name (`from lightning_fabric...subprocess_script import _hydra_subprocess_cmd`), so that module's
    name is the one to replace. It is private API with no public hook (a custom launcher would mean a custom
    DDP strategy for every `trainer.strategy` string); tests/test_ddp.py fails when Lightning renames it or
    stops calling it. Returns whether it was installed; warns when Lightning no longer has it."""
    module = importlib.import_module(LAUNCHER_MODULE)
    current = getattr(module, LAUNCHER_FUNCTION, None)
    if current is None:
        warnings.warn(
            f"{LAUNCHER_MODULE}.{LAUNCHER_FUNCTION} is gone (a newer Lightning): DDP child processes of a "
            "Hydra multirun may re-run the whole sweep",
            stacklevel=2,
        )
        return False
    setattr(module, LAUNCHER_FUNCTION, hydra_child_command)
    return True


def end_previous_job() -> list[str]:
    """Before a job: if an earlier job of this process started DDP ranks itself (a sweep's jobs share the
    process), destroy its process group and drop the variables Lightning's launcher set, so that this job
    starts its own group on a fresh port, as a new process would. A process started as a rank (torchrun,
    srun, a Lightning child) keeps its environment and group: there every rank runs the same jobs in the
    same order, and the group serves them all. The mark of the launcher is LOCAL_RANK, which it sets to 0 in
    its own process (Lightning's SLURM environment sets only MASTER_ADDR and MASTER_PORT; WORLD_SIZE goes
    at teardown). Returns the variables removed."""
    set_here = [name for name in LAUNCHER_ENV if name in os.environ and name not in STARTED_WITH]
    if "LOCAL_RANK" not in set_here:  # this process never started DDP children itself
        return []
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in set_here:
        del os.environ[name]
    log.debug(f"Ended the previous job's DDP process group; removed {', '.join(set_here)}")
    return set_here


def local_device() -> torch.device:
    """This process's own accelerator before a Trainer exists: `cuda:<LOCAL_RANK>` (not bare `cuda`, which is
    GPU 0 for every rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def on_global_zero(trainer: Any, compute: Callable[[], T]) -> T:
    """`compute()` on global rank 0 only, its result broadcast to every rank (a plain value when there is one
    process). Every rank must call it: the broadcast is a collective."""
    value = compute() if trainer.is_global_zero else None
    return trainer.strategy.broadcast(value, src=0)


install_child_command()
