"""One run of the framework, as named phases: data, student + objective, teacher, module, trainer, fit,
report. Where a run starts (new, continued, refused) is `resume.py`'s; what it reports is `reporting.py`'s;
how each part is built from the config is `assembly.py`'s; the teacher is `teachers.py`'s."""

import logging
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.seed import isolate_rng

from kd_experiments.assembly import (
    build,
    build_method,
    check_class_counts,
    freeze_student,
    init_classifier,
    initial_student_weights,
    optimization_factories,
    setup_method,
    train_teacher_with_ce,
)
from kd_experiments.callbacks import (
    EpochRecord,
    TrainThroughput,
    ValidateFinalEpoch,
    epoch_history,
    last_epoch_checkpoint,
    progress_bar,
)
from kd_experiments.data.base import ClassificationData
from kd_experiments.data.sampling import STATISTICS_SEED
from kd_experiments.detection import run as detection_run
from kd_experiments.distributed import end_previous_job  # importing it fixes Lightning's DDP child command
from kd_experiments.errors import UserError
from kd_experiments.fast_path import FastPath
from kd_experiments.files import atomic_write_json, atomic_write_text, require_writable
from kd_experiments.loggers import finish_logger
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.models import built_name
from kd_experiments.models.features import has_distill_head
from kd_experiments.module import DistillationModule
from kd_experiments.multilabel import module as multilabel
from kd_experiments.multilabel.module import MultiLabelModule
from kd_experiments.output_cache import TeacherOutputCache, cache_folder, check_cacheable, check_storage_dtype
from kd_experiments.reporting import ReportProtocol, print_result_table
from kd_experiments.resume import (
    AtomicCheckpointIO,
    Interrupted,
    Preemption,
    RandomState,
    RunStart,
    start_in,
)
from kd_experiments.sweep import objective_value
from kd_experiments.teachers import (
    Teacher,
    build_teacher,
    check_teacher_reference,
    create_network,
    prepare_teacher_statistics,
    teacher_input,
    teacher_weight_source,
)

log = logging.getLogger(__name__)

# In-memory data sets need no loader workers; Lightning's advice to add some is noise here.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# A continued run writes into its own checkpoints/ again; a new run's folder is always new (resume.py).
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def train(cfg: DictConfig) -> float | None:
    """Run one experiment (or continue it in its directory); return the best student top-1 (what a sweeper
    optimises)."""
    started = time.perf_counter()
    output_dir = _output_dir(cfg)
    summary_path = output_dir / "summary.json"
    start = start_in(cfg, output_dir, summary_path)  # refusals come here, before any file is written
    if start.finished is not None:
        return _already_finished(start.finished, cfg)
    cfg = start.cfg
    require_writable(output_dir, "hydra.run.dir")
    _save_run_config(cfg, output_dir, continuing=start.continuing)
    summary = _first_summary(cfg, output_dir, start)
    try:
        summary |= _phases(cfg, output_dir, start, summary.get("paper"))
        summary["status"] = "completed"
    except Interrupted as error:
        summary |= {"status": "interrupted", "error": str(error)}
        raise
    except BaseException as error:
        summary |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes
            atomic_write_json(summary, summary_path)
    if rank_zero_only.rank == 0:
        printers = {
            "detection": detection_run.print_result_table,
            "multilabel": multilabel.print_result_table,
        }
        printers.get(summary.get("task"), print_result_table)(summary)
    return objective_value(summary, cfg)  # summary[cfg.optimized_metric], what a sweeper optimises


def _phases(cfg: DictConfig, output_dir: Path, start: RunStart, paper: dict | None) -> dict:
    """The run's phases in order, cheap checks first: a config mistake stops the run in seconds, before a
    teacher is trained or downloaded and before any statistics pass."""
    _check_run_numbers(cfg)
    _check_method_task(cfg)
    if detection_run.is_detection(cfg):
        return _detection_phases(cfg, output_dir, start, paper)
    if _is_multilabel(cfg):
        _check_multilabel(cfg)
    FastPath.from_config(cfg)  # a bad channels_last / compile value stops the run before any work
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    protocol = ReportProtocol.from_config(cfg)
    datamodule = data_phase(cfg)
    parts = student_and_objective_phase(cfg, datamodule)
    teacher, teacher_top1 = teacher_phase(cfg, datamodule, parts)
    module = module_phase(cfg, datamodule, parts, teacher, teacher_top1)
    monitor = "val/student_map" if _is_multilabel(cfg) else "val/student_top1"
    callbacks = RunCallbacks(cfg, output_dir, protocol, monitor=monitor)
    trainer = trainer_phase(cfg, output_dir, start.saved, callbacks)
    try:
        fit_phase(cfg, trainer, module, datamodule, start.checkpoint, callbacks.preemption)
        fields = report_phase(cfg, protocol, module, trainer, callbacks, paper)
    except BaseException as error:  # the W&B run ends failed; interrupted, with the process's exit code
        interrupted = isinstance(error, Interrupted)
        error_text = f"{type(error).__name__}: {error}"
        end = {"status": "interrupted" if interrupted else "failed", "error": error_text}
        finish_logger(trainer.logger, end, exit_code=128 + error.signum if interrupted else 1)
        raise
    # The W&B run ends after the report: its summary gets the final numbers summary.json gets.
    finish_logger(trainer.logger, {"status": "completed", "paper_top1": (paper or {}).get("top1")} | fields)
    return fields


def _detection_phases(cfg: DictConfig, output_dir: Path, start: RunStart, paper: dict | None) -> dict:
    """A detection run (`dataset.task: detection`): its own data, networks and module
    (`detection/run.py`), the same trainer, fit and logger handling as a classification run."""
    detection_run.check_config(cfg)
    end_previous_job()
    datamodule = detection_run.data_phase(cfg)
    module = detection_run.build_parts(cfg, datamodule)
    callbacks = RunCallbacks(cfg, output_dir, ReportProtocol(), monitor=detection_run.monitor(cfg))
    trainer = trainer_phase(cfg, output_dir, start.saved, callbacks)
    try:
        fit_phase(cfg, trainer, module, datamodule, start.checkpoint, callbacks.preemption)
        fields = detection_run.summary_fields(cfg, module, trainer, callbacks, paper)
    except BaseException as error:
        interrupted = isinstance(error, Interrupted)
        end = {
            "status": "interrupted" if interrupted else "failed",
            "error": f"{type(error).__name__}: {error}",
        }
        finish_logger(trainer.logger, end, exit_code=128 + error.signum if interrupted else 1)
        raise
    numbers = {key: value for key, value in fields.items() if key.endswith(("map", "map50", "map_reported"))}
    finish_logger(
        trainer.logger, {"status": "completed", "paper_map50": (paper or {}).get("map50")} | numbers
    )
    return fields


def _check_method_task(cfg: DictConfig) -> None:
    """A method is written for one task (its YAML's `task`, classification when absent): a detection or
    multi-label method on other data, or a classification method on them, is one line before any work."""
    method_task = cfg.method.get("task", "classification")
    data_task = cfg.dataset.get("task", "classification")
    if method_task != data_task:
        raise UserError(
            f"method {cfg.method.name} is a {method_task} method but dataset {cfg.dataset.name} is "
            f"{data_task} data; pick a {data_task} method (conf/method/*.yaml with task: {data_task})"
        )


def _is_multilabel(cfg: DictConfig) -> bool:
    return cfg.dataset.get("task", "classification") == "multilabel"


def _check_multilabel(cfg: DictConfig) -> None:
    """What a multi-label run cannot do, refused before anything is built."""
    if cfg.get("report", "last") not in ("last", "best") or cfg.get("ema_decay") is not None:
        raise UserError(
            "a multi-label run reports its last or best epoch's mAP; set report=last (or best) and "
            "ema_decay=null"
        )
    if cfg.teacher.get("reference_top1") is not None:
        raise UserError(
            "teacher.reference_top1 is a top-1; a multi-label teacher is scored by its mAP: set it null"
        )
    if "ce" in (cfg.method.get("weights") or {}):
        raise UserError(
            f"method {cfg.method.name} trains with ce, the single-label cross-entropy; a multi-label run "
            "trains with bce: use method=multilabel_bce or multilabel_lshl2 (or weight a bce term)"
        )


def data_phase(cfg: DictConfig) -> ClassificationData:
    """Seed the run, then build the data and check its class count against both networks' configs. The
    data is prepared (downloaded) here, before any Trainer exists, on every rank that runs this: a data module
    downloads one process at a time (CIFARData: a file lock in its root), so ranks started together do not."""
    end_previous_job()  # a sweep's earlier job in this process may have left a DDP process group
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: ClassificationData = build(cfg.dataset, "dataset")
    datamodule.augmentation_seed = cfg.seed  # the training order and each sample's augmentation
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_class_counts(cfg, datamodule)
    return datamodule


@dataclass
class RunParts:
    """What the student + objective phase builds: the student (adapted by the method), the method and its
    loss weights, the optimizer and scheduler factories, and the teacher's architecture (random weights
    yet: it was only probed for shapes)."""

    student: torch.nn.Module
    method: Objectives
    loss_weights: LossWeights
    optimization: tuple
    teacher_network: torch.nn.Module


def student_and_objective_phase(cfg: DictConfig, datamodule: ClassificationData) -> RunParts:
    """Both networks and the method, set up and dry-run on one batch; the optimizer and scheduler checked."""
    teacher_weight_source(cfg.teacher)
    pl.seed_everything(cfg.teacher.seed, workers=True, verbose=False)  # a trained teacher's init
    teacher_network = create_network("teacher", cfg.teacher, datamodule.image_size)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # student.pretrained: a timm tag (ImageNet-initialised students, e.g. LSHFM's multi-label ones)
    student = create_network(
        "student", cfg.student, datamodule.image_size, cfg.student.get("pretrained") or False
    )
    init_classifier(student, cfg.student.get("classifier_init"))
    method, loss_weights = build_method(cfg.method)
    normalisation = teacher_input(cfg.teacher, datamodule)
    student = setup_method(method, student, teacher_network, datamodule, normalisation)
    initial_student_weights(cfg.student, student)
    freeze_student(cfg.student, student)
    return RunParts(student, method, loss_weights, optimization_factories(cfg), teacher_network)


def teacher_phase(
    cfg: DictConfig, datamodule: ClassificationData, parts: RunParts
) -> tuple[Teacher, float | None]:
    """The teacher's weights (checkpoint, timm, or CE-trained and cached), its reference check and the
    statistics the method needs, in their own RNG scope: whether the teacher is trained or read from the
    cache, and statistics computed or read, the student trains on the same random stream."""
    uses_cache = teacher_weight_source(cfg.teacher) == "train" or any(
        objective.statistics_name for objective in parts.method.objectives.values()
    )
    output_dtype = None  # the teacher-output cache's storage dtype, when it is on
    if cfg.teacher.get("output_cache") and parts.method.teacher_features:
        check_cacheable(parts.method.teacher_features, cfg.method.name)
        output_dtype = cfg.teacher.get("output_cache_dtype", "float16")
        check_storage_dtype(output_dtype)
        uses_cache = True
    if uses_cache:  # known now, not after a teacher has trained for minutes
        require_writable(Path(cfg.paths.teacher_cache_dir), "paths.teacher_cache_dir")
    cache_dir = cfg.paths.teacher_cache_dir
    with isolate_rng():
        teacher = build_teacher(
            cfg.teacher, cfg.dataset, datamodule, cache_dir, parts.teacher_network, train_teacher_with_ce
        )
        validation_cache = None
        if output_dtype is not None:  # the validation pass is not augmented: one entry serves every seed
            features = frozenset({"logits"})
            folder = cache_folder(
                cache_dir, teacher.cache_key, teacher.network, cfg.dataset, features,
                seed=STATISTICS_SEED, precision="32-true", dtype=output_dtype,
            )  # fmt: skip
            validation_cache = TeacherOutputCache(folder, features, output_dtype)
        # global rank 0 only
        reference_top1 = check_teacher_reference(teacher, cfg.teacher, datamodule, validation_cache)
        prepare_teacher_statistics(parts.method, teacher, cfg.dataset, datamodule, cache_dir, output_dtype)
    return teacher, reference_top1


def module_phase(cfg, datamodule, parts: RunParts, teacher: Teacher, teacher_top1) -> DistillationModule:
    optimizer, scheduler, scheduler_interval = parts.optimization
    fast_path = FastPath.from_config(cfg)  # channels_last and compile (fast_path.py)
    fast_path.check_data(datamodule.train_set[0][0], datamodule.name)
    module_class, extra = DistillationModule, {}
    if _is_multilabel(cfg):  # the same module scored by its mAP (multilabel/module.py)
        module_class, extra = MultiLabelModule, {"ap_interpolation": datamodule.ap_interpolation}
    module = module_class(
        student=parts.student,
        method=parts.method,
        loss_weights=parts.loss_weights,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval,
        num_classes=datamodule.num_classes,
        teacher=teacher,
        clip_scaled_gradients=bool(cfg.get("clip_scaled_gradients", False)),
        output_cache=_output_cache(cfg, parts, teacher),
        fast_path=fast_path,
        **extra,
    )
    # Measured already (the reference check, on global rank 0; the module broadcasts it when fit starts): the
    # first validation reuses it.
    module.teacher_top1 = teacher_top1
    return module


def _output_cache(cfg: DictConfig, parts: RunParts, teacher: Teacher) -> TeacherOutputCache | None:
    """The teacher-output cache of this run (`teacher.output_cache=true`), when the method reads a teacher."""
    features = parts.method.teacher_features
    if not cfg.teacher.get("output_cache") or not features:
        return None
    dtype = cfg.teacher.get("output_cache_dtype", "float16")
    folder = cache_folder(
        cfg.paths.teacher_cache_dir,
        teacher.cache_key,
        teacher.network,
        cfg.dataset,
        features,
        seed=cfg.seed,
        precision=cfg.trainer.get("precision", "32-true"),
        dtype=dtype,
    )
    return TeacherOutputCache(folder, features, dtype)


class RunCallbacks:
    """The callbacks of one run, and the ones whose results the summary reads."""

    def __init__(
        self, cfg: DictConfig, output_dir: Path, protocol: ReportProtocol, monitor: str = "val/student_top1"
    ):  # monitor: what the best checkpoint maximises
        self.throughput = TrainThroughput()
        self.epochs = EpochRecord(self.throughput)
        self.preemption = Preemption(output_dir)
        self.all = [self.throughput, self.epochs, ValidateFinalEpoch(), RandomState(), self.preemption]
        self.all += _standard_callbacks(cfg, output_dir, monitor) + protocol.callbacks(output_dir)
        for name, node in (cfg.get("callbacks") or {}).items():  # the user's own, by name
            self.all.append(build(node, f"callbacks.{name}"))

    def add_logger_callbacks(self, has_logger: bool) -> None:
        if has_logger:
            self.all.append(LearningRateMonitor())  # at each scheduler's own interval

    def checkpoint(self, monitor: str | None) -> ModelCheckpoint | None:
        return next((c for c in self.all if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None)


def trainer_phase(cfg: DictConfig, output_dir: Path, saved: dict | None, callbacks: "RunCallbacks"):
    """The Lightning Trainer with this run's logger (continuing the saved W&B run when resuming)."""
    run_id = saved["logger_run_id"] if saved is not None else None
    names = _logger_names(cfg, output_dir, run_id) if cfg.logger else {}
    logger = build(cfg.logger, "logger", **names) if cfg.logger else False
    callbacks.add_logger_callbacks(bool(logger))
    try:
        return build(
            cfg.trainer, "trainer", callbacks=callbacks.all, logger=logger, plugins=[AtomicCheckpointIO()]
        )
    except BaseException as error:  # the W&B run started already: end it, failed
        finish_logger(logger, {"status": "failed", "error": f"{type(error).__name__}: {error}"}, exit_code=1)
        raise


def fit_phase(cfg, trainer: pl.Trainer, module, datamodule, checkpoint, preemption: Preemption) -> None:
    """`trainer.fit`, from `checkpoint` when continuing; a SIGTERM / SIGUSR1 becomes `Interrupted`. The
    logger's run stays open for the report (`_phases` finishes it)."""
    logger = trainer.logger
    try:
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        with preemption.signals(trainer):
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
            finally:  # an epoch of teacher outputs that did not end (an error, a signal) is not published
                if module.output_cache is not None:
                    module.output_cache.discard()
    except SIGTERMException:
        signum = preemption.signum or signal.SIGTERM
        saved = f"that step is saved in {preemption.saved}; " if preemption.saved else ""
        raise Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; {saved}continue from the start of that epoch with: python -m "
            f"kd_experiments resume={cfg.paths.output_dir}",
        ) from None


def report_phase(cfg, protocol: ReportProtocol, module, trainer, callbacks: RunCallbacks, paper) -> dict:
    """What a finished fit adds to summary.json: the reporting protocol's numbers, then the run's own."""
    student, teacher = module.student, module.teacher
    identity = module.teacher_identity
    throughput = callbacks.throughput.images_per_s
    monitor = "val/student_map" if _is_multilabel(cfg) else "val/student_top1"
    last_checkpoint, best_checkpoint = (callbacks.checkpoint(m) for m in (None, monitor))
    if _is_multilabel(cfg):
        history, report = module.validation_history, cfg.get("report", "last")
        scores = multilabel.summary_fields(report, history, module.teacher_map, paper, cfg.dataset.name)
    else:
        scores = protocol.summary_fields(module.validation_history, paper, cfg.dataset.name)
        scores["teacher_top1"] = module.teacher_top1
    return scores | {
        "two_head_inference": has_distill_head(student),
        # The networks as built (a ViT fitted to small images says so); `*_arch` is the configured name.
        "student": built_name(cfg.student.arch, student),
        "teacher": built_name(cfg.teacher.arch, teacher),
        "student_arch": cfg.student.arch,
        "teacher_arch": cfg.teacher.arch,
        "val_images": module.val_images,  # scored by the last validation, all ranks together: each image once
        "world_size": trainer.world_size,  # processes that trained (DDP ranks)
        "teacher_reference_top1": cfg.teacher.get("reference_top1"),
        "teacher_source": identity.get("source"),
        "teacher_sha256": identity.get("sha256"),  # of the weights' content
        "teacher_file_sha256": identity.get("file_sha256"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_images_per_s": round(throughput, 1) if throughput else None,
        # Whether the teacher ran or its outputs were read (teacher.output_cache), in training batches.
        "teacher_outputs": _teacher_outputs_summary(module),
        "best_checkpoint": (best_checkpoint.best_model_path or None) if best_checkpoint else None,
        "last_checkpoint": (last_checkpoint.best_model_path or None) if last_checkpoint else None,
        "history": epoch_history(callbacks.epochs.records, module.validation_history),
    }


def _teacher_outputs_summary(module: DistillationModule) -> dict | None:
    if not module.method.teacher_features:
        return None
    counts = {f"{how}_batches": count for how, count in module.teacher_batches.items()}
    cache = module.output_cache
    return {"cache": cache.summary() if cache is not None else None, **counts}


def _output_dir(cfg: DictConfig) -> Path:
    """The run's directory: Hydra's run dir, or outside the CLI the run given by `resume=`."""
    if cfg.get("resume") and not HydraConfig.initialized():
        return Path(cfg.resume).expanduser().resolve()
    return Path(cfg.paths.output_dir).resolve()


def _first_summary(cfg: DictConfig, output_dir: Path, start: RunStart) -> dict:
    summary = {
        "status": "running",
        "method": cfg.method.name,
        "teacher": cfg.teacher.arch,
        "student": cfg.student.arch,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "torch_threads": torch.get_num_threads(),  # a parallel sweep splits the cores between jobs
        "overrides": _task_overrides(),
        "output_dir": str(output_dir),
    }
    if cfg.get("paper"):  # a recipe's published number, copied next to this run's result
        summary["paper"] = OmegaConf.to_container(cfg.paper, resolve=True)
    resumes = list(start.previous.get("resumes", []))
    if start.saved is not None:  # this attempt continues from the end of a saved epoch
        info = start.saved
        resumes.append({"from_epoch": info["epoch"] + 1, "from_step": info["step"]})
    if resumes:
        summary["resumes"] = resumes
    return summary


def _already_finished(previous: dict, cfg: DictConfig) -> float | None:
    """The identical command in a finished run's directory (a requeued or re-run sweep): nothing to do."""
    print(
        f"{previous.get('output_dir')} already finished this run (status completed); nothing to do",
        file=sys.stderr,
    )
    return objective_value(previous, cfg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_run_numbers(cfg: DictConfig) -> None:
    """The run's own integers, checked before anything is built (they would fail deep in numpy/Lightning)."""
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise UserError(f"seed must be an integer from 0 to 2**32 - 1, got {cfg.seed!r}")
    for key, smallest in (("max_epochs", -1), ("max_steps", -1), ("check_val_every_n_epoch", 1)):
        value = cfg.trainer.get(key)
        if value is not None and (not _is_int(value) or value < smallest):
            raise UserError(f"trainer.{key} must be an integer >= {smallest}, got {value!r}")


def _save_run_config(cfg: DictConfig, output_dir: Path, continuing: bool) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as Hydra writes them, but only once the run is
    known to be new: conf/hydra/default.yaml turns Hydra's own copy off (`output_subdir: null`), which it
    would write before the task starts, over a finished run's files too. A continued run keeps its first
    command's files; only config.yaml follows a longer `trainer.max_epochs` given with resume=."""
    if rank_zero_only.rank != 0:
        return
    folder = output_dir / ".hydra"
    if continuing:
        if cfg.get("resume"):
            atomic_write_text(OmegaConf.to_yaml(cfg), folder / "config.yaml")
        return
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    atomic_write_text(OmegaConf.to_yaml(cfg), folder / "config.yaml")
    atomic_write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})), folder / "hydra.yaml")
    atomic_write_text(OmegaConf.to_yaml(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")


def _standard_callbacks(
    cfg: DictConfig, output_dir: Path, monitor: str = "val/student_top1"
) -> list[pl.Callback]:
    trainer_cfg = cfg.trainer
    callbacks: list[pl.Callback] = []
    if trainer_cfg.get("enable_checkpointing", True):
        # The best checkpoint first: when both save at the end of a training epoch, last.ckpt then holds
        # the best one's state of that epoch, which a resumed run continues from.
        if trainer_cfg.get("limit_val_batches", 1.0) != 0:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=output_dir / "checkpoints",
                    filename="best-epoch{epoch:03d}",
                    auto_insert_metric_name=False,
                    monitor=monitor,
                    mode="max",
                    save_top_k=1,
                )
            )
        callbacks.append(last_epoch_checkpoint(output_dir / "checkpoints"))
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    return callbacks


def _logger_names(cfg: DictConfig, output_dir: Path, run_id: str | None = None) -> dict:
    """W&B name, group, job type and tags where the config leaves them null: the run directory's name; the
    sweep (a multirun), else the recipe (`experiment=`), else no group; the method; the config's tags plus
    method / dataset / teacher / student (/ recipe) tags. A resumed run continues its W&B run (`run_id`) in
    the group of its first command (the run's saved .hydra/hydra.yaml)."""
    logger_cfg = cfg.logger
    if "wandb_logger" not in str(logger_cfg.get("_target_", "")):
        return {}
    names = {"run_id": run_id} if run_id else {}
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    saved = output_dir / ".hydra/hydra.yaml"  # written before this for a new run; the first one's if resumed
    first = OmegaConf.load(saved).get("hydra") if saved.is_file() else hydra_cfg
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    first_multirun = multirun or str(OmegaConf.select(first, "mode") if first else None).endswith("MULTIRUN")
    recipe = OmegaConf.select(first, "runtime.choices.experiment") if first else None
    if logger_cfg.get("group") is None and (first_multirun or recipe):
        sweep = Path(hydra_cfg.sweep.dir).name if multirun else output_dir.parent.name
        names["group"] = sweep if first_multirun else recipe
    if logger_cfg.get("name") is None:
        names["name"] = output_dir.name  # a sweep job's folder already names its swept values
    if logger_cfg.get("job_type") is None:
        names["job_type"] = cfg.method.name
    parts = {"method": cfg.method.name, "dataset": cfg.dataset.name, "recipe": recipe}
    parts |= {"teacher": cfg.teacher.arch, "student": cfg.student.arch}
    automatic = [f"{key}:{value}" for key, value in parts.items() if value]
    tags = [str(tag)[:64] for tag in [*(logger_cfg.get("tags") or []), *automatic]]  # W&B's longest
    names["tags"] = list(dict.fromkeys(tags))
    return names


def _task_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)
