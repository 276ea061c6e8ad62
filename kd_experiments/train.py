"""compose -> instantiate -> fit -> summary.json: one run of the framework."""

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from kd_experiments.callbacks import StudentEMA, TrainThroughput, WeightAveraging, progress_bar
from kd_experiments.data.base import ClassificationData, Renormalize
from kd_experiments.errors import UserError
from kd_experiments.loggers import finish_logger
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import has_distill_head
from kd_experiments.module import DistillationModule
from kd_experiments.teachers import (
    build_teacher,
    check_teacher_reference,
    model_kwargs,
    prepare_teacher_statistics,
)

log = logging.getLogger(__name__)

REPORT_PROTOCOLS = ("last", "best", "weight_average", "ema")

# In-memory data sets need no loader workers; Lightning's advice to add some is noise here.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def train(cfg: DictConfig) -> float | None:
    """Run one experiment; return the best student top-1 (what a sweeper optimises)."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir).resolve()
    summary_path = output_dir / "summary.json"
    if summary_path.exists():
        raise UserError(f"{output_dir} already holds a finished run (summary.json); pick a new hydra.run.dir")
    summary = {
        "status": "running",
        "method": cfg.method.name,
        "teacher": cfg.teacher.arch,
        "student": cfg.student.arch,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "overrides": _task_overrides(),
        "output_dir": str(output_dir),
    }
    if cfg.get("paper"):  # a recipe's published number, copied next to this run's result
        summary["paper"] = OmegaConf.to_container(cfg.paper, resolve=True)
    try:
        summary |= _fit(cfg, output_dir)
        summary["status"] = "completed"
        paper_top1 = (summary.get("paper") or {}).get("top1")
        if paper_top1 is not None and summary["student_top1_reported"] is not None:
            summary["gap_to_paper"] = round(summary["student_top1_reported"] - paper_top1, 2)
    except BaseException as error:
        summary |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes
            write_json_atomically(summary, summary_path)
    if rank_zero_only.rank == 0:
        _print_result_table(summary)
    return summary["student_top1_best"]


def _fit(cfg: DictConfig, output_dir: Path) -> dict:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: ClassificationData = build(cfg.dataset, "dataset")
    datamodule.setup("fit")
    if cfg.dataset.get("num_classes") is None:  # counted from the data (imagefolder); models interpolate it
        cfg.dataset.num_classes = datamodule.num_classes
    for role in ("teacher", "student"):
        if cfg[role].num_classes != datamodule.num_classes:
            raise UserError(
                f"{role}.num_classes={cfg[role].num_classes} but dataset {cfg.dataset.name} has "
                f"{datamodule.num_classes} classes; set {role}.num_classes={datamodule.num_classes}"
            )

    teacher, teacher_identity = build_teacher(
        cfg.teacher, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir
    )
    teacher_input = _teacher_input(cfg.teacher, datamodule) if teacher is not None else None
    teacher_reference_top1 = (
        check_teacher_reference(teacher, cfg.teacher, datamodule, teacher_input)
        if teacher is not None
        else None
    )
    # Re-seed so that the student's initialisation does not depend on how the teacher was obtained.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    student = create_model(
        cfg.student.arch,
        num_classes=cfg.student.num_classes,
        pretrained=cfg.student.get("pretrained") or False,
        in_chans=cfg.student.in_chans,
        **model_kwargs(cfg.student),
    )
    method = build(cfg.method.objective, "method.objective")
    student = _setup_method(method, student, teacher, datamodule, teacher_input)
    if teacher is not None:
        prepare_teacher_statistics(
            method, teacher, teacher_identity, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir,
            teacher_input,
        )  # fmt: skip

    scheduler_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else {}
    scheduler_interval = scheduler_cfg.pop("interval", "epoch")
    module = DistillationModule(
        student=student,
        method=method,
        loss_weights=OmegaConf.to_container(cfg.method.weights, resolve=True),
        optimizer=build_factory(cfg.optimizer, "optimizer", lambda make: make(_dummy_parameters())),
        scheduler=(
            build_factory(
                scheduler_cfg, "scheduler", lambda make: make(torch.optim.SGD(_dummy_parameters(), lr=0.1))
            )
            if scheduler_cfg
            else None
        ),
        scheduler_interval=scheduler_interval,
        num_classes=datamodule.num_classes,
        teacher=teacher,
        teacher_identity=teacher_identity,
        teacher_input=teacher_input,
    )

    module.teacher_top1 = teacher_reference_top1  # measured already: the first validation reuses it
    logger = build(cfg.logger, "logger", **_logger_names(cfg.logger, output_dir)) if cfg.logger else False
    throughput = TrainThroughput()
    callbacks = [throughput, *_standard_callbacks(cfg, output_dir, has_logger=bool(logger))]
    report = cfg.get("report", "last")
    if report not in REPORT_PROTOCOLS:
        raise UserError(f"report={report!r} is not one of {', '.join(REPORT_PROTOCOLS)}")
    averaging = (
        WeightAveraging(cfg.get("average_epochs", 10), output_dir) if report == "weight_average" else None
    )
    if averaging:
        callbacks.append(averaging)
    ema_decay = cfg.get("ema_decay")
    if report == "ema" and ema_decay is None:
        raise UserError("report=ema needs an EMA of the student: set ema_decay, e.g. ema_decay=0.99996")
    ema = StudentEMA(ema_decay, output_dir) if ema_decay is not None else None
    if ema:
        callbacks.append(ema)
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=logger)
    try:
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=datamodule)
    finally:
        finish_logger(logger)

    history = module.validation_history
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    last_top1 = history[-1]["top1"] if history else None
    best_top1 = max(h["top1"] for h in history) if history else None
    reported = {
        "last": last_top1,
        "best": best_top1,
        "weight_average": averaging.top1 if averaging else None,
        "ema": ema.top1 if ema else None,
    }[report]
    return {
        "student_top1": last_top1,
        "student_top1_best": best_top1,
        "report": report,
        "student_top1_reported": reported,
        "averaged_epochs": averaging.averaged_epochs if averaging else None,
        "student_top1_ema": ema.top1 if ema else None,
        "ema_decay": ema_decay,
        "two_head_inference": has_distill_head(student),
        "student_top5": history[-1]["top5"] if history else None,
        "teacher_top1": module.teacher_top1,
        "teacher_reference_top1": cfg.teacher.get("reference_top1"),
        "teacher_source": teacher_identity.get("source"),
        "teacher_sha256": teacher_identity.get("sha256"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_images_per_s": round(throughput.images_per_s, 1) if throughput.images_per_s else None,
        "best_checkpoint": (checkpoint.best_model_path or None) if checkpoint else None,
        "last_checkpoint": (checkpoint.last_model_path or None) if checkpoint else None,
    }


def build(node, what: str, **kwargs):
    """hydra.utils.instantiate, with config mistakes (a bad key, a rejected value) as one-line errors."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = " ".join(str(cause or error).split())
        raise UserError(f"could not build {what} from its config: {reason}") from None


def build_factory(node, what: str, try_call) -> object:
    """Build a `_partial_` factory (optimizer, scheduler) and call it once on a dummy, so that a bad key
    fails now with one line instead of deep inside `trainer.fit`."""
    factory = build(node, what)
    try:
        try_call(factory)
    except (TypeError, ValueError) as error:
        raise UserError(f"{what} config is invalid: {error}") from None
    return factory


def _dummy_parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def _setup_method(
    method, student, teacher, datamodule: ClassificationData, teacher_input=None
) -> torch.nn.Module:
    """Let the method adapt the student and size its projectors from one probe batch, without touching
    BatchNorm statistics; return the student to train."""
    probe_images = torch.stack([datamodule.train_set[index][0] for index in range(2)])

    def probe(network, needs, images=probe_images):
        network.eval()
        with torch.no_grad():
            return extract_features(network, images, needs)

    student_needs = method.student_features | {"logits"}
    student_probe = probe(student, student_needs)
    teacher_probe = None
    if method.teacher_features:
        teacher_images = teacher_input(probe_images) if teacher_input is not None else probe_images
        teacher_probe = probe(teacher, method.teacher_features, teacher_images)
    adapted = method.adapt_student(student, student_probe, teacher_probe)
    if adapted is not student:
        student_probe = probe(adapted, student_needs)
    adapted.train()
    method.setup(student_probe, teacher_probe)
    return adapted


def _teacher_input(teacher_cfg: DictConfig, datamodule: ClassificationData) -> Renormalize | None:
    """The map from the data's normalisation to the teacher's own (`teacher.input_mean` /
    `teacher.input_std`), or None when the teacher takes the data as it is."""
    mean, std = teacher_cfg.get("input_mean"), teacher_cfg.get("input_std")
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UserError("set both teacher.input_mean and teacher.input_std, or neither")
    if datamodule.normalization is None:
        raise UserError(
            f"teacher.input_mean/input_std re-normalise the images for the teacher, but dataset "
            f"{datamodule.name} does not declare its own normalisation; drop them for this data set"
        )
    target = (tuple(mean), tuple(std))
    if any(len(values) != datamodule.channels for values in target):
        raise UserError(
            f"teacher.input_mean and input_std need {datamodule.channels} values (one per channel); "
            f"got {list(mean)} and {list(std)}"
        )
    if target == tuple(map(tuple, datamodule.normalization)):
        return None
    return Renormalize(datamodule.normalization, target)


def _standard_callbacks(cfg: DictConfig, output_dir: Path, has_logger: bool) -> list[pl.Callback]:
    trainer_cfg = cfg.trainer
    callbacks: list[pl.Callback] = []
    if trainer_cfg.get("enable_checkpointing", True):
        validates = trainer_cfg.get("limit_val_batches", 1.0) != 0
        callbacks.append(
            ModelCheckpoint(
                dirpath=output_dir / "checkpoints",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor="val/student_top1" if validates else None,
                mode="max",
                save_top_k=1 if validates else 0,
                save_last=True,
            )
        )
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    if has_logger:
        callbacks.append(LearningRateMonitor())  # at each scheduler's own interval
    return callbacks


def _logger_names(logger_cfg: DictConfig, output_dir: Path) -> dict:
    """W&B name and group: the run directory's name, and for a multirun the sweep as the group."""
    if "wandb_logger" not in str(logger_cfg.get("_target_", "")):
        return {}
    names = {}
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    if logger_cfg.get("group") is None and multirun:
        names["group"] = Path(hydra_cfg.sweep.dir).name
    if logger_cfg.get("name") is None:
        override_text = hydra_cfg.job.override_dirname if hydra_cfg else ""
        names["name"] = (
            f"{output_dir.name}:{override_text}" if multirun and override_text else output_dir.name
        )
    return names


def _task_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def write_json_atomically(payload: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(descriptor, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def _print_result_table(summary: dict) -> None:
    def percent(value):
        return "-" if value is None else f"{value:.2f}%"

    table = Table(title=f"{summary['method']} on {summary['dataset']} (seed {summary['seed']})")
    table.add_column("")
    table.add_column("top-1", justify="right")
    table.add_row(
        f"teacher {summary['teacher']} ({summary.get('teacher_source')})", percent(summary["teacher_top1"])
    )
    table.add_row(f"student {summary['student']}, last epoch", percent(summary["student_top1"]))
    table.add_row(f"student {summary['student']}, best epoch", percent(summary["student_top1_best"]))
    if summary.get("student_top1_ema") is not None:
        table.add_row(
            f"student, EMA of the weights (decay {summary.get('ema_decay')})",
            percent(summary["student_top1_ema"]),
        )
    if summary.get("report") == "weight_average":
        table.add_row(
            f"student, weights averaged over {summary.get('averaged_epochs')} epochs",
            percent(summary.get("student_top1_reported")),
        )
    paper = summary.get("paper") or {}
    if paper.get("top1") is not None:
        gap = summary.get("gap_to_paper")
        table.add_row(
            f"paper ({paper.get('source', 'published')}); this run's {summary.get('report')} is "
            f"{'-' if gap is None else f'{gap:+.2f}'} points from it",
            percent(paper["top1"]),
        )
    console = Console()
    console.print(table)
    throughput = summary["train_images_per_s"] or "-"
    console.print(f"{summary['epochs']} epochs in {summary['wall_s']:.1f}s, {throughput} train images/s")
    console.print(f"outputs: {summary['output_dir']}", soft_wrap=True)
