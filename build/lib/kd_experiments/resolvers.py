"""OmegaConf resolvers the recipes use; registered when the package is imported."""

from omegaconf import OmegaConf


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


def register() -> None:
    for name, resolver in (("kd.scaled_lr", scaled_lr), ("kd.run_dir", run_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
