"""Small Lightning callbacks and the progress bar the framework uses."""

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

from kd_experiments.errors import UserError

log = logging.getLogger(__name__)


def progress_bar() -> pl.Callback:
    # Redrawn 10 times a second, not Lightning's 100: the drawing thread competes with the training loop.
    return QuietProgressBar(refresh_rate=10, leave=False)


class QuietProgressBar(RichProgressBar):
    """Rich's progress bar, whose logged numbers (the step's loss) are read every `trainer.log_every_n_steps`
    training steps and at an epoch's last batch, not every step: reading one converts a device tensor to a
    Python number, a host sync that would stall the GPU's queue each step. The bar itself still moves every
    step; between reads it shows the numbers last read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown: dict = {}

    def get_metrics(self, trainer, pl_module) -> dict:
        # During a training batch (not at an epoch's end or in validation) only a logging step reads anew.
        in_batch = trainer.training and not trainer.fit_loop.epoch_loop.done
        if in_batch and trainer.global_step % trainer.log_every_n_steps != 0:
            return self._shown
        self._shown = super().get_metrics(trainer, pl_module)
        return self._shown


def last_epoch_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """`last.ckpt`, rewritten after every training epoch (after that epoch's validation, if any).

    Lightning's own `save_last` only writes when a top-k checkpoint was saved in the same step, so its
    last.ckpt stays at the best epoch; an unmonitored top-1 checkpoint under a fixed name is the latest.
    """
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


class ValidateFinalEpoch(pl.Callback):
    """Validate the last epoch whatever `trainer.check_val_every_n_epoch` says, so that the "last epoch" top-1
    (summary.json, the result table) is the last epoch's even when validation runs every few epochs only.

    Lightning validates epochs e with (e + 1) % n == 0 and nothing else; a run that ends before max_epochs
    (max_steps) is not covered.
    """

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        final = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        if final and trainer.check_val_every_n_epoch not in (None, 1):
            trainer.check_val_every_n_epoch = 1


class NonFiniteWatch:
    """Remembers, on the device, the first step at which each loss term was NaN or infinite, so the training
    step needs no host sync; `raise_if_nonfinite` (every few steps and at each epoch's end) stops the run
    with one line naming the term, its value and that step."""

    def __init__(self, names):
        self.names = list(names)
        self.first_step: torch.Tensor | None = None
        self.first_value: torch.Tensor | None = None

    def update(self, terms: dict, step: int) -> None:
        values = torch.stack([terms[name].detach().float() for name in self.names])
        if self.first_step is None or self.first_step.device != values.device:
            self.first_step = torch.full_like(values, -1, dtype=torch.long)
            self.first_value = torch.zeros_like(values)
        first = ~torch.isfinite(values) & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_value = torch.where(first, values, self.first_value)

    def raise_if_nonfinite(self, step: int) -> None:
        if self.first_step is None:
            return
        bad = [
            (int(s), name, float(v))
            for name, s, v in zip(self.names, self.first_step, self.first_value, strict=True)
            if s >= 0
        ]
        if bad:
            first_step, name, value = min(bad)
            raise UserError(
                f"loss term {name} became {value} at step {first_step} (stopped at step {step}; the "
                "checkpoints of earlier epochs are kept): lower optimizer.lr, or check this term's weight"
            )


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

    @property
    def epoch_images_per_s(self) -> float | None:
        return self._epoch_images / self._epoch_seconds if self._epoch_seconds > 0 else None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_images, self._epoch_seconds = 0, 0.0
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.done and pl_module.device.type == "cuda":
            # The GPU runs behind the host: an epoch's time ends when its last step has run, not been queued
            # (once per epoch; no other step waits).
            torch.cuda.synchronize(pl_module.device)
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
        if self._epoch_seconds > 0:  # each rank's own timing: under DDP the ranks' mean (sync_dist)
            pl_module.log("train/images_per_s", self._epoch_images / self._epoch_seconds, sync_dist=True)

    def state_dict(self) -> dict:  # a resumed run's average covers the epochs before the interruption too
        return {"images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images, self.seconds = state_dict["images"], state_dict["seconds"]


class EpochRecord(pl.Callback):
    """Each training epoch's record for summary.json's `history` (so curves never depend on a logger being
    on): the mean of every loss term and of the loss, the learning rate of the epoch's last step, and
    images/s; the epoch's validation top-1/top-5 are merged in from the module's validation history. Also
    one log line per epoch, which is what a SLURM log or a console without a progress bar shows.

    Runs after `throughput` (its place in the callback list), so that callback's epoch rate is final.
    """

    def __init__(self, throughput: TrainThroughput):
        self.throughput = throughput
        self.records: list[dict] = []
        self._lr: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The rate this step uses: by a batch's or epoch's end Lightning has already stepped the scheduler.
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # compute() syncs across DDP ranks; Lightning's own epoch logging reuses the computed value.
        means = {name: metric.compute().item() for name, metric in pl_module.train_means.items()}
        rate = self.throughput.epoch_images_per_s
        record = {"epoch": trainer.current_epoch, "lr": self._lr, "train": means}
        record["images_per_s"] = round(rate, 1) if rate else None
        self.records.append(record)
        if trainer.is_global_zero and not trainer.sanity_checking:
            log.info(self._line(trainer, pl_module, record))

    @staticmethod
    def _line(trainer, pl_module, record: dict) -> str:
        validated = [h for h in pl_module.validation_history if h["epoch"] == record["epoch"]]
        # A classifier's headline is its top-1, a detector's its mAP@[.5:.95] (detection/module.py).
        name, key = ("mAP", "map") if validated and "map" in validated[-1] else ("top-1", "top1")
        score = f"{validated[-1][key]:.2f}%" if validated else "-"
        lr = "-" if record["lr"] is None else f"{record['lr']:.4g}"
        loss = record["train"]["loss"]
        return (
            f"epoch {record['epoch'] + 1}/{trainer.max_epochs}: loss {loss:.4f}, val {name} {score}, "
            f"lr {lr}, {record['images_per_s'] or '-'} images/s"
        )

    def state_dict(self) -> dict:  # a resumed run's history keeps the epochs before the interruption
        return {"records": list(self.records)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict.get("records", []))


def epoch_history(records: list[dict], validation_history: list[dict]) -> list[dict]:
    """summary.json's `history`: per trained epoch, its record with that epoch's scores (when validated);
    of an epoch recorded twice (an interrupted epoch that a resumed run trained again) the later counts."""
    by_epoch = {record["epoch"]: dict(record) for record in records}
    for entry in validation_history:  # top1/top5 of a classifier, map/map50/voc07_map50 of a detector
        by_epoch.setdefault(entry["epoch"], {"epoch": entry["epoch"]}).update(entry)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def top1_on(model: torch.nn.Module, loader, device: torch.device, prepare=None) -> float:
    """Top-1 (%) of `model` in eval mode over `loader`; `prepare` maps the images first (a teacher's own
    input normalisation)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            images = images.to(device)
            logits = model(prepare(images) if prepare is not None else images)
            correct += (logits.argmax(1).cpu() == targets).sum().item()
            total += len(targets)
    return 100.0 * correct / max(total, 1)
