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


class WeightAveraging(pl.Callback):
    """The mean of the student's weights (and BN buffers) over the last `epochs` training epochs, scored
    on the validation split after training: LSHFM's reported model (methods.md 0, LSH-C `train_student.py`).

    The averaged student is saved as `averaged_student.pt` (a plain state_dict) under `output_dir`;
    `top1` holds its validation top-1 (%).
    """

    def __init__(self, epochs: int, output_dir):
        from pathlib import Path

        self.epochs = epochs
        self.output_path = Path(output_dir) / "checkpoints" / "averaged_student.pt"
        self.averaged = None
        self.averaged_epochs = 0
        self.top1: float | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < trainer.max_epochs - self.epochs:
            return
        from torch.optim.swa_utils import AveragedModel

        if self.averaged is None:  # a copy; the first update_parameters() below sets it to these weights
            self.averaged = AveragedModel(pl_module.student, use_buffers=True)
        self.averaged.update_parameters(pl_module.student)
        self.averaged_epochs += 1

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        if self.averaged is None:
            return
        model = self.averaged.module.eval()
        correct = total = 0
        with torch.no_grad():
            for images, targets in trainer.datamodule.val_dataloader():
                logits = model(images.to(pl_module.device))
                correct += (logits.argmax(1).cpu() == targets).sum().item()
                total += len(targets)
        self.top1 = 100.0 * correct / max(total, 1)
        if trainer.is_global_zero:
            self.output_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), self.output_path)
