"""Random images and labels of any size: for benchmarks and smoke tests of big models."""

import torch
from torch.utils.data import Dataset

from kd_experiments.data.base import ClassificationData

# Distinct random images generated up front; items cycle through them so that memory stays small at
# ImageNet sizes and loading costs nothing next to the models.
POOL_SIZE = 64


class FakeImages(Dataset):
    def __init__(self, length: int, num_classes: int, image_size: int, channels: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.length = length
        self.images = torch.randn(
            min(length, POOL_SIZE), channels, image_size, image_size, generator=generator
        )
        self.labels = torch.randint(0, num_classes, (length,), generator=generator)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index % len(self.images)], self.labels[index]


class FakeData(ClassificationData):
    name = "fake"

    def __init__(
        self,
        batch_size: int = 64,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        num_workers: int = 0,
        train_length: int = 2048,
        val_length: int = 512,
        **common,
    ):
        super().__init__(batch_size, num_classes, image_size, channels, num_workers, **common)
        self.train_length = train_length
        self.val_length = val_length

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        shape = (self.num_classes, self.image_size, self.channels)
        self.train_set = FakeImages(self.train_length, *shape, seed=0)
        self.val_set = FakeImages(self.val_length, *shape, seed=1)
