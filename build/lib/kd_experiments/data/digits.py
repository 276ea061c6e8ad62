"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes): the embedded data set.

The train/val split is fixed and stratified (independent of the run seed), so every run of every method
is scored on the same validation images.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset

from kd_experiments.data.base import ClassificationData, require_path
from kd_experiments.errors import UserError

SPLIT_SEED = 0  # fixed on purpose: the split must not change with the run seed
PIXEL_MAX = 16.0  # the data set stores 0..16 intensities


def load_digits_arrays(data_file: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 8 x 8, float in [0, 1]) and labels, from scikit-learn or from a CSV file in its format
    (one image a row: 64 pixel values 0..16, then the label)."""
    if data_file is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    else:
        path = require_path(
            data_file,
            "digits data file (dataset.data_file)",
            "point dataset.data_file at a CSV of 64 pixels + label per row, or set dataset.data_file=null "
            "to use the copy bundled with scikit-learn",
        )
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, ValueError) as error:
            raise UserError(f"could not read digits data file {path}: {error}") from None
        if table.shape[1] != 65:
            raise UserError(
                f"digits data file {path} has {table.shape[1]} columns; expected 64 pixels + label"
            )
        pixels, labels = table[:, :64], table[:, 64]
    images = (pixels / PIXEL_MAX).astype(np.float32).reshape(-1, 8, 8)
    return images, labels.astype(np.int64)


class RandomShiftDataset(Dataset):
    """Training images shifted by up to `max_shift` pixels in x and y (pad with the background, crop).

    Without augmentation a teacher memorises the 898 training images and its soft targets on them are
    nearly one-hot; on shifted images they carry the class similarities that distillation transfers.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int, background: float):
        self.tensors = (images, labels)
        self.max_shift = max_shift
        self.background = background

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.tensors[0][index], self.tensors[1][index]
        if self.max_shift == 0:
            return image, label
        shift = self.max_shift
        padded = F.pad(image, (shift, shift, shift, shift), value=self.background)
        top, left = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        size = image.shape[-1]
        return padded[:, top : top + size, left : left + size], label


class DigitsData(ClassificationData):
    name = "digits"

    def __init__(
        self,
        batch_size: int = 64,
        num_classes: int = 10,
        image_size: int = 8,
        channels: int = 1,
        num_workers: int = 0,
        val_fraction: float = 0.8,
        data_file: str | None = None,
        max_shift: int = 1,
        **common,
    ):
        super().__init__(batch_size, num_classes, image_size, channels, num_workers, **common)
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"dataset.val_fraction must be between 0 and 1, got {val_fraction}")
        if max_shift < 0:
            raise UserError(f"dataset.max_shift must be >= 0 (pixels of the 8x8 original), got {max_shift}")
        self.val_fraction = val_fraction
        self.data_file = data_file
        self.max_shift = max_shift

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_arrays(self.data_file)
        found_classes = int(labels.max()) + 1
        if found_classes > self.num_classes:
            raise UserError(
                f"the digits data has {found_classes} classes but dataset.num_classes={self.num_classes}"
            )
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=self.val_fraction, stratify=labels, random_state=SPLIT_SEED
        )
        tensor_images = self._prepare(torch.from_numpy(images))
        # Standardise with the training split's statistics only.
        mean, std = tensor_images[train_idx].mean(), tensor_images[train_idx].std()
        tensor_images = (tensor_images - mean) / std
        tensor_labels = torch.from_numpy(labels)
        background = float((0.0 - mean) / std)
        shift_px = round(self.max_shift * self.image_size / 8)  # max_shift is in original 8x8 pixels
        self.train_set = RandomShiftDataset(
            tensor_images[train_idx], tensor_labels[train_idx], shift_px, background
        )
        self.val_set = TensorDataset(tensor_images[val_idx], tensor_labels[val_idx])

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """N x 8 x 8 -> N x channels x image_size x image_size."""
        images = images.unsqueeze(1)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return images.expand(-1, self.channels, -1, -1).contiguous()
