"""ImageNet and any folder tree of images (`root/<split>/<class>/*.jpg`), with timm's transforms and
Mixup/CutMix."""

import os
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from kd_experiments.data.base import ClassificationData, require_path
from kd_experiments.data.sampling import batch_seed, seeded_generators
from kd_experiments.errors import UserError


class RepeatedAugmentationSampler(RepeatAugSampler, DistributedSampler):
    """timm's `RepeatAugSampler` (DeiT's RASampler, facebookresearch/deit `samplers.py`): each epoch
    draws every image `num_repeats` times, sends the copies to different ranks, and keeps an epoch as long
    as a plain one (len(dataset) / world size images per rank, rounded down to a multiple of 256 / world
    size).

    It shards by rank itself, so it is declared a `DistributedSampler`: Lightning then leaves it alone
    instead of wrapping it in a second per-rank sampler, and still calls `set_epoch` every epoch."""


class UnreadableImage(UserError):
    """An image file that does not decode. Raised in a DataLoader worker, torch re-raises it in the main
    process as `UnreadableImage(text)`, where text is "Caught UnreadableImage in DataLoader worker process
    0." followed by the worker's whole traceback; the constructor keeps only the original one-line message
    (the traceback's last line), so the entry point still prints one line, whatever dataset.num_workers is."""

    def __init__(self, text: str):
        original = f"{type(self).__module__}.{type(self).__qualname__}: "
        if original in text:
            text = text.rsplit(original, 1)[1].strip()
        super().__init__(text)


def is_image_file(path: str) -> bool:
    """A sample is a file with an image extension (as torchvision's ImageFolder decides), except hidden ones:
    macOS `._x.jpg` resource forks and editor leftovers are never images, and would fail only mid-epoch."""
    name = os.path.basename(path)  # called once per file of the tree: cheaper than Path
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def read_image(path: str) -> Image.Image:
    """torchvision's `pil_loader`, with a file that does not decode reported as one line naming it.

    Checked here, when each image is read anyway, rather than up front: only a full decode finds a truncated
    file (its header reads fine), and decoding an ImageNet-size tree before training would cost about an
    epoch. A bad file therefore stops the run when it is first read (the probe batch, the sanity check or
    the first epoch), which keeps start-up as cheap as before."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as error:  # whatever PIL or the file system says about this one file
        # PIL's "cannot identify image file <_io.BufferedReader name=...>" would name the file twice
        reason = "cannot identify image file" if isinstance(error, UnidentifiedImageError) else str(error)
        reason = " ".join(reason.split())
        raise UnreadableImage(f"cannot read image {path} ({reason}); remove or replace it") from None


def image_folder(split: Path, transform) -> datasets.ImageFolder:
    """torchvision's ImageFolder over `split`, with `is_image_file`, `read_image`, and a class folder without
    images reported as one line (torchvision's own error is a traceback naming the class, not the folder)."""
    dataset = datasets.ImageFolder(
        str(split), transform=transform, loader=read_image, is_valid_file=is_image_file, allow_empty=True
    )
    _require_images_in_every_class(dataset, split)
    return dataset


def _require_images_in_every_class(dataset: datasets.ImageFolder, split: Path) -> None:
    """A class folder without images would leave a class no sample: name the first one, and what it holds."""
    counts = Counter(dataset.targets)
    empty = [name for index, name in enumerate(dataset.classes) if counts[index] == 0]
    if not empty:
        return
    folder = split / empty[0]
    others = sorted(p.name for p in folder.iterdir())
    holds = f"it holds only {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}; " if others else ""
    more = f" (and {len(empty) - 1} more class folders)" if len(empty) > 1 else ""
    raise UserError(
        f"class folder {folder}{more} has no images ({holds}image files end in {', '.join(IMG_EXTENSIONS)}); "
        "add images to it or remove it"
    )


class ImageFolderData(ClassificationData):
    """`root/train/<class>/...` and `root/val/<class>/...` (torchvision `ImageFolder`; class index = sorted
    folder name, so ImageNet's synset folders give the standard indices).

    Transforms come from `timm.data.create_transform`: training with RandomResizedCrop(`image_size`,
    `scale`) + flip, plus the DeiT options when set (`auto_augment` e.g. `rand-m9-mstd0.5-inc1`, `re_prob`
    random erasing, filled with per-pixel noise by default (`re_mode: pixel`, as DeiT and timm's train.py),
    `color_jitter`); evaluation resizes to `image_size / crop_pct` (256 for 224) and centre-crops.
    `interpolation` is `bilinear` or `bicubic` (the DeiT recipes).

    `mixup` (a dict of `timm.data.Mixup` arguments: mixup_alpha, cutmix_alpha, label_smoothing, ...) mixes
    each training batch after it reaches the device, so the teacher sees the same mixed images as the
    student; the targets become B x K probabilities and the methods' CE terms take them as soft targets.
    `repeated_augmentation: 3` samples each training image three times per epoch under different
    augmentations, spread over the ranks (DeiT's repeated augmentation; 0 = off).
    `num_classes: null` counts the class folders of the training split.
    Files without an image extension, and hidden files, are not samples; a class folder without images and
    an image that does not decode (`read_image`) each stop the run with one line naming the path.
    """

    name = "imagefolder"
    supports_device_normalization = True

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        batch_size: int = 256,
        image_size: int = 224,
        channels: int = 3,
        num_workers: int = 8,
        train_dir: str = "train",
        val_dir: str = "val",
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        interpolation: str = "bilinear",
        crop_pct: float = 0.875,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        color_jitter: float | None = None,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        mixup: dict | None = None,
        repeated_augmentation: int = 0,
        how_to_get: str = "point dataset.root at a folder holding train/<class>/ and val/<class>/ images",
        **common,
    ):
        self.root = Path(root).expanduser()
        self.train_dir, self.val_dir, self.how_to_get = train_dir, val_dir, how_to_get
        if num_classes is None:
            num_classes = len(self._class_folders(self.root / train_dir))
        super().__init__(batch_size, num_classes, image_size, channels, num_workers, **common)
        self.transform_options = dict(
            scale=tuple(scale), hflip=hflip, interpolation=interpolation, crop_pct=crop_pct,
            auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, color_jitter=color_jitter,
            mean=tuple(mean), std=tuple(std),
        )  # fmt: skip
        self.normalization = (tuple(mean), tuple(std))
        self.mixup_options = dict(mixup) if mixup else None
        if not isinstance(repeated_augmentation, int) or repeated_augmentation < 0:
            raise UserError(
                f"dataset.repeated_augmentation must be 0 (off) or the number of repeats, e.g. 3 (DeiT); "
                f"got {repeated_augmentation!r}"
            )
        self.repeated_augmentation = repeated_augmentation
        self.mixup = None
        self._batch_seed = 0
        self.device_erasing = None  # random erasing on the device (normalize_on_device with re_prob)

    def _class_folders(self, split: Path) -> list[Path]:
        require_path(split, f"{self.name} split", self.how_to_get)
        folders = sorted(p for p in split.iterdir() if p.is_dir())
        if not folders:
            raise UserError(f"{split} has no class folders; {self.how_to_get}")
        return folders

    def train_transform(self):
        from timm.data import create_transform

        options = self.transform_options
        return create_transform(
            self.image_size, is_training=True, scale=options["scale"], hflip=options["hflip"],
            interpolation=options["interpolation"], auto_augment=options["auto_augment"],
            re_prob=options["re_prob"], re_mode=options["re_mode"], color_jitter=options["color_jitter"],
            mean=options["mean"], std=options["std"], use_prefetcher=self.normalize_on_device,
        )  # fmt: skip

    def eval_transform(self):
        from timm.data import create_transform

        options = self.transform_options
        return create_transform(
            self.image_size, is_training=False, interpolation=options["interpolation"],
            crop_pct=options["crop_pct"], mean=options["mean"], std=options["std"],
            use_prefetcher=self.normalize_on_device,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = {}
        for key, folder, transform in (
            ("train", self.train_dir, self.train_transform()),
            ("val", self.val_dir, self.eval_transform()),
        ):
            path = self.root / folder
            found = len(self._class_folders(path))
            if found != self.num_classes:
                raise UserError(
                    f"{path} has {found} class folders but dataset.num_classes={self.num_classes}; set "
                    f"dataset.num_classes={found} (or null to count them)"
                )
            splits[key] = image_folder(path, transform)
        if splits["train"].classes != splits["val"].classes:
            raise UserError(f"the class folders of {self.root / self.train_dir} and {self.val_dir} differ")
        self.train_set, self.val_set = splits["train"], splits["val"]
        if self.mixup_options:
            from timm.data import Mixup

            self.mixup = Mixup(num_classes=self.num_classes, **self.mixup_options)
        options = self.transform_options
        if self.normalize_on_device and options["re_prob"] > 0:
            from timm.data.random_erasing import RandomErasing

            # timm leaves erasing out of its uint8 (prefetcher) transforms: it erases the normalised batch.
            self.device_erasing = RandomErasing(options["re_prob"], mode=options["re_mode"], device="cpu")

    def train_order(self, rank: int, world_size: int):
        if self.repeated_augmentation <= 1:
            return super().train_order(rank, world_size)
        # Each image's copies get different augmentations: a copy on another rank has another key (rank).
        return RepeatedAugmentationSampler(
            self.train_set, num_replicas=world_size, rank=rank, num_repeats=self.repeated_augmentation
        )

    def drops_last_train_batch(self) -> bool:
        return self.mixup is not None  # Mixup pairs samples within a batch and needs an even batch size

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """The seed of this training batch's device-side draws (random erasing under `normalize_on_device`,
        Mixup / CutMix), from its keys while they are on the CPU."""
        if len(batch) == 3:
            self._batch_seed = batch_seed(self.augmentation_seed, batch[2])
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise on the device (`normalize_on_device`), then for a training batch random erasing (when it
        is not done in the loader: under `normalize_on_device`) and Mixup, drawing under the batch's seed, so
        that a run's images are the same whether or not the teacher runs."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if len(batch) != 3 or self.trainer is None or not self.trainer.training:
            return batch
        images, targets, keys = batch
        with seeded_generators(self._batch_seed, images.device):
            if self.device_erasing is not None:
                self.device_erasing.device = images.device  # its noise fill is drawn where the batch is
                images = self.device_erasing(images)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
        return [images, targets, keys]
