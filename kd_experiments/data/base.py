"""What every data module shares: validated common keys and the loaders."""

from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from kd_experiments.errors import UserError


class ClassificationData(pl.LightningDataModule):
    """Base data module: subclasses fill `self.train_set` / `self.val_set` in `setup`."""

    name = "data"

    def __init__(
        self,
        batch_size: int,
        num_classes: int,
        image_size: int,
        channels: int = 3,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        name: str | None = None,
        trains_teacher_by_default: bool = False,
    ):
        super().__init__()
        self.name = name or self.name
        # Whether a teacher may be trained on the fly when none is given (cheap, embedded data only).
        self.trains_teacher_by_default = trains_teacher_by_default
        for key, value in (("batch_size", batch_size), ("image_size", image_size), ("channels", channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(
                    f"dataset.{key} must be a positive integer, got {value!r}; set e.g. dataset.{key}=64"
                )
        if num_workers < 0:
            raise UserError(f"dataset.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)


def require_path(path: str | Path, what: str, how_to_get: str) -> Path:
    """Return `path` if it exists; otherwise stop with one line naming it and how to get the data."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise UserError(f"{what} not found at {resolved}; {how_to_get}")
    return resolved
