"""The reporting protocol of a run, in one place: which student top-1 summary.json reports (`report`: the
last epoch, the best epoch, the weights averaged over the last `average_epochs` epochs, or an EMA of the
weights with `ema_decay`), the callbacks that make the averaged and EMA students, the summary fields they
fill (with the gap to a recipe's published number), and the table a run ends with."""

from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from timm.utils import ModelEmaV3
from torch.optim.swa_utils import AveragedModel

from kd_experiments.callbacks import top1_on
from kd_experiments.distributed import on_global_zero
from kd_experiments.errors import UserError
from kd_experiments.files import atomic_torch_save

REPORT_PROTOCOLS = ("last", "best", "weight_average", "ema")


class ReportProtocol:
    """`report`, `average_epochs` and `ema_decay` of a run's config, checked; `callbacks` makes what they
    need, `summary_fields` reads the result after training."""

    def __init__(self, report: str = "last", average_epochs: int = 10, ema_decay: float | None = None):
        if report not in REPORT_PROTOCOLS:
            raise UserError(f"report={report!r} is not one of {', '.join(REPORT_PROTOCOLS)}")
        if report == "ema" and ema_decay is None:
            raise UserError("report=ema needs an EMA of the student: set ema_decay, e.g. ema_decay=0.99996")
        self.report, self.average_epochs, self.ema_decay = report, average_epochs, ema_decay
        self.averaging: WeightAveraging | None = None
        self.ema: StudentEMA | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ReportProtocol":
        return cls(cfg.get("report", "last"), cfg.get("average_epochs", 10), cfg.get("ema_decay"))

    def callbacks(self, output_dir: Path) -> list[pl.Callback]:
        if self.report == "weight_average":
            self.averaging = WeightAveraging(self.average_epochs, output_dir)
        if self.ema_decay is not None:
            self.ema = StudentEMA(self.ema_decay, output_dir)
        return [c for c in (self.averaging, self.ema) if c is not None]

    def summary_fields(self, history: list[dict], paper: dict | None, dataset: str | None = None) -> dict:
        """The student's numbers from the validated epochs (`history`) and the averaged / EMA students; the
        gap to a recipe's published number only when the run uses the data set that number was measured on
        (`paper.dataset`), not when the recipe runs on fake or digits data for a test."""
        last = history[-1] if history else {}
        best_top1 = max(h["top1"] for h in history) if history else None
        averaging, ema = self.averaging, self.ema
        reported = {
            "last": last.get("top1"),
            "best": best_top1,
            "weight_average": averaging.top1 if averaging else None,
            "ema": ema.top1 if ema else None,
        }[self.report]
        fields = {
            "student_top1": last.get("top1"),
            "student_top1_best": best_top1,
            "student_top5": last.get("top5"),
            "report": self.report,
            "student_top1_reported": reported,
            "averaged_epochs": averaging.averaged_epochs if averaging else None,
            "student_top1_ema": ema.top1 if ema else None,
            "ema_decay": self.ema_decay,
        }
        paper_top1 = (paper or {}).get("top1")
        if paper_applies(paper, dataset) and paper_top1 is not None and reported is not None:
            fields["gap_to_paper"] = round(reported - paper_top1, 2)
        return fields


def paper_applies(paper: dict | None, dataset: str | None) -> bool:
    """A recipe's published number is this run's yardstick only on the data set it was measured on."""
    return bool(paper) and paper.get("dataset") in (None, dataset)


def print_result_table(summary: dict) -> None:
    """The closing table: teacher, student last / best / EMA / averaged, and a recipe's paper number."""
    table = Table(title=f"{summary['method']} on {summary['dataset']} (seed {summary['seed']})")
    table.add_column("")
    table.add_column("top-1", justify="right")
    for label, value in _result_rows(summary):
        table.add_row(label, "-" if value is None else f"{value:.2f}%")
    print_table_and_footer(table, summary)


def print_table_and_footer(table: Table, summary: dict) -> None:
    """A run's closing table, then how long it trained (this attempt) and where its outputs are; every
    task's table (classification, detection, multi-label) ends this way."""
    console = Console()
    console.print(table)
    throughput = summary.get("train_images_per_s") or "-"
    resumed_at = summary["resumes"][-1]["from_epoch"] if summary.get("resumes") else 0
    resumed = f" (this attempt resumed at epoch {resumed_at})" if resumed_at else ""
    console.print(
        f"{summary['epochs'] - resumed_at} epochs in {summary['wall_s']:.1f}s{resumed}, {throughput} train "
        "images/s"
    )
    console.print(f"outputs: {summary['output_dir']}", soft_wrap=True)


def _result_rows(summary: dict) -> list[tuple[str, float | None]]:
    student = summary["student"]
    rows = [
        (f"teacher {summary['teacher']} ({summary.get('teacher_source')})", summary["teacher_top1"]),
        (f"student {student}, last epoch", summary["student_top1"]),
        (f"student {student}, best epoch", summary["student_top1_best"]),
    ]
    if summary.get("student_top1_ema") is not None:
        rows.append(
            (f"student, EMA of the weights (decay {summary.get('ema_decay')})", summary["student_top1_ema"])
        )
    if summary.get("report") == "weight_average":
        rows.append(
            (
                f"student, weights averaged over {summary.get('averaged_epochs')} epochs",
                summary.get("student_top1_reported"),
            )
        )
    paper = summary.get("paper") or {}
    if paper.get("top1") is not None:
        gap = summary.get("gap_to_paper")
        source = f"paper ({paper.get('source', 'published')})"
        if not paper_applies(paper, summary.get("dataset")):
            label = (
                f"{source}, on {paper['dataset']}: not comparable with this run on {summary.get('dataset')}"
            )
        else:
            label = (
                f"{source}; this run's {summary.get('report')} is "
                f"{'-' if gap is None else f'{gap:+.2f}'} points from it"
            )
        rows.append((label, paper["top1"]))
    return rows


class WeightAveraging(pl.Callback):
    """The mean of the student's weights (and BN buffers) over the last `epochs` training epochs, scored
    on the validation split after training: LSHFM's reported model (DoctorKey/LSHFM.singleclassification
    `train_student.py`, `imagenet_lsh.py`). There the sum starts from a `state_dict()` that aliases the live
    weights, so it counts the second averaged epoch twice and the first not at all; here each of the last
    `epochs` epochs counts once.

    The averaged student is saved as `averaged_student.pt` (a plain state_dict) under `output_dir`;
    `top1` holds its validation top-1 (%).
    """

    def __init__(self, epochs: int, output_dir):
        self.epochs = epochs
        self.output_path = Path(output_dir) / "checkpoints" / "averaged_student.pt"
        self.averaged = None
        self.averaged_epochs = 0
        self.first_epoch: int | None = None
        self.top1: float | None = None
        self._restored: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        restored, self._restored = self._restored, None
        # A run resumed with a longer trainer.max_epochs averages its own last epochs, not the old ones.
        if restored and restored["first_epoch"] >= trainer.max_epochs - self.epochs:
            self.averaged = AveragedModel(pl_module.student, use_buffers=True)
            self.averaged.load_state_dict(restored["averaged"])
            self.averaged_epochs, self.first_epoch = restored["averaged_epochs"], restored["first_epoch"]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < trainer.max_epochs - self.epochs:
            return
        if self.averaged is None:  # a copy; the first update_parameters() below sets it to these weights
            self.averaged = AveragedModel(pl_module.student, use_buffers=True)
            self.first_epoch = trainer.current_epoch
        self.averaged.update_parameters(pl_module.student)
        self.averaged_epochs += 1

    def state_dict(self) -> dict:
        if self.averaged is None:
            return {}
        return {
            "averaged": self.averaged.state_dict(),
            "averaged_epochs": self.averaged_epochs,
            "first_epoch": self.first_epoch,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.averaged is None:
            return
        model = self.averaged.module
        # Once, on rank zero's device over the whole split; every rank gets the number (broadcast).
        loader = trainer.datamodule.whole_val_dataloader
        self.top1 = on_global_zero(trainer, lambda: top1_on(model, loader(), pl_module.device))
        if trainer.is_global_zero:
            self.output_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(model.state_dict(), self.output_path)


class StudentEMA(pl.Callback):
    """An exponential moving average of the student's weights, updated after every optimizer step with
    `decay` (timm's `ModelEmaV3`, buffers averaged too): DeiT's `--model-ema` (decay 0.99996,
    facebookresearch/deit `main.py`).
    As in DeiT, the EMA is kept beside the trained student, not in its place: validation and the
    `last`/`best` numbers score the student itself; after training the EMA is scored once on the
    validation split (`top1`, reported as `student_top1_ema`, or as the result with `report: ema`) and
    saved as `checkpoints/ema_student.pt`. Its weights travel in every Lightning checkpoint, so a resumed
    run continues the same average.
    """

    def __init__(self, decay: float, output_dir):
        if not 0.0 < decay < 1.0:
            raise UserError(f"ema_decay must lie in (0, 1), e.g. 0.99996 (DeiT); got {decay}")
        self.decay = decay
        self.output_path = Path(output_dir) / "checkpoints" / "ema_student.pt"
        self.ema: ModelEmaV3 | None = None
        self.top1: float | None = None
        self._restored: dict | None = None
        self._updated_at_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ema = ModelEmaV3(pl_module.student, decay=self.decay)
        if self._restored is not None:
            self.ema.module.load_state_dict(self._restored)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._updated_at_step:  # once per optimizer step (gradient accumulation)
            self._updated_at_step = trainer.global_step
            self.ema.update(pl_module.student, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        # Once, on rank zero's device over the whole split; every rank gets the number (broadcast).
        loader = trainer.datamodule.whole_val_dataloader
        self.top1 = on_global_zero(trainer, lambda: top1_on(self.ema.module, loader(), pl_module.device))
        if trainer.is_global_zero:
            self.output_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(self.ema.module.state_dict(), self.output_path)

    def state_dict(self) -> dict:
        return {"ema_student": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("ema_student")
        if self._restored is not None and self.ema is not None:
            self.ema.module.load_state_dict(self._restored)
