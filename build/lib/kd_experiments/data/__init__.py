"""LightningDataModules. Every data set takes the same keys where they apply: `batch_size`, `image_size`,
`channels`, `num_classes`, `num_workers`."""

from kd_experiments.data.base import ClassificationData

__all__ = ["ClassificationData"]
