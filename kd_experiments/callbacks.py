"""Small Lightning callbacks and the progress bar the framework uses."""

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


def progress_bar() -> pl.Callback:
    return RichProgressBar(leave=False)


class TrainThroughput(pl.Callback):
    """Training images per second, counting batch loading and the optimizer step but not validation.

    Logged per epoch as `train/images_per_s`; `images_per_s` is the whole run's average.
    """

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._epoch_images = 0
        self._epoch_seconds = 0.0
        self._mark = 0.0

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_images, self._epoch_seconds = 0, 0.0
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        images = len(batch[0]) * trainer.world_size
        self._epoch_images += images
        self._epoch_seconds += now - self._mark
        self.images += images
        self.seconds += now - self._mark
        self._mark = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()  # validation time is not training time

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_seconds > 0:
            pl_module.log("train/images_per_s", self._epoch_images / self._epoch_seconds)
