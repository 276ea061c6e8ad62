"""What every detection data module shares: the sample and batch format, the seeded training flip, the
annotations of a file-based data set packed into arrays, and the loaders.

A sample is (image, target): the image a float32 3 x H x W tensor in [0, 1], not normalised (torchvision's
detectors normalise and resize inside the model); the target a dict of `boxes` (float32 N x 4, x1 y1 x2 y2 in
pixels of the returned image), `labels` (int64 N, 1..K; 0 is the background), `difficult` (bool N: VOC's
difficult flag, COCO's iscrowd) and `image_id` (an int64 scalar tensor). Images differ in size, so a batch is
a list of images and a list of targets, not a stacked tensor: (images, targets, keys) for training, with the
keys of `data/sampling.py`, and (images, targets) for validation.
"""

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.functional import to_tensor

from kd_experiments.data.base import ShardedEvalSampler
from kd_experiments.data.imagefolder import read_image
from kd_experiments.data.sampling import KeyedSampler, SeededSamples, shuffled_sampler
from kd_experiments.errors import UserError

Target = dict[str, torch.Tensor]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def make_target(boxes, labels, difficult, image_id: int) -> Target:
    """The target dict of the sample format, with its dtypes and shapes fixed (N x 4 boxes also when N = 0,
    which torchvision's detectors accept as an image without objects)."""
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        "difficult": torch.as_tensor(np.asarray(difficult, dtype=bool).reshape(-1)),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
    }


def flip_horizontally(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """The image mirrored left to right and its boxes with it: a box's edges x1, x2 become W - x2, W - x1 (in
    pixel-edge coordinates, where the image spans 0..W), so a mirrored box stays tight."""
    width = image.shape[-1]
    boxes = target["boxes"]
    mirrored = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
    return image.flip(-1), {**target, "boxes": mirrored}


class RandomHorizontalFlip:
    """`flip_horizontally` with probability `probability`, drawn from torch's global generator, which
    `SeededSamples` seeds per sample from (augmentation seed, epoch, rank, index, copy): the same seed flips
    the same samples with any number of loader workers. The draw is made even when nothing could change
    (p = 0 or 1), so the draws per sample do not depend on the probability."""

    def __init__(self, probability: float = 0.5):
        self.probability = probability

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() < self.probability:
            return flip_horizontally(image, target)
        return image, target


def collate_detection(samples: list[tuple]) -> tuple:
    """A batch from a list of samples: (images, targets) as lists, since images differ in size; training
    samples carry their key too (`SeededSamples`), stacked into the B x 5 tensor of the batch's keys."""
    columns = tuple(zip(*samples, strict=True))
    images, targets = list(columns[0]), list(columns[1])
    if len(columns) == 3:
        return images, targets, torch.stack(columns[2])
    return images, targets


@dataclass
class AnnotationPacker:
    """Collects the annotations of a file-based split (`add`, one image at a time) and packs them into an
    `AnnotatedImages` data set."""

    paths: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)

    def add(self, path: str, image_id: int, objects: Iterable[tuple[tuple, int, bool]]) -> None:
        """One image and its objects, each (x1 y1 x2 y2 box, label, difficult)."""
        count = 0
        for box, label, difficult in objects:
            self.boxes.append(box)
            self.labels.append(label)
            self.difficult.append(difficult)
            count += 1
        self.paths.append(path)
        self.image_ids.append(image_id)
        self.counts.append(count)

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, transform: Transform | None) -> "AnnotatedImages":
        return AnnotatedImages(
            paths=np.array(self.paths, dtype=np.str_),
            image_ids=np.array(self.image_ids, dtype=np.int64),
            offsets=np.concatenate(([0], np.cumsum(self.counts, dtype=np.int64))),
            boxes=np.array(self.boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array(self.labels, dtype=np.int64),
            difficult=np.array(self.difficult, dtype=bool),
            transform=transform,
        )


class AnnotatedImages(Dataset):
    """Image files and their boxes, the annotations packed into a few numpy arrays (the boxes of image i are
    rows offsets[i]:offsets[i + 1]) rather than a list of per-image Python objects: a forked loader worker
    touches the reference count of every Python object it reads, which copies its memory page, so with COCO's
    118k images a list of dicts would be copied into every worker bit by bit over an epoch; a numpy array is
    one object.

    Each image is decoded when it is read (`read_image`: a file that does not decode is one line naming it);
    the boxes are clamped to the decoded image and boxes left without area are dropped, then `transform`
    (training: the random flip) is applied."""

    def __init__(
        self,
        paths: np.ndarray,
        image_ids: np.ndarray,
        offsets: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        difficult: np.ndarray,
        transform: Transform | None = None,
    ):
        self.paths, self.image_ids, self.offsets = paths, image_ids, offsets
        self.boxes, self.labels, self.difficult = boxes, labels, difficult
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image `index`'s boxes, labels and difficult flags as read from its annotation (not clamped)."""
        rows = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
        return self.boxes[rows], self.labels[rows], self.difficult[rows]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = to_tensor(read_image(str(self.paths[index])))
        height, width = image.shape[-2:]
        boxes, labels, difficult = self.annotations(index)
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = make_target(boxes[keep], labels[keep], difficult[keep], int(self.image_ids[index]))
        if self.transform is not None:
            return self.transform(image, target)
        return image, target


class DetectionData(pl.LightningDataModule):
    """Base detection data module: a subclass names its classes (`set_classes`), sets `image_size` where the
    data has one, and reads its splits in `read_splits`.

    Training follows the classification data modules (`data/base.py`): every sample is named by a key and
    its augmentation (the horizontal flip, with probability `hflip`) is drawn from generators seeded by
    `augmentation_seed` and that key, so a seed gives the same batches with any number of workers and under
    DDP, where the keyed sampler is a `DistributedSampler` that Lightning keeps as it is. Validation is read
    in order, unaugmented; under DDP each rank reads its own shard (`ShardedEvalSampler`) and
    `whole_val_dataloader` reads the whole split on one process (scoring a teacher)."""

    task = "detection"  # the configs' dataset.task, which picks the detection runner (detection/run.py)
    name = "detection"

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        name: str | None = None,
        pin_memory: bool = False,
        trains_teacher_by_default: bool = False,
        hflip: float = 0.5,
        task: str = "detection",
        num_classes: int | None = None,
        channels: int = 3,
    ):
        super().__init__()
        if task != self.task:
            raise UserError(f"dataset.task of a detection data set must be detection, got {task!r}")
        if channels != 3:
            raise UserError(f"detection images are RGB: keep dataset.channels=3, got {channels!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
            raise UserError(f"dataset.num_classes must be a positive integer, got {num_classes!r}")
        self.name = name or self.name
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size}
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(
                    f"dataset.{key} must be a positive integer, got {value!r}; set e.g. dataset.{key}=4"
                )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"dataset.num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(hflip, bool) or not isinstance(hflip, int | float) or not 0.0 <= hflip <= 1.0:
            raise UserError(
                f"dataset.hflip is the probability of a horizontal flip, between 0 and 1; got {hflip}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)  # page-locked batches: faster host-to-GPU copies
        # Whether a teacher may be trained on the fly when none is given (cheap, embedded data only).
        self.trains_teacher_by_default = trains_teacher_by_default
        self.hflip = hflip
        # Foreground classes K (labels 1..K): as configured until `set_classes` checks it against the data.
        # The configs interpolate ${dataset.num_classes} and ${dataset.channels} into the detectors' configs.
        self.num_classes = num_classes
        self.channels = channels
        self.class_names: list[str] | None = None
        # The nominal shorter side the detector resizes images to: the data set's own size where it has one
        # (the generated shapes), None where the detector's default applies (VOC, COCO).
        self.image_size: int | None = None
        self.normalization = None  # images are in [0, 1]: the detector normalises them itself
        # The seed of the training order and augmentation: the run's (set by the runner before `setup`), the
        # teacher's own while a teacher is trained on this data.
        self.augmentation_seed = 0
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.train_sampler: KeyedSampler | None = None  # of the last training loader built

    def set_classes(self, names: Sequence[str], source: str) -> None:
        """The data set's class names (label i + 1 is names[i]), checked against dataset.num_classes where it
        is set: the detectors are built with that many classes before the data is read."""
        if self.num_classes is not None and self.num_classes != len(names):
            raise UserError(
                f"{source} has {len(names)} object classes but dataset.num_classes={self.num_classes}; set "
                f"dataset.num_classes={len(names)}"
            )
        self.num_classes, self.class_names = len(names), list(names)

    def read_splits(self) -> tuple[Dataset, Dataset]:
        """The training split (with `train_transform`) and the validation split; a subclass's job."""
        raise NotImplementedError

    def train_transform(self) -> Transform:
        return RandomHorizontalFlip(self.hflip)

    def prepare_data(self) -> None:
        """Nothing to download: VOC and COCO are read where they are, the shapes are generated."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_set, val_set = self.read_splits()
        for split, dataset in (("training", train_set), ("validation", val_set)):
            if len(dataset) == 0:
                raise UserError(f"the {self.name} {split} split has no images; check the dataset.* keys")
        self.train_set, self.val_set = train_set, val_set

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_detection,
        )

    def _rank_and_size(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of a fresh permutation of the training split per epoch, in batches of
        (images, targets, keys)."""
        rank, world_size = self._rank_and_size()
        order = shuffled_sampler(self.train_set, self.augmentation_seed, rank, world_size)
        self.train_sampler = KeyedSampler(order, rank, world_size)
        return self._loader(
            SeededSamples(self.train_set, self.augmentation_seed), self.batch_size, sampler=self.train_sampler
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split in order; under DDP this rank's shard, unpadded, so that the ranks together
        score every image exactly once."""
        rank, world_size = self._rank_and_size()
        if world_size <= 1:
            return self.whole_val_dataloader()
        sampler = ShardedEvalSampler(self.val_set, world_size, rank)
        return self._loader(self.val_set, self.eval_batch_size, sampler=sampler)

    def whole_val_dataloader(self) -> DataLoader:
        """Every validation image, in order, whatever the process: what one process scores on its own (the
        teacher's reference check)."""
        return self._loader(self.val_set, self.eval_batch_size)

    def plain_train_dataloader(self) -> DataLoader:
        """Every training image once, in order, without the training transform (no flip), whatever the
        process: the teacher statistics pass (`detection/statistics.py`). Batches are (images, targets).
        The split's augmentation is its `transform` attribute (`AnnotatedImages`, `GeneratedShapes`), left
        out on a shallow copy; the images and annotations are shared, not copied."""
        plain = copy.copy(self.train_set)
        plain.transform = None
        return self._loader(plain, self.eval_batch_size)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Images and targets to the device; a training batch's keys stay on the CPU, where the teacher-output
        cache looks them up."""
        if isinstance(batch, list | tuple) and len(batch) == 3:
            images, targets, keys = batch
            images, targets = super().transfer_batch_to_device((images, targets), device, dataloader_idx)
            return images, targets, keys
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
