"""Faults for tests, injected as a run's own callback: `+callbacks.fault._target_=tests.faults.SignalOnce`."""

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalOnce(pl.Callback):
    """Send `signal` (SIGKILL, SIGTERM, SIGUSR1) to this process at batch `batch` of epoch `epoch`, once: a
    `marker` file records that it fired, so the same command run again (a resume) trains on."""

    def __init__(self, signal: str, epoch: int, batch: int, marker: str):
        self.signum = getattr(signal_module, signal)  # the argument's name shadows the module
        self.epoch, self.batch, self.marker = epoch, batch, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch) and not self.marker.exists():
            self.marker.write_text(f"{self.signum} at epoch {self.epoch}, batch {self.batch}\n")
            os.kill(os.getpid(), self.signum)


signal_module = signal
