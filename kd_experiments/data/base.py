"""What every data module shares: validated common keys and the loaders."""

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kd_experiments.data.sampling import (
    STATISTICS_EPOCH,
    KeyedSampler,
    SeededSamples,
    ordered_sampler,
    shuffled_sampler,
)
from kd_experiments.errors import UserError
from kd_experiments.files import exclusive_lock

log = logging.getLogger(__name__)


class ClassificationData(pl.LightningDataModule):
    """Base data module: subclasses fill `self.train_set` / `self.val_set` in `setup`.

    Training batches are (images, targets, keys): each sample's random augmentation is drawn from generators
    seeded by `augmentation_seed` and its key (epoch, rank, index, copy, position; see `sampling.py`), so a
    seed gives the same images with any number of workers and whether or not the teacher runs. The keys
    stay on the CPU (`transfer_batch_to_device`); validation batches are (images, targets)."""

    name = "data"
    supports_device_normalization = False  # a subclass whose transforms can stop at uint8 tensors

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
        pin_memory: bool = False,
        normalize_on_device: bool = False,
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
        self.pin_memory = bool(pin_memory)  # page-locked batches: faster host-to-GPU copies
        # Loaders yield uint8 images and the device normalises them (a quarter of the bytes to copy, no
        # float work in the loader workers); for data sets read from image files (CIFAR, image folders).
        self.normalize_on_device = bool(normalize_on_device)
        if self.normalize_on_device and not self.supports_device_normalization:
            raise UserError(
                f"dataset.normalize_on_device applies to data sets of image files (CIFAR, image folders); "
                f"{self.name} is held in memory as floats already: set dataset.normalize_on_device=false"
            )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        # The (mean, std) per channel that the images are normalised with, where the data module knows it.
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        # The seed of the training order and augmentation: the run's (train.data_phase sets it), the teacher's
        # own while a teacher is trained on this data.
        self.augmentation_seed = 0
        self.train_sampler: KeyedSampler | None = None  # of the last training loader built

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=drop_last,
        )

    def _rank_and_size(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_order(self, rank: int, world_size: int) -> Sampler:
        """This rank's training indices of an epoch (after `set_epoch`): a fresh permutation per epoch."""
        return shuffled_sampler(self.train_set, self.augmentation_seed, rank, world_size)

    def drops_last_train_batch(self) -> bool:
        return False

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_size()
        self.train_sampler = KeyedSampler(self.train_order(rank, world_size), rank, world_size)
        return self._loader(
            SeededSamples(self.train_set, self.augmentation_seed),
            self.batch_size,
            shuffle=False,
            drop_last=self.drops_last_train_batch(),
            sampler=self.train_sampler,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With `normalize_on_device`, the uint8 images become the normalised floats the loader would have
        made: (x / 255 - mean) / std, the same operations as ToTensor + Normalize, on the device."""
        if self.normalize_on_device and batch[0].dtype == torch.uint8:
            return [self.normalize(batch[0]), *batch[1:]]
        return batch

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = (
            torch.tensor(values, device=images.device).view(1, -1, 1, 1) for values in self.normalization
        )
        return images.to(torch.float32).div(255).sub(mean).div(std)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Images and targets to the device; a training batch's keys stay on the CPU, where the teacher-output
        cache looks them up (on a GPU, reading them back would stall every step)."""
        if isinstance(batch, list | tuple) and len(batch) == 3:
            images, targets, keys = batch
            moved = super().transfer_batch_to_device([images, targets], device, dataloader_idx)
            return [*moved, keys]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader:
        """The validation split; under DDP (a trainer with several processes attached) this rank's shard,
        without padding, so that the ranks together score every image exactly once."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return self.whole_val_dataloader()
        sampler = ShardedEvalSampler(self.val_set, trainer.world_size, trainer.global_rank)
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False, sampler=sampler)

    def whole_val_dataloader(self) -> DataLoader:
        """Every validation image, in order, whatever the process: what one process scores on its own (the
        teacher's reference check, the EMA / averaged student on rank 0)."""
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def statistics_dataloader(self, seed: int | None = None) -> DataLoader:
        """One plain pass over the training split in order (training transforms, seeded as epoch
        STATISTICS_EPOCH; no repeats, no Mixup), for the teacher statistics that some methods precompute (ND's
        class centres, LSHFM's hash bias). Batches are (images, targets, keys)."""
        sampler = KeyedSampler(ordered_sampler(len(self.train_set)), fixed_epoch=STATISTICS_EPOCH)
        seed = self.augmentation_seed if seed is None else seed
        return self._loader(
            SeededSamples(self.train_set, seed),
            self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
        )


class ShardedEvalSampler(DistributedSampler):
    """Rank `rank`'s share of an evaluation set: indices rank, rank + world_size, ... with no padding, so
    shards differ by at most one image (10 images on 3 ranks: 4, 3, 3) and every image is scored once.
    torch's `DistributedSampler` pads the shards to equal length with repeated images, which counts some
    twice. It is a `DistributedSampler`, so Lightning keeps it instead of wrapping the loader in its own.
    Uneven shards are safe for validation: no collective runs per batch (no gradients, so DDP does not
    synchronise), and torchmetrics sums the metric states of all ranks."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def fetch_once(
    is_complete: Callable[[], bool], fetch: Callable[[], None], lock_path: Path, what: str
) -> None:
    """Run `fetch()` (a download) unless `is_complete()`, by one process at a time: processes started together
    (the ranks of torchrun / srun, which all prepare the data; two runs sharing a data root) queue on a file
    lock beside the data; the first one downloads, the others then find the data complete and return. A
    complete data set needs no lock (a read-only data root then works)."""
    if is_complete():
        return
    unwritable = (
        f"cannot download {what}: {lock_path.parent} is not writable ({{reason}}); point the data set's root "
        "at a writable directory"
    )
    with exclusive_lock(lock_path, f"another process that is downloading {what}", unwritable):
        if not is_complete():
            fetch()


class Renormalize(nn.Module):
    """Maps a batch normalised with `data` = (mean, std) to the normalisation `target` expects:
    x' = (x * std_d + mean_d - mean_t) / std_t, an exact per-channel affine map (also of Mixup/CutMix
    batches, which are convex combinations of images). It lets a teacher see its own normalisation (a timm
    augreg ViT's 0.5 / 0.5) while the student keeps the data set's."""

    def __init__(self, data: tuple, target: tuple):
        super().__init__()
        (data_mean, data_std), (target_mean, target_std) = (
            [torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) for values in pair]
            for pair in (data, target)
        )
        self.register_buffer("scale", data_std / target_std, persistent=False)
        self.register_buffer("shift", (data_mean - target_mean) / target_std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


def require_path(path: str | Path, what: str, how_to_get: str) -> Path:
    """Return `path` if it exists; otherwise stop with one line naming it and how to get the data."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise UserError(f"{what} not found at {resolved}; {how_to_get}")
    return resolved
