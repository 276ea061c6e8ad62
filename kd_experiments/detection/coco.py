"""COCO detection: `root/annotations/instances_<split>.json` and the images in `root/<split>/`, read with
plain `json` (the boxes are all a detector needs; pycocotools is not required).

Category ids (1..90 with gaps in COCO 2017) become labels 1..K in sorted id order, named by the JSON's
categories; boxes go from x, y, w, h to x1 y1 x2 y2, clamped to the image, and a box left without area is
dropped. Crowd boxes (iscrowd) are flagged `difficult`.
"""

import json
import os
from pathlib import Path

from kd_experiments.data.base import require_path
from kd_experiments.detection.data import AnnotatedImages, AnnotationPacker, DetectionData
from kd_experiments.errors import UserError

INSTANCES_LISTS = ("images", "annotations", "categories")
HOW_TO_GET = (
    "point dataset.root at a COCO folder holding annotations/instances_<split>.json and <split>/ images "
    "(from https://cocodataset.org), or set dataset.train_split / dataset.val_split"
)


def load_instances(path: Path) -> dict:
    """An instances file's JSON, checked to hold the images, annotations and categories lists."""
    require_path(path, "COCO annotation file", HOW_TO_GET)
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(
            f"COCO annotation file {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); replace it"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read COCO annotation file {path} ({error}); replace it") from None
    missing = [
        key for key in INSTANCES_LISTS if not isinstance(data, dict) or not isinstance(data.get(key), list)
    ]
    if missing:
        raise UserError(
            f"COCO annotation file {path} has no {missing[0]!r} list; an instances file holds the lists "
            f"{', '.join(INSTANCES_LISTS)}"
        )
    return data


def read_categories(data: dict, path: Path) -> list[tuple[int, str]]:
    """The (id, name) of every category, in sorted id order: category i in this list is label i + 1."""
    categories = []
    for number, category in enumerate(data["categories"]):
        try:
            categories.append((int(category["id"]), str(category["name"])))
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"COCO annotation file {path}: category {number} needs an id and a name"
            ) from None
    ids = [category_id for category_id, _name in categories]
    if not categories or len(set(ids)) != len(ids):
        raise UserError(f"COCO annotation file {path} needs a non-empty list of categories with distinct ids")
    return sorted(categories)


def pack_split(
    data: dict,
    path: Path,
    image_folder: Path,
    labels: dict[int, int],
    keep_crowd: bool,
    skip_empty: bool,
    keep_boxes_without_area: bool = False,
) -> AnnotationPacker:
    """The images of one instances file in sorted id order, with their usable boxes: clamped to the image,
    with area, crowd boxes only with `keep_crowd`. `skip_empty` leaves out images without a usable box (what
    torchvision's detection reference does for training: such an image teaches only the background).
    `keep_boxes_without_area` keeps every annotation whatever its box (the multi-label reader: an object's
    category is a label even where its box is degenerate)."""
    images = {}
    for number, image in enumerate(data["images"]):
        try:
            images[int(image["id"])] = (
                str(image["file_name"]),
                float(image["width"]),
                float(image["height"]),
            )
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"COCO annotation file {path}: image {number} needs an id, a file_name, a width and a height"
            ) from None
    objects: dict[int, list] = {}
    for number, annotation in enumerate(data["annotations"]):
        try:
            image_id, category_id = int(annotation["image_id"]), int(annotation["category_id"])
            x, y, width, height = (float(value) for value in annotation["bbox"])
            crowd = bool(annotation.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"COCO annotation file {path}: annotation {number} needs an image_id, a category_id and a "
                "bbox of 4 numbers (x, y, width, height)"
            ) from None
        if image_id not in images:
            raise UserError(
                f"COCO annotation file {path}: annotation {number} is of image {image_id}, which is not in "
                "its images list"
            )
        if category_id not in labels:
            raise UserError(
                f"COCO annotation file {path}: annotation {number} has category {category_id}, which is not "
                "in the categories list"
            )
        if crowd and not keep_crowd:
            continue
        _file_name, image_width, image_height = images[image_id]
        box = (max(x, 0.0), max(y, 0.0), min(x + width, image_width), min(y + height, image_height))
        if keep_boxes_without_area or (box[2] > box[0] and box[3] > box[1]):
            objects.setdefault(image_id, []).append((box, labels[category_id], crowd))
    require_path(image_folder, "COCO image folder", HOW_TO_GET)
    present = set(os.listdir(image_folder))  # one listing, not a file-system call per image
    packer = AnnotationPacker()
    for image_id in sorted(images):
        if skip_empty and image_id not in objects:
            continue
        file_name = images[image_id][0]
        if file_name not in present and not (image_folder / file_name).is_file():
            raise UserError(
                f"COCO image {image_folder / file_name} not found (image {image_id} of {path}); restore it"
            )
        packer.add(str(image_folder / file_name), image_id, objects.get(image_id, ()))
    return packer


class COCOData(DetectionData):
    """COCO: the `train_split` and `val_split` instances files and image folders under `root`.

    The classes are the training file's categories, so `class_names` is known after `setup`, where the count
    is checked against `num_classes` (80 for COCO 2017; None takes the file's); the validation file must
    list the same categories. Training skips images without a usable box
    and leaves crowd boxes out unless `train_with_crowd` (torchvision's detection reference drops them);
    validation keeps every image and its crowd boxes, flagged `difficult`, for the metric to ignore. Image
    ids are COCO's."""

    name = "coco"

    def __init__(
        self,
        root: str,
        batch_size: int = 2,
        num_workers: int = 4,
        train_split: str = "train2017",
        val_split: str = "val2017",
        train_with_crowd: bool = False,
        **common,
    ):
        super().__init__(batch_size, num_workers, **common)
        self.root = Path(root).expanduser()
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.train_with_crowd = bool(train_with_crowd)

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def read_splits(self) -> tuple[AnnotatedImages, AnnotatedImages]:
        require_path(self.root, "COCO root (dataset.root)", HOW_TO_GET)
        train_file, val_file = self.annotation_file(self.train_split), self.annotation_file(self.val_split)
        data = load_instances(train_file)
        categories = read_categories(data, train_file)
        self.set_classes([name for _id, name in categories], str(train_file))
        labels = {category_id: index + 1 for index, (category_id, _name) in enumerate(categories)}
        train = pack_split(
            data, train_file, self.root / self.train_split, labels, self.train_with_crowd, skip_empty=True
        )
        if len(train) == 0:
            raise UserError(f"no image of {train_file} has a usable box (one with area); check the file")
        del data  # COCO's training annotations take gigabytes as Python objects
        data = load_instances(val_file)
        if read_categories(data, val_file) != categories:
            raise UserError(
                f"the categories of {val_file} differ from those of {train_file}; both splits must list the "
                "same categories (the same ids and names)"
            )
        val = pack_split(
            data, val_file, self.root / self.val_split, labels, keep_crowd=True, skip_empty=False
        )
        return train.dataset(self.train_transform()), val.dataset(None)
