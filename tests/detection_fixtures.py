"""Tiny detection data sets in the real on-disk layouts, for the tests: a Pascal VOC tree (`write_voc_tree`)
and a COCO tree (`write_coco_tree`). Each object is painted as a filled rectangle of its own colour on a
noisy background, so that a detector has something to fit in a one-epoch smoke run."""

import json
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[int, int, int, int]  # as VOC writes it: 1-based, inclusive xmin, ymin, xmax, ymax
    difficult: bool = False


@dataclass(frozen=True)
class VocImage:
    image_id: str
    splits: tuple[str, ...]  # the ImageSets/Main/<split>.txt files that list it
    objects: tuple[VocObject, ...]
    size: tuple[int, int] = (64, 48)  # width, height


# trainval = train + val; test apart. A difficult object in training and in test; a box over the whole image.
VOC_IMAGES = (
    VocImage(
        "000001",
        ("train", "trainval"),
        (VocObject("dog", (5, 6, 20, 30)), VocObject("person", (30, 2, 64, 48), difficult=True)),
    ),
    VocImage("000002", ("val", "trainval"), (VocObject("car", (1, 1, 64, 48)),)),
    VocImage(
        "000003",
        ("train", "trainval"),
        (VocObject("cat", (10, 12, 33, 40)), VocObject("dog", (40, 5, 60, 25))),
    ),
    VocImage(
        "000004",
        ("test",),
        (VocObject("person", (3, 4, 30, 44)), VocObject("bottle", (35, 10, 50, 47), difficult=True)),
    ),
    VocImage("000005", ("test",), (VocObject("tvmonitor", (20, 8, 36, 50)),), size=(40, 56)),
)


def paint(size: tuple[int, int], boxes: list[tuple[float, float, float, float]], seed: int) -> Image.Image:
    """A width x height RGB image: dark noise, and each box (pixel edges x1 y1 x2 y2) a bright colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        pixels[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = rng.integers(150, 256, 3)
    return Image.fromarray(pixels)


def voc_annotation(image: VocImage) -> str:
    """The XML the VOC devkit writes for `image` (with the fields real files carry: size, pose, truncated,
    and a part with a bndbox of its own inside a person, which is not an object)."""
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "VOC"
    ElementTree.SubElement(root, "filename").text = f"{image.image_id}.jpg"
    size = ElementTree.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*image.size, 3), strict=True):
        ElementTree.SubElement(size, tag).text = str(value)
    for obj in image.objects:
        element = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(element, "name").text = obj.name
        ElementTree.SubElement(element, "pose").text = "Unspecified"
        ElementTree.SubElement(element, "truncated").text = "0"
        ElementTree.SubElement(element, "difficult").text = "1" if obj.difficult else "0"
        box = ElementTree.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box, strict=True):
            ElementTree.SubElement(box, tag).text = str(value)
        if obj.name == "person":
            part = ElementTree.SubElement(element, "part")
            ElementTree.SubElement(part, "name").text = "head"
            part_box = ElementTree.SubElement(part, "bndbox")
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                ElementTree.SubElement(part_box, tag).text = "2"
    return ElementTree.tostring(root, encoding="unicode")


def write_voc_year(folder: Path, images: tuple[VocImage, ...] = VOC_IMAGES) -> Path:
    """One VOC year folder: JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<split>.txt."""
    for part in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    for number, image in enumerate(images):
        edges = [(x1 - 1, y1 - 1, x2, y2) for x1, y1, x2, y2 in (obj.box for obj in image.objects)]
        paint(image.size, edges, seed=number).save(folder / "JPEGImages" / f"{image.image_id}.jpg")
        (folder / "Annotations" / f"{image.image_id}.xml").write_text(voc_annotation(image))
        for split in image.splits:
            splits.setdefault(split, []).append(image.image_id)
    for split, ids in splits.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    # A per-class list, as the devkit has: not a split.
    (folder / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000001  1\n")
    return folder


def write_voc_tree(
    root: Path, years: tuple[int, ...] | None = None, images: tuple[VocImage, ...] = VOC_IMAGES
) -> Path:
    """`images` as one VOC year folder at `root` (years None) or as a VOCdevkit at `root` holding
    VOC<year>/ for each of `years` (the same images in each). Returns `root`, what dataset.root takes."""
    root = Path(root)
    if years is None:
        write_voc_year(root, images)
    else:
        for year in years:
            write_voc_year(root / f"VOC{year}", images)
    return root


# Category ids not contiguous and not in order; image ids not in order.
COCO_CATEGORIES = ({"id": 12, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"})
COCO_IMAGES = (
    {"id": 42, "file_name": "000000000042.jpg", "width": 64, "height": 48},
    {"id": 7, "file_name": "000000000007.jpg", "width": 40, "height": 40},
    {"id": 19, "file_name": "000000000019.jpg", "width": 32, "height": 48},  # no annotations
    {"id": 100, "file_name": "000000000100.jpg", "width": 48, "height": 32},  # only a crowd box
)
COCO_ANNOTATIONS = (
    {"id": 1, "image_id": 42, "category_id": 3, "bbox": [4, 5, 10, 20], "iscrowd": 0},
    {"id": 2, "image_id": 42, "category_id": 7, "bbox": [30.5, 8, 12.5, 9], "iscrowd": 0},
    {"id": 3, "image_id": 42, "category_id": 12, "bbox": [0, 0, 20, 20], "iscrowd": 1},
    {"id": 4, "image_id": 7, "category_id": 12, "bbox": [2, 3, 30, 40], "iscrowd": 0},  # past the bottom edge
    {"id": 5, "image_id": 7, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no area
    {"id": 6, "image_id": 100, "category_id": 3, "bbox": [1, 1, 10, 10], "iscrowd": 1},
)


def write_coco_tree(
    root: Path,
    splits: tuple[str, ...] = ("train2017", "val2017"),
    images: tuple[dict, ...] = COCO_IMAGES,
    annotations: tuple[dict, ...] = COCO_ANNOTATIONS,
    categories: tuple[dict, ...] = COCO_CATEGORIES,
) -> Path:
    """A COCO tree at `root`: annotations/instances_<split>.json and <split>/<file_name> for each split (the
    same images and annotations in each). Returns `root`, what dataset.root takes."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / split).mkdir(exist_ok=True)
        for number, image in enumerate(images):
            boxes = [
                (x, y, x + w, y + h)
                for x, y, w, h in (a["bbox"] for a in annotations if a["image_id"] == image["id"])
            ]
            picture = paint((image["width"], image["height"]), boxes, seed=number)
            picture.save(root / split / image["file_name"])
        instances = {
            "info": {"description": "test"},
            "images": list(images),
            "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in annotations],
            "categories": list(categories),
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    return root
