"""Multi-label image classification data: Pascal VOC 2007 and COCO 2014 read as LSHFM's multi-label
experiments read them (DoctorKey/LSHFM.multiclassification; /work/proto/lshfm_multilabel.md has the
details).

The samples plug into the classification pipeline unchanged (`ClassificationData`: seeded per-sample
augmentation, training batches (images, targets, keys), validation batches (images, targets)), except that
a target is a float32 vector of length K instead of a class index: 1.0 where the class is in the image and
0.0 where it is not. VOC validation has a third value, `IGNORED` (-1.0), for a class present only as
difficult objects. The metric leaves those entries out, as the VOC devkit and LSHFM do.

Images are warped to `image_size` x `image_size` (a square resize that does not keep the aspect ratio,
with no crop). Training then flips them (`hflip`), jitters the colours (`color_jitter`) and normalises them
with the ImageNet statistics. This is LSHFM's pipeline at 448.
"""

from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from kd_experiments.data.base import ClassificationData, require_path
from kd_experiments.data.imagefolder import read_image
from kd_experiments.detection.coco import HOW_TO_GET, load_instances, pack_split, read_categories
from kd_experiments.detection.voc import VOC_CLASSES, VOCRoot, parse_sets, read_images
from kd_experiments.errors import UserError

PRESENT, ABSENT = 1.0, 0.0
IGNORED = -1.0  # a validation target the metric masks: a VOC class present only as difficult objects
INTERPOLATIONS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


class MultiLabelImages(Dataset):
    """Image files and their K targets. The targets are packed into one int8 N x K array of 1 / 0 / -1,
    not a list of per-image tensors, because a forked loader worker copies the memory page of every Python
    object whose reference count it touches, while a numpy array is a single object. `transform` takes the
    decoded PIL image (`read_image`: a file that does not decode is reported as one line naming it)."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, transform):
        self.paths = np.array(paths, dtype=np.str_)
        self.targets = np.ascontiguousarray(targets, dtype=np.int8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.transform(read_image(str(self.paths[index])))
        return image, torch.from_numpy(self.targets[index].astype(np.float32))


class MultiLabelData(ClassificationData):
    """What the VOC and COCO multi-label modules share: the transforms, their checks, and `task`.

    `hflip` is the probability of a horizontal flip. `color_jitter` is torchvision's ColorJitter
    (brightness, contrast, saturation, hue), or null for none. `interpolation` is the resize filter
    (bilinear or bicubic). `mean` / `std` are the normalisation, which the device applies instead under
    `normalize_on_device`. Subclasses read the splits (`read_splits`) and name the classes
    (`class_names`)."""

    task = "multilabel"  # the configs' dataset.task, which picks the multi-label runner
    supports_device_normalization = True

    def __init__(
        self,
        num_classes: int,
        batch_size: int,
        image_size: int = 448,
        channels: int = 3,
        num_workers: int = 8,
        hflip: float = 0.5,
        color_jitter: Sequence[float] | None = (0.3, 0.3, 0.3, 0.0),
        interpolation: str = "bilinear",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        task: str = "multilabel",
        ap_interpolation: str = "none",
        **common,
    ):
        if ap_interpolation not in ("none", "envelope"):
            raise UserError(f"dataset.ap_interpolation must be none or envelope, got {ap_interpolation!r}")
        # How the validation AP of a class is computed (multilabel/module.py): the data set's protocol.
        self.ap_interpolation = ap_interpolation
        if task != self.task:
            raise UserError(f"dataset.task of a multi-label data set must be multilabel, got {task!r}")
        if channels != 3:
            raise UserError(f"multi-label images are RGB: keep dataset.channels=3, got {channels!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
            raise UserError(f"dataset.num_classes must be a positive integer, got {num_classes!r}")
        super().__init__(batch_size, num_classes, image_size, channels, num_workers, **common)
        if not _is_number(hflip) or not 0 <= hflip <= 1:
            raise UserError(
                f"dataset.hflip is the probability of a horizontal flip, in [0, 1]; got {hflip!r}"
            )
        self.hflip = float(hflip)
        self.color_jitter = _jitter(color_jitter)
        if interpolation not in INTERPOLATIONS:
            raise UserError(
                f"dataset.interpolation must be {' or '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.normalization = (_statistics(mean, "mean"), _statistics(std, "std"))
        self.class_names: list[str] | None = None

    def _to_tensor(self) -> list:
        """ToTensor + Normalize, or uint8 tensors for the device to normalise (`normalize_on_device`)."""
        if self.normalize_on_device:
            return [transforms.PILToTensor()]
        return [transforms.ToTensor(), transforms.Normalize(*self.normalization)]

    def _resize(self) -> transforms.Resize:
        size = (self.image_size, self.image_size)  # a square warp, as LSHFM: the aspect ratio is not kept
        return transforms.Resize(size, interpolation=INTERPOLATIONS[self.interpolation])

    def train_transform(self) -> transforms.Compose:
        # The flip draws its coin even at p = 0 or 1, so the draws per sample do not depend on hflip.
        steps = [self._resize(), transforms.RandomHorizontalFlip(self.hflip)]
        if self.color_jitter is not None:
            steps.append(transforms.ColorJitter(*self.color_jitter))
        return transforms.Compose(steps + self._to_tensor())

    def eval_transform(self) -> transforms.Compose:
        return transforms.Compose([self._resize(), *self._to_tensor()])

    def read_splits(self) -> tuple[MultiLabelImages, MultiLabelImages]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set = self.read_splits()


class VOCMultiLabelData(MultiLabelData):
    """Pascal VOC multi-label classification: the 20 classes in the standard order (target i is
    `VOC_CLASSES[i]`). By default it trains on VOC2007 trainval and validates on VOC2007 test, as LSHFM
    does. `root` and the [year, split] pairs `train_sets` / `val_sets` work as in the detection reader
    (`detection/voc.py`).

    Difficult objects follow LSHFM, whose labels are the VOC devkit's classification ground truth:
    - Training: a class present only as difficult objects is a positive (1.0), like any present class.
    - Validation: such a class is `IGNORED` (-1.0), so its AP counts it as neither a true nor a false
      positive. 1.0 means at least one non-difficult object of the class, 0.0 means none at all."""

    name = "voc_multilabel"

    def __init__(
        self,
        root: str,
        num_classes: int = 20,
        batch_size: int = 16,
        train_sets: Sequence = ((2007, "trainval"),),
        val_sets: Sequence = ((2007, "test"),),
        **common,
    ):
        if num_classes != len(VOC_CLASSES):
            raise UserError(f"Pascal VOC has 20 classes; set dataset.num_classes=20, got {num_classes!r}")
        super().__init__(num_classes, batch_size, **common)
        self.root = root
        self.train_sets = parse_sets(train_sets, "train_sets")
        self.val_sets = parse_sets(val_sets, "val_sets")
        self.class_names = list(VOC_CLASSES)

    def read_splits(self) -> tuple[MultiLabelImages, MultiLabelImages]:
        voc_root = VOCRoot.find(self.root)
        train_paths, train_targets = self._read(voc_root.folders(self.train_sets, "train_sets"), "train_sets")
        val_paths, val_targets = self._read(voc_root.folders(self.val_sets, "val_sets"), "val_sets")
        # Training counts a difficult-only class as present (LSHFM: target >= 0).
        train_targets[train_targets == IGNORED] = PRESENT
        return (
            MultiLabelImages(train_paths, train_targets, self.train_transform()),
            MultiLabelImages(val_paths, val_targets, self.eval_transform()),
        )

    def _read(self, folders: list[tuple[Path, str]], key: str) -> tuple[list[str], np.ndarray]:
        """The images of `folders` and their validation targets: 1 where some object of the class is not
        difficult, -1 where all of them are, and 0 where the class is absent."""
        paths, rows = [], []
        for image, objects in read_images(folders, key):
            row = np.full(self.num_classes, ABSENT, dtype=np.int8)
            for _box, label, difficult in objects:
                if not difficult:
                    row[label - 1] = PRESENT
                elif row[label - 1] == ABSENT:
                    row[label - 1] = IGNORED
            paths.append(str(image))
            rows.append(row)
        return paths, np.stack(rows) if rows else np.zeros((0, self.num_classes), dtype=np.int8)


class COCOMultiLabelData(MultiLabelData):
    """COCO multi-label classification: the `train_split` and `val_split` instances files under
    `root/annotations/` and their images in `root/<split>/`. The default is COCO 2014 (train2014 /
    val2014), as LSHFM uses it.

    Category ids become targets 0..K-1 in sorted id order (the detection reader's labels minus one). The
    names are in `class_names` after `setup`, where `num_classes` is checked against the file (80 for COCO).
    A class is 1.0 when any annotation of the image has its category, whatever the box (crowd annotations
    and degenerate boxes included, as LSHFM counts them). There is no ignored state. Images without any
    annotation are left out of both splits (LSHFM lists only the images pycocotools has annotations for),
    unless `keep_unannotated` is set, in which case they are all-negative samples."""

    name = "coco_multilabel"

    def __init__(
        self,
        root: str,
        num_classes: int = 80,
        batch_size: int = 32,
        train_split: str = "train2014",
        val_split: str = "val2014",
        keep_unannotated: bool = False,
        **common,
    ):
        super().__init__(num_classes, batch_size, **common)
        self.root = Path(root).expanduser()
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.keep_unannotated = bool(keep_unannotated)

    def read_splits(self) -> tuple[MultiLabelImages, MultiLabelImages]:
        require_path(self.root, "COCO root (dataset.root)", HOW_TO_GET)
        train_file = self.root / "annotations" / f"instances_{self.train_split}.json"
        val_file = self.root / "annotations" / f"instances_{self.val_split}.json"
        data = load_instances(train_file)
        categories = read_categories(data, train_file)
        if len(categories) != self.num_classes:
            raise UserError(
                f"{train_file} has {len(categories)} categories but dataset.num_classes={self.num_classes}; "
                f"set dataset.num_classes={len(categories)}"
            )
        labels = {category_id: index + 1 for index, (category_id, _name) in enumerate(categories)}
        train = self._targets(data, train_file, self.train_split, labels)
        del data  # COCO's training annotations take gigabytes as Python objects
        data = load_instances(val_file)
        if read_categories(data, val_file) != categories:
            raise UserError(
                f"the categories of {val_file} differ from those of {train_file}; both splits must list the "
                "same categories (the same ids and names)"
            )
        val = self._targets(data, val_file, self.val_split, labels)
        self.class_names = [name for _id, name in categories]
        return (
            MultiLabelImages(*train, self.train_transform()),
            MultiLabelImages(*val, self.eval_transform()),
        )

    def _targets(
        self, data: dict, path: Path, split: str, labels: dict[int, int]
    ) -> tuple[list[str], np.ndarray]:
        """The images of one instances file in sorted id order and their multi-hot targets."""
        packer = pack_split(
            data, path, self.root / split, labels, keep_crowd=True,
            skip_empty=not self.keep_unannotated, keep_boxes_without_area=True,
        )  # fmt: skip
        if len(packer) == 0:
            raise UserError(
                f"no image of {path} has an annotation; check the file (or set dataset.keep_unannotated=true)"
            )
        targets = np.zeros((len(packer), self.num_classes), dtype=np.int8)
        image_of_object = np.repeat(np.arange(len(packer)), packer.counts)
        targets[image_of_object, np.array(packer.labels, dtype=np.int64) - 1] = PRESENT
        return packer.paths, targets


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _jitter(value) -> tuple[float, float, float, float] | None:
    """`dataset.color_jitter` as torchvision's (brightness, contrast, saturation, hue), or None."""
    if value is None:
        return None
    valid = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 4
        and all(_is_number(v) and v >= 0 for v in value)
        and value[3] <= 0.5
    )
    if not valid:
        raise UserError(
            "dataset.color_jitter must be null or [brightness, contrast, saturation, hue], each >= 0 and hue "
            f"<= 0.5, e.g. [0.3, 0.3, 0.3, 0.0] (LSHFM); got {value!r}"
        )
    return tuple(float(v) for v in value)


def _statistics(value, key: str) -> tuple[float, float, float]:
    """`dataset.mean` / `dataset.std`: three numbers, one per RGB channel (a std above 0)."""
    valid = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(_is_number(v) and (key == "mean" or v > 0) for v in value)
    )
    if not valid:
        positive = ", each above 0" if key == "std" else ""
        raise UserError(f"dataset.{key} must be 3 numbers (R, G, B){positive}; got {value!r}")
    return tuple(float(v) for v in value)
