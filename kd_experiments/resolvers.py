"""OmegaConf resolvers the recipes use; registered when the package is imported."""

import re

from omegaconf import OmegaConf

# What a job folder name keeps as is; anything else (a `/`, a space, brackets, quotes) becomes `_`.
_UNSAFE_IN_FOLDER_NAME = re.compile(r"[^A-Za-z0-9._,=+@%-]+")
JOB_NAME_MAX_CHARS = 100


def scaled_lr(base_lr: float, per_device_batch: int, devices, num_nodes: int, reference_batch: int) -> float:
    """Linear LR scaling by the global batch: base_lr * (per-device batch * devices * nodes) / reference.

    Used as `${kd.scaled_lr:5e-4,${dataset.batch_size},${trainer.devices},${trainer.num_nodes},512}`.
    """
    if isinstance(devices, str | list) or devices is None:
        raise ValueError(
            f"kd.scaled_lr needs an integer trainer.devices to know the global batch, got {devices!r}"
        )
    return float(base_lr) * int(per_device_batch) * int(devices) * int(num_nodes) / float(reference_batch)


def run_dir(resume, new_dir: str) -> str:
    """Hydra's run directory: the run being resumed (`resume=RUN_DIR`), else a new one."""
    return str(resume) if resume else new_dir


def job_name(job_num, override_dirname: str) -> str:
    """A sweep job's folder name: its number, then its overrides made safe for a file system, e.g.
    `3_method=kd,seed=1`; just the number for a job without overrides. Used as
    `hydra.sweep.subdir: ${kd.job_name:${hydra.job.num},${hydra.job.override_dirname}}`: no `/`, no
    spaces, at most JOB_NAME_MAX_CHARS characters of overrides (the number keeps truncated names apart)."""
    safe = _UNSAFE_IN_FOLDER_NAME.sub("_", str(override_dirname or "")).strip("._-")
    safe = safe[:JOB_NAME_MAX_CHARS].rstrip("._-")
    return f"{job_num}_{safe}" if safe else str(job_num)


def register() -> None:
    resolvers = (("kd.scaled_lr", scaled_lr), ("kd.run_dir", run_dir), ("kd.job_name", job_name))
    for name, resolver in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
