"""The phases of a detection run (`dataset.task: detection`), as `train.py` runs a classification one:
data, student + objective (probed on one batch), teacher (checkpoint file, trained on the fly and cached,
or random), module, trainer, fit, report. `train.train` hands over here after its shared start (resume,
run folder, summary.json) and takes the fields returned for summary.json."""

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.seed import isolate_rng
from rich.table import Table

from kd_experiments.assembly import (
    build,
    build_method,
    fit_teacher,
    freeze_student,
    initial_student_weights,
    objective_errors,
    optimization_factories,
)
from kd_experiments.callbacks import epoch_history
from kd_experiments.detection.features import DETECTION_FEATURE_KINDS, probe_pass, teacher_pass
from kd_experiments.detection.models import create_detector, is_detector_arch
from kd_experiments.detection.module import MAP_KEYS, DetectionModule
from kd_experiments.detection.statistics import prepare_detection_statistics
from kd_experiments.errors import UserError
from kd_experiments.files import require_writable
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.methods.detection import DetectionObjective, DetectorLosses
from kd_experiments.reporting import print_table_and_footer
from kd_experiments.teachers import build_teacher, teacher_weight_source

log = logging.getLogger(__name__)


def is_detection(cfg: DictConfig) -> bool:
    return cfg.dataset.get("task", "classification") == "detection"


def create_network(role: str, model_cfg: DictConfig) -> torch.nn.Module:
    """The `teacher` / `student` detector of `model_cfg` (`arch`, `num_classes`, `model_kwargs`)."""
    if not is_detector_arch(model_cfg.arch):
        raise UserError(
            f"{role}={model_cfg.arch} is a classifier but dataset.task is detection; pick a detector, e.g. "
            f"{role}=fasterrcnn_resnet50_fpn"
        )
    given = model_cfg.get("model_kwargs")
    kwargs = OmegaConf.to_container(given, resolve=True) if given else {}
    try:
        return create_detector(model_cfg.arch, num_classes=model_cfg.num_classes, **kwargs)
    except UserError as error:
        raise UserError(f"{role}: {error}") from None
    except TypeError as error:
        raise UserError(f"{role}.model_kwargs: {error}") from None


def check_config(cfg: DictConfig) -> None:
    """What a detection run cannot do, refused before anything is built."""
    if cfg.get("report", "last") not in ("last", "best") or cfg.get("ema_decay") is not None:
        raise UserError(
            "a detection run reports its last or best epoch's mAP; set report=last (or best) and "
            "ema_decay=null"
        )
    report_map(cfg)
    if cfg.teacher.get("output_cache"):
        raise UserError(
            "teacher.output_cache applies to classification: a detection teacher reads the student's RoIs, "
            "which change every step; set teacher.output_cache=false"
        )
    if cfg.student.get("pretrained") or cfg.teacher.get("pretrained"):
        raise UserError(
            "a detector's ImageNet backbone comes from model_kwargs.backbone_weights (e.g. IMAGENET1K_V1), "
            "not a timm pretrained tag; set student.pretrained=null and teacher.pretrained=null"
        )
    if cfg.get("channels_last") or cfg.compile.get("student") or cfg.compile.get("teacher"):
        raise UserError("channels_last and compile apply to classification runs; turn them off for detection")


def report_map(cfg: DictConfig) -> str:
    """Which mAP a detection run reports as `student_map_reported` (and compares with `paper.<it>`)."""
    metric = cfg.get("report_map", "map")
    if metric not in MAP_KEYS:
        raise UserError(f"report_map={metric!r} is not one of {', '.join(MAP_KEYS)}")
    return metric


def monitor(cfg: DictConfig) -> str:
    """What the best checkpoint maximises: the reported mAP's validation log."""
    return f"val/student_{report_map(cfg)}"


def data_phase(cfg: DictConfig):
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.dataset, "dataset")
    datamodule.augmentation_seed = cfg.seed
    datamodule.prepare_data()
    datamodule.setup("fit")
    for role in ("teacher", "student"):
        if cfg[role].num_classes != datamodule.num_classes:
            raise UserError(
                f"{role}.num_classes={cfg[role].num_classes} but dataset {datamodule.name} has "
                f"{datamodule.num_classes} object classes; set {role}.num_classes={datamodule.num_classes}"
            )
    return datamodule


def probe_batch(datamodule, count: int = 2) -> tuple[list, list]:
    images, targets = zip(*(datamodule.train_set[index] for index in range(count)), strict=True)
    return list(images), list(targets)


def setup_method(method: Objectives, student, teacher, datamodule) -> None:
    """Probe both detectors with two training images (the student's norms in eval mode, so no statistics
    move): each objective checks and sizes itself on the features, then runs once."""
    unknown = (method.student_features | method.teacher_features) - DETECTION_FEATURE_KINDS
    if unknown:
        raise UserError(
            f"method {sorted(method.terms)} reads {sorted(unknown)}, which a detector does not give; a "
            f"detection method reads {', '.join(sorted(DETECTION_FEATURE_KINDS))} (methods/detection.py)"
        )
    images, targets = probe_batch(datamodule)
    student_probe = probe_pass(student, images, targets, method.student_features)
    teacher.eval()
    with torch.no_grad():
        teacher_probe = teacher_pass(
            teacher, student, student_probe.images, student_probe.rois, method.teacher_features
        )
    for name, objective in method.objectives.items():
        with objective_errors(name):
            objective.setup(student_probe.output, teacher_probe)
    method.eval()
    for name, objective in method.objectives.items():
        with objective_errors(name), torch.no_grad():
            objective(student_probe.output, teacher_probe, targets)
    method.train()


def train_detector(model: torch.nn.Module, datamodule, recipe: DictConfig, seed: int) -> float:
    """Train a teacher detector with its own losses (`teacher.recipe`: optimizer, scheduler, epochs) and
    return its validation mAP@[.5:.95] (%); what `teachers.build_teacher` calls to train one on the fly."""
    pl.seed_everything(seed, workers=True, verbose=False)
    method = Objectives({"detection": DetectorLosses()})
    module = DetectionModule(
        student=model,
        method=method,
        loss_weights=LossWeights({"detection": 1.0}),
        optimizer=instantiate(recipe.optimizer),
        scheduler=instantiate(recipe.scheduler) if recipe.get("scheduler") else None,
        scheduler_interval=recipe.get("scheduler_interval", "epoch"),
        num_classes=datamodule.num_classes,
    )
    fit_teacher(module, datamodule, recipe, seed)
    return module.validation_history[-1]["map"]


# How `teachers.build_teacher` names this trainer's objective and score in its log lines.
train_detector.objective_name = "its detection losses"
train_detector.score_name = "mAP"


def build_parts(cfg: DictConfig, datamodule):
    """Both detectors and the method, probed on one batch; the teacher's weights; the module."""
    teacher_weight_source(cfg.teacher)  # a config naming no weights stops here, before any work
    pl.seed_everything(cfg.teacher.seed, workers=True, verbose=False)
    teacher_network = create_network("teacher", cfg.teacher)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    student = create_network("student", cfg.student)
    method, loss_weights = build_method(cfg.method)
    setup_method(method, student, teacher_network, datamodule)
    initial_student_weights(cfg.student, student)
    freeze_student(cfg.student, student)
    optimizer, scheduler, interval = optimization_factories(cfg)
    if teacher_weight_source(cfg.teacher) == "train":
        require_writable(Path(cfg.paths.teacher_cache_dir), "paths.teacher_cache_dir")
    with isolate_rng():
        teacher = build_teacher(
            cfg.teacher, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir, teacher_network, train_detector
        )
    teacher.network.eval()
    for objective in method.objectives.values():
        if isinstance(objective, DetectionObjective):
            objective.bind_teacher(teacher.network)
    prepare_detection_statistics(method, teacher, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir)
    return DetectionModule(
        student=student,
        method=method,
        loss_weights=loss_weights,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval=interval,
        num_classes=datamodule.num_classes,
        teacher=teacher,
    )


def summary_fields(cfg: DictConfig, module: DetectionModule, trainer: pl.Trainer, callbacks, paper) -> dict:
    """What a finished detection fit adds to summary.json: the student's and the teacher's mAPs (percent),
    the run's own numbers and the per-epoch history."""
    history = module.validation_history
    last = history[-1] if history else {}
    metric = report_map(cfg)
    best = max(history, key=lambda entry: entry[metric]) if history else {}  # the best epoch by it
    teacher_map = module.teacher_map or {}
    fields = {f"student_{key}": last.get(key) for key in MAP_KEYS}
    fields |= {f"student_{key}_best": best.get(key) for key in MAP_KEYS}
    fields |= {f"teacher_{key}": teacher_map.get(key) for key in MAP_KEYS}
    reported = fields[f"student_{metric}_best" if cfg.get("report") == "best" else f"student_{metric}"]
    paper_value = (paper or {}).get(metric)
    if paper_value is not None and reported is not None and (paper or {}).get("dataset") == cfg.dataset.name:
        fields["gap_to_paper"] = round(reported - paper_value, 2)
    throughput = callbacks.throughput.images_per_s
    last_checkpoint, best_checkpoint = (callbacks.checkpoint(m) for m in (None, monitor(cfg)))
    identity = module.teacher_identity
    return fields | {
        "task": "detection",
        "report": cfg.get("report", "last"),
        "report_map": metric,
        "student_map_reported": reported,
        "student": cfg.student.arch,
        "teacher": cfg.teacher.arch,
        "teacher_source": identity.get("source"),
        "teacher_sha256": identity.get("sha256"),
        "teacher_trained_map": identity.get("trained_top1"),
        "val_images": module.val_images,
        "world_size": trainer.world_size,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_images_per_s": round(throughput, 1) if throughput else None,
        "best_checkpoint": (best_checkpoint.best_model_path or None) if best_checkpoint else None,
        "last_checkpoint": (last_checkpoint.best_model_path or None) if last_checkpoint else None,
        "history": epoch_history(callbacks.epochs.records, history),
    }


def print_result_table(summary: dict) -> None:
    """The table a detection run ends with: mAP@[.5:.95], mAP@.5 and VOC07 mAP@.5 of teacher and student."""
    table = Table(title=f"{summary['method']} on {summary['dataset']} (seed {summary['seed']})")
    table.add_column("model")
    for header in ("mAP@[.5:.95]", "mAP@.5", "VOC07 mAP@.5"):
        table.add_column(header, justify="right")
    rows = [
        (f"teacher {summary['teacher']} ({summary.get('teacher_source')})", "teacher_{}"),
        (f"student {summary['student']}, last epoch", "student_{}"),
        (f"student {summary['student']}, best epoch", "student_{}_best"),
    ]
    for label, pattern in rows:
        values = [summary.get(pattern.format(key)) for key in MAP_KEYS]
        table.add_row(label, *("-" if v is None else f"{v:.2f}" for v in values))
    paper = summary.get("paper") or {}
    metric = summary.get("report_map", "map")
    if paper.get(metric) is not None:
        gap = summary.get("gap_to_paper")
        where = (
            f"{gap:+.2f} points from it" if gap is not None else f"not comparable: on {paper.get('dataset')}"
        )
        cells = ["-"] * len(MAP_KEYS)
        cells[MAP_KEYS.index(metric)] = f"{paper[metric]:.2f}"
        table.add_row(f"paper ({paper.get('source', 'published')}); this run is {where}", *cells)
    print_table_and_footer(table, summary)
