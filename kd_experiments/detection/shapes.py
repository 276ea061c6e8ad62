"""Generated shapes: circles, squares and triangles on a noisy background, the embedded data set of the
detection task (no files, no download), as the scikit-learn digits are for classification.

Every image is drawn when it is read, from a generator seeded by (generator_seed, split, index): the data
set is the same in every run whatever the run's seed and the number of loader workers, the validation
images do not change with num_train, and nothing is held in memory. The classes differ by shape only
(colours and sizes are random for every object), the objects do not overlap and their boxes are tight
around their pixels, so a small detector can learn the task in minutes on a CPU.
"""

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_experiments.detection.data import DetectionData, Target, Transform, make_target
from kd_experiments.errors import UserError

SHAPE_NAMES = ("circle", "square", "triangle")  # labels 1, 2, 3
SPLIT_STREAMS = {"train": 0, "val": 1}  # the second seed word of each split's images
MIN_IMAGE_SIZE = 32  # the smallest shape (image_size / 10) still spans a few pixels
PLACEMENT_ATTEMPTS = 20  # tries to place an object clear of the others before leaving it out
BACKGROUND_RANGE = (0.0, 0.4)  # per channel; objects are brighter, so they stand out whatever their colour
OBJECT_RANGE = (0.5, 1.0)
NOISE_AMPLITUDE = 0.08  # uniform per-pixel noise in +-this (uniform: a quarter of the cost of normal)


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Which pixels (centres at u, v, relative to the shape's top-left corner; u a row, v a column) shape
    `shape` of side or diameter `size` covers: a circle, an axis-aligned square, or a triangle with its apex
    at the top centre."""
    if shape == 0:
        return (u - size / 2) ** 2 + (v - size / 2) ** 2 <= (size / 2) ** 2
    inside_rows = (v >= 0) & (v <= size)
    if shape == 1:
        return inside_rows & (u >= 0) & (u <= size)
    return inside_rows & (np.abs(u - size / 2) <= v / 2)


def draw_shapes(
    rng: np.random.Generator, image_size: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One image (image_size x image_size x 3, float32 in [0, 1]) with 1..max_objects shapes, their tight
    boxes (pixel edges: the box of pixels x0..x1 inclusive is x0, x1 + 1) and labels. An object that finds no
    place clear of the others (with a pixel of gap) in `PLACEMENT_ATTEMPTS` tries is left out; the first
    always fits."""
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = rng.uniform(*BACKGROUND_RANGE, size=3)
    squares: list[tuple[float, float, float, float]] = []  # the placed objects' extents
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            size = rng.uniform(image_size / 10, image_size / 4)
            left, top = rng.uniform(0, image_size - size, size=2)
            if all(
                left > right + 1
                or left + size + 1 < other_left
                or top > bottom + 1
                or top + size + 1 < other_top
                for other_left, other_top, right, bottom in squares
            ):
                break
        else:
            continue
        squares.append((left, top, left + size, top + size))
        shape = int(rng.integers(len(SHAPE_NAMES)))
        x0, y0 = int(left), int(top)
        x1, y1 = min(math.ceil(left + size), image_size), min(math.ceil(top + size), image_size)
        u = np.arange(x0, x1) + (0.5 - left)  # pixel centres: a row of x, a column of y (broadcast)
        v = np.arange(y0, y1)[:, None] + (0.5 - top)
        mask = shape_mask(shape, u, v, size)
        image[y0:y1, x0:x1][mask] = rng.uniform(*OBJECT_RANGE, size=3)
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append((x0 + columns[0], y0 + rows[0], x0 + columns[-1] + 1, y0 + rows[-1] + 1))
        labels.append(shape + 1)
    noise = rng.random(size=image.shape, dtype=np.float32)
    image += (noise - 0.5) * (2 * NOISE_AMPLITUDE)
    return image.clip(0.0, 1.0, out=image), boxes, labels


class GeneratedShapes(Dataset):
    """`count` images of `draw_shapes`, image `index` drawn from the generator seeded by (generator_seed,
    stream, index); `transform` (training: the random flip) is applied after. Image ids are the indices."""

    def __init__(
        self,
        count: int,
        image_size: int,
        max_objects: int,
        generator_seed: int,
        stream: int,
        transform: Transform | None = None,
    ):
        self.count, self.image_size, self.max_objects = count, image_size, max_objects
        self.generator_seed, self.stream = generator_seed, stream
        self.transform = transform

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if not 0 <= index < self.count:
            raise IndexError(f"image {index} of {self.count}")
        rng = np.random.default_rng((self.generator_seed, self.stream, index))
        pixels, boxes, labels = draw_shapes(rng, self.image_size, self.max_objects)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        target = make_target(boxes, labels, [False] * len(labels), index)
        if self.transform is not None:
            return self.transform(image, target)
        return image, target


class ShapesData(DetectionData):
    """The generated shapes (see the module docstring): `num_train` and `num_val` images of `image_size`
    pixels square with 1..`max_objects` objects each (sizes image_size / 10 to image_size / 4), made from
    `generator_seed`, which is fixed on purpose, apart from the run's seed, so that every run is trained and
    scored on the same images. The detector resizes to `image_size`, the images' own size."""

    name = "shapes"

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        num_train: int = 600,
        num_val: int = 200,
        image_size: int = 64,
        max_objects: int = 4,
        generator_seed: int = 0,
        **common,
    ):
        super().__init__(batch_size, num_workers, **common)
        counts = {"num_train": num_train, "num_val": num_val, "max_objects": max_objects}
        for key, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"dataset.{key} must be a positive integer, got {value!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
            raise UserError(
                f"dataset.image_size must be an integer of at least {MIN_IMAGE_SIZE} (pixels; the smallest "
                f"shape is a tenth of it), got {image_size!r}"
            )
        if not isinstance(generator_seed, int) or isinstance(generator_seed, bool) or generator_seed < 0:
            raise UserError(f"dataset.generator_seed must be an integer >= 0, got {generator_seed!r}")
        self.num_train, self.num_val, self.max_objects = num_train, num_val, max_objects
        self.generator_seed = generator_seed
        self.image_size = image_size
        self.set_classes(SHAPE_NAMES, "the shapes data set")

    def read_splits(self) -> tuple[GeneratedShapes, GeneratedShapes]:
        shape = (self.image_size, self.max_objects, self.generator_seed)
        return (
            GeneratedShapes(self.num_train, *shape, SPLIT_STREAMS["train"], self.train_transform()),
            GeneratedShapes(self.num_val, *shape, SPLIT_STREAMS["val"]),
        )
