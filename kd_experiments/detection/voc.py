"""Pascal VOC detection in the devkit's layout: the 20 classes, the difficult flags, and the 07+12 protocol
(train on VOC2007 trainval + VOC2012 trainval, test on VOC2007 test), as LSHFM's detection experiments do.

`dataset.root` is either one year folder (JPEGImages/, Annotations/*.xml, ImageSets/Main/<split>.txt) or a
VOCdevkit folder holding year folders (VOC2007/, VOC2012/); the folder above a VOCdevkit/ (torchvision's
`root`) works too. The splits to read are [year, split] pairs; with a year folder the year is ignored (there
is only one year to read), so the default 07+12 pairs read that folder's trainval once.
"""

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from kd_experiments.data.base import require_path
from kd_experiments.detection.data import AnnotatedImages, AnnotationPacker, DetectionData
from kd_experiments.errors import UserError

# The standard order: label i + 1 is VOC_CLASSES[i] (0 is the background).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
LABELS = {name: index + 1 for index, name in enumerate(VOC_CLASSES)}
YEAR_FOLDER_PARTS = ("JPEGImages", "Annotations", "ImageSets/Main")
# What validation does with a difficult object: flag it for the metric to ignore (the VOC devkit), or drop it.
VAL_DIFFICULT = ("ignore", "drop")
HOW_TO_POINT = (
    "point dataset.root at a VOC year folder (JPEGImages/, Annotations/, ImageSets/Main/) or at a VOCdevkit "
    "folder holding VOC2007/ and VOC2012/"
)


def parse_sets(value, key: str) -> list[tuple[int | None, str]]:
    """`dataset.<key>` as (year, split) pairs: each entry is [year, split] (e.g. [2007, trainval]) or a bare
    split name (year None, for a year folder)."""
    example = f"e.g. dataset.{key}=[[2007,trainval]]"
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise UserError(
            f"dataset.{key} must be a non-empty list of [year, split] pairs, {example}; got {value!r}"
        )
    pairs = []
    for entry in value:
        if isinstance(entry, str):
            pairs.append((None, entry))
            continue
        is_pair = isinstance(entry, Sequence) and len(entry) == 2
        if not (is_pair and str(entry[0]).isdigit() and isinstance(entry[1], str)):
            raise UserError(f"dataset.{key} entries are [year, split] pairs, {example}; got {entry!r}")
        pairs.append((int(entry[0]), entry[1]))
    return pairs


@dataclass(frozen=True)
class VOCRoot:
    """Where the year folders are: `path` itself (a year folder; `years` None), or `years`, as
    {2007: <devkit>/VOC2007, ...}."""

    path: Path
    years: dict[int, Path] | None

    @classmethod
    def find(cls, root: str | Path) -> "VOCRoot":
        path = require_path(root, "VOC root (dataset.root)", HOW_TO_POINT)
        if any((path / part).is_dir() for part in YEAR_FOLDER_PARTS):
            return cls(path, None)
        for devkit in (path, path / "VOCdevkit"):
            years = {int(p.name[3:]): p for p in devkit.glob("VOC[0-9][0-9][0-9][0-9]") if p.is_dir()}
            if years:
                return cls(devkit, years)
        raise UserError(
            f"{path} is neither a VOC year folder (no JPEGImages/, Annotations/, ImageSets/) nor a VOCdevkit "
            f"folder (no VOC2007/, VOC2012/ in it); {HOW_TO_POINT}"
        )

    def folders(self, pairs: list[tuple[int | None, str]], key: str) -> list[tuple[Path, str]]:
        """The (year folder, split) pairs to read for `dataset.<key>`, each once however often it is named."""
        found = []
        for year, split in pairs:
            if self.years is None:
                folder = self.path
            elif year is None:
                raise UserError(
                    f"dataset.{key} names split {split!r} without a year, but {self.path} is a VOCdevkit "
                    f"holding {self._year_list()}: write it as [year, {split}], e.g. [2007, {split}]"
                )
            elif year not in self.years:
                raise UserError(
                    f"dataset.{key} asks for VOC{year}, which {self.path} does not hold (it holds "
                    f"{self._year_list()}); add VOC{year}/ to it or remove [{year}, {split}] from "
                    f"dataset.{key}"
                )
            else:
                folder = self.years[year]
            if (folder, split) not in found:
                found.append((folder, split))
        return found

    def _year_list(self) -> str:
        return ", ".join(f"VOC{year}" for year in sorted(self.years))


def read_split_ids(folder: Path, split: str, key: str) -> tuple[Path, list[str]]:
    """The split file of `split` in year folder `folder` and the image ids it lists."""
    for part in YEAR_FOLDER_PARTS:
        if not (folder / part).is_dir():
            raise UserError(f"VOC year folder {folder} has no {part}/; {HOW_TO_POINT}")
    split_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        # The per-class files (aeroplane_train.txt, ...) are not splits.
        splits = sorted(p.stem for p in split_file.parent.glob("*.txt") if "_" not in p.stem)
        raise UserError(
            f"VOC split file {split_file} not found (ImageSets/Main/ there holds splits: "
            f"{', '.join(splits) or 'none'}); name one of them in dataset.{key}"
        )
    try:
        lines = split_file.read_text().split()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read VOC split file {split_file} ({error}); replace it") from None
    return split_file, lines


def read_objects(path: Path) -> Iterator[tuple[tuple[float, ...], int, bool]]:
    """The objects of annotation file `path`: (x1 y1 x2 y2 box, label, difficult).

    VOC stores 1-based, inclusive pixel indices: a box xmin=1, xmax=W covers the whole image. As LSHFM's VOC
    reader (`ConvertToCocoAnno`, after torchvision's COCO reference) converts them, x1 = xmin - 1 and
    y1 = ymin - 1 while x2 = xmax and y2 = ymax, the pixel-edge coordinates in which that box is 0..W."""
    try:
        annotation = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise UserError(f"VOC annotation {path} is not valid XML ({error}); replace it") from None
    except FileNotFoundError:
        raise UserError(
            f"VOC annotation {path} not found; restore it or remove its image from the split file"
        ) from None
    except OSError as error:
        raise UserError(f"cannot read VOC annotation {path} ({error.strerror}); replace it") from None
    for number, element in enumerate(annotation.findall("object"), start=1):
        name = (element.findtext("name") or "").strip()
        if name not in LABELS:
            raise UserError(
                f"VOC annotation {path}: object {number} has class {name!r}, not one of the 20 VOC classes "
                f"({', '.join(VOC_CLASSES)})"
            )
        box = element.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(side)) for side in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int((element.findtext("difficult") or "0").strip())
        except (AttributeError, TypeError, ValueError):
            raise UserError(
                f"VOC annotation {path}: object {number} ({name}) needs a bndbox with numeric xmin, ymin, "
                "xmax, ymax and a difficult flag of 0 or 1; replace the file"
            ) from None
        yield (xmin - 1, ymin - 1, xmax, ymax), LABELS[name], difficult == 1


def read_images(folders: list[tuple[Path, str]], key: str) -> Iterator[tuple[Path, list]]:
    """Every image of the (year folder, split) pairs of `dataset.<key>`, in split-file order, with its
    objects (`read_objects`); an image that a split file lists but JPEGImages/ lacks is one line naming it.
    Shared by the detection reader and the multi-label one (`multilabel/data.py`)."""
    for folder, split in folders:
        split_file, image_ids = read_split_ids(folder, split, key)
        images = folder / "JPEGImages"
        present = set(os.listdir(images))  # one listing, not a file-system call per image
        for image_id in image_ids:
            if f"{image_id}.jpg" not in present:
                raise UserError(
                    f"VOC image {images / image_id}.jpg not found (listed in {split_file}); restore it "
                    "or remove its line from the split file"
                )
            yield images / f"{image_id}.jpg", list(read_objects(folder / "Annotations" / f"{image_id}.xml"))


class VOCData(DetectionData):
    """Pascal VOC: `train_sets` and `val_sets` name the splits ([year, split] pairs, see the module
    docstring); the 20 classes are labels 1..20 in the standard order.

    Difficult objects: training leaves them out unless `train_with_difficult` (LSHFM's VOC reader drops
    them, `ignore_difficult=True`, finding training better without them). Validation, by `val_difficult`:
    `ignore` keeps them, flagged `difficult`, for the metric to ignore as the VOC devkit's protocol does;
    `drop` removes them from the targets (their images stay), so that a detection of one is a false
    positive: LSHFM's test protocol, whose `ConvertToCocoAnno(ignore_difficult=True)` reads the test set too.
    Image ids are positions in the split (the concatenated split, for several [year, split] pairs)."""

    name = "voc"

    def __init__(
        self,
        root: str,
        batch_size: int = 2,
        num_workers: int = 4,
        train_sets: Sequence = ((2007, "trainval"), (2012, "trainval")),
        val_sets: Sequence = ((2007, "test"),),
        train_with_difficult: bool = False,
        val_difficult: str = "ignore",
        **common,
    ):
        super().__init__(batch_size, num_workers, **common)
        self.root = root
        self.train_sets = parse_sets(train_sets, "train_sets")
        self.val_sets = parse_sets(val_sets, "val_sets")
        self.train_with_difficult = bool(train_with_difficult)
        if val_difficult not in VAL_DIFFICULT:
            raise UserError(
                f"dataset.val_difficult must be {' or '.join(VAL_DIFFICULT)} (what validation does with "
                f"VOC's difficult objects), got {val_difficult!r}"
            )
        self.val_difficult = val_difficult
        self.set_classes(VOC_CLASSES, "Pascal VOC")

    def read_splits(self) -> tuple[AnnotatedImages, AnnotatedImages]:
        voc_root = VOCRoot.find(self.root)
        train = self._read(
            voc_root.folders(self.train_sets, "train_sets"), "train_sets", self.train_with_difficult
        )
        val = self._read(
            voc_root.folders(self.val_sets, "val_sets"), "val_sets", self.val_difficult == "ignore"
        )
        return train.dataset(self.train_transform()), val.dataset(None)

    def _read(self, folders: list[tuple[Path, str]], key: str, keep_difficult: bool) -> AnnotationPacker:
        packer = AnnotationPacker()
        for image, objects in read_images(folders, key):
            packer.add(str(image), len(packer), [obj for obj in objects if keep_difficult or not obj[2]])
        return packer
