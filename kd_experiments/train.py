"""compose -> instantiate -> fit -> summary.json: one run of the framework."""

import logging
import signal
import sys
import time
import warnings
from contextlib import contextmanager
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
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.seed import isolate_rng
from rich.console import Console
from rich.table import Table

from kd_experiments.callbacks import (
    StudentEMA,
    TrainThroughput,
    ValidateFinalEpoch,
    WeightAveraging,
    last_epoch_checkpoint,
    progress_bar,
)
from kd_experiments.data.base import ClassificationData, Renormalize
from kd_experiments.errors import UserError
from kd_experiments.files import atomic_write_json, atomic_write_text, require_writable
from kd_experiments.loggers import finish_logger
from kd_experiments.methods.compose import LossWeights, Objectives, assemble
from kd_experiments.models import built_name, extract_features
from kd_experiments.models.features import has_distill_head
from kd_experiments.module import DistillationModule
from kd_experiments.resume import (
    AtomicCheckpointIO,
    Interrupted,
    Preemption,
    RandomState,
    RunStart,
    checkpoint_info,
    start_in,
)
from kd_experiments.teachers import (
    build_teacher,
    check_teacher_reference,
    create_network,
    prepare_teacher_statistics,
    teacher_weight_source,
)

log = logging.getLogger(__name__)

REPORT_PROTOCOLS = ("last", "best", "weight_average", "ema")

# In-memory data sets need no loader workers; Lightning's advice to add some is noise here.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def train(cfg: DictConfig) -> float | None:
    """Run one experiment (or continue it in its directory); return the best student top-1 (what a sweeper
    optimises)."""
    started = time.perf_counter()
    output_dir = _output_dir(cfg)
    summary_path = output_dir / "summary.json"
    start = start_in(cfg, output_dir, summary_path)  # refusals come here, before any file is written
    if start.finished is not None:
        return _already_finished(start.finished)
    cfg = start.cfg
    require_writable(output_dir, "hydra.run.dir")
    _save_run_config(cfg, output_dir, continuing=start.continuing)
    summary = _first_summary(cfg, output_dir, start)
    try:
        summary |= _fit(cfg, output_dir, start.checkpoint)
        summary["status"] = "completed"
        paper_top1 = (summary.get("paper") or {}).get("top1")
        if paper_top1 is not None and summary["student_top1_reported"] is not None:
            summary["gap_to_paper"] = round(summary["student_top1_reported"] - paper_top1, 2)
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
        _print_result_table(summary)
    return summary["student_top1_best"]


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
        "overrides": _task_overrides(),
        "output_dir": str(output_dir),
    }
    if cfg.get("paper"):  # a recipe's published number, copied next to this run's result
        summary["paper"] = OmegaConf.to_container(cfg.paper, resolve=True)
    resumes = list(start.previous.get("resumes", []))
    if start.checkpoint is not None:  # this attempt continues from the end of a saved epoch
        info = checkpoint_info(start.checkpoint)
        resumes.append({"from_epoch": info["epoch"] + 1, "from_step": info["step"]})
    if resumes:
        summary["resumes"] = resumes
    return summary


def _already_finished(previous: dict) -> float | None:
    """The identical command in a finished run's directory (a requeued or re-run sweep): nothing to do."""
    print(
        f"{previous.get('output_dir')} already finished this run (status completed); nothing to do",
        file=sys.stderr,
    )
    return previous.get("student_top1_best")


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


def _fit(cfg: DictConfig, output_dir: Path, checkpoint: Path | None) -> dict:
    _check_run_numbers(cfg)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    datamodule = _seeded_data(cfg)
    # Cheap first: both networks and the method, probed with one batch, so that a shape or feature mistake
    # stops the run in seconds, before a teacher is trained or downloaded and before any statistics pass.
    teacher_network, student, method, loss_weights, teacher_input = _networks_and_method(cfg, datamodule)
    uses_cache = teacher_weight_source(cfg.teacher) == "train" or any(
        objective.statistics_name for objective in method.objectives.values()
    )
    if uses_cache:  # known now, not after a teacher has trained for minutes
        require_writable(Path(cfg.paths.teacher_cache_dir), "paths.teacher_cache_dir")
    optimizer, scheduler, scheduler_interval = _optimization_factories(cfg)
    report, ema_decay = _report_protocol(cfg)

    # The expensive part, in its own RNG scope: whether the teacher is trained, read from the cache or
    # downloaded, and whether statistics are computed or read, the student trains on the same random stream.
    with isolate_rng():
        teacher, teacher_identity = build_teacher(
            cfg.teacher, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir, teacher_network
        )
        teacher_reference_top1 = check_teacher_reference(teacher, cfg.teacher, datamodule, teacher_input)
        prepare_teacher_statistics(
            method, teacher, teacher_identity, cfg.dataset, datamodule, cfg.paths.teacher_cache_dir,
            teacher_input,
        )  # fmt: skip

    module = DistillationModule(
        student=student,
        method=method,
        loss_weights=loss_weights,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval,
        num_classes=datamodule.num_classes,
        teacher=teacher,
        teacher_identity=teacher_identity,
        teacher_input=teacher_input,
        clip_scaled_gradients=bool(cfg.get("clip_scaled_gradients", False)),
    )
    module.teacher_top1 = teacher_reference_top1  # measured already: the first validation reuses it
    callbacks = RunCallbacks(cfg, output_dir, report, ema_decay)
    trainer = _trainer(cfg, output_dir, checkpoint, callbacks)
    _fit_or_stop(cfg, trainer, module, datamodule, checkpoint, callbacks)
    return _result(cfg, report, module, trainer, callbacks)


def _trainer(cfg: DictConfig, output_dir: Path, checkpoint: Path | None, callbacks: "RunCallbacks"):
    """The Lightning Trainer with this run's logger (continuing the saved W&B run when resuming)."""
    run_id = checkpoint_info(checkpoint)["logger_run_id"] if checkpoint is not None else None
    names = _logger_names(cfg.logger, output_dir, run_id) if cfg.logger else {}
    logger = build(cfg.logger, "logger", **names) if cfg.logger else False
    callbacks.add_logger_callbacks(bool(logger))
    return build(
        cfg.trainer, "trainer", callbacks=callbacks.all, logger=logger, plugins=[AtomicCheckpointIO()]
    )


def _fit_or_stop(cfg, trainer: pl.Trainer, module, datamodule, checkpoint, callbacks: "RunCallbacks") -> None:
    """`trainer.fit`, from `checkpoint` when continuing; a SIGTERM / SIGUSR1 becomes `Interrupted`."""
    logger = trainer.logger
    preemption = callbacks.preemption
    try:
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        with preemption.signals(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    except SIGTERMException:
        signum = preemption.signum or signal.SIGTERM
        saved = f"that step is saved in {preemption.saved}; " if preemption.saved else ""
        raise Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; {saved}continue from the start of that epoch with: python -m "
            f"kd_experiments resume={cfg.paths.output_dir}",
        ) from None
    finally:
        finish_logger(logger)


def _seeded_data(cfg: DictConfig) -> ClassificationData:
    """Seed the run, then build the data and check its class count against both networks' configs."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: ClassificationData = build(cfg.dataset, "dataset")
    datamodule.setup("fit")
    _check_class_counts(cfg, datamodule)
    return datamodule


def _networks_and_method(cfg: DictConfig, datamodule: ClassificationData) -> tuple:
    """Both networks (the teacher with random weights yet), the method, set up and dry-run on one batch."""
    teacher_weight_source(cfg.teacher)
    pl.seed_everything(cfg.teacher.seed, workers=True, verbose=False)  # a trained teacher's init
    teacher_network = create_network("teacher", cfg.teacher, datamodule.image_size)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    student = create_network("student", cfg.student, datamodule.image_size)
    _init_classifier(student, cfg.student.get("classifier_init"))
    method, loss_weights = build_method(cfg.method)
    teacher_input = _teacher_input(cfg.teacher, datamodule)
    student = _setup_method(method, student, teacher_network, datamodule, teacher_input)
    return teacher_network, student, method, loss_weights, teacher_input


class RunCallbacks:
    """The callbacks of one run, and the ones whose results the summary reads."""

    def __init__(self, cfg: DictConfig, output_dir: Path, report: str, ema_decay):
        self.cfg = cfg
        self.throughput = TrainThroughput()
        self.averaging = (
            WeightAveraging(cfg.get("average_epochs", 10), output_dir) if report == "weight_average" else None
        )
        self.ema = StudentEMA(ema_decay, output_dir) if ema_decay is not None else None
        self.preemption = Preemption(output_dir)
        self.all = [self.throughput, ValidateFinalEpoch(), RandomState(), self.preemption]
        self.all += _standard_callbacks(cfg, output_dir)
        self.all += [c for c in (self.averaging, self.ema) if c is not None]
        for name, node in (cfg.get("callbacks") or {}).items():  # the user's own, by name
            self.all.append(build(node, f"callbacks.{name}"))

    def add_logger_callbacks(self, has_logger: bool) -> None:
        if has_logger:
            self.all.append(LearningRateMonitor())  # at each scheduler's own interval

    def checkpoint(self, monitor: str | None) -> ModelCheckpoint | None:
        return next((c for c in self.all if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None)


def _optimization_factories(cfg: DictConfig) -> tuple:
    """The optimizer and scheduler factories (checked on dummy parameters now, applied by the module)."""
    optimizer = build_factory(cfg.optimizer, "optimizer", lambda make: make(_dummy_parameters()))
    scheduler_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else {}
    scheduler_interval = scheduler_cfg.pop("interval", "epoch")
    scheduler = (
        build_factory(
            scheduler_cfg, "scheduler", lambda make: make(torch.optim.SGD(_dummy_parameters(), lr=0.1))
        )
        if scheduler_cfg
        else None
    )
    return optimizer, scheduler, scheduler_interval


def _report_protocol(cfg: DictConfig) -> tuple[str, float | None]:
    report, ema_decay = cfg.get("report", "last"), cfg.get("ema_decay")
    if report not in REPORT_PROTOCOLS:
        raise UserError(f"report={report!r} is not one of {', '.join(REPORT_PROTOCOLS)}")
    if report == "ema" and ema_decay is None:
        raise UserError("report=ema needs an EMA of the student: set ema_decay, e.g. ema_decay=0.99996")
    return report, ema_decay


def _result(cfg, report, module, trainer, callbacks: RunCallbacks) -> dict:
    """What a finished fit adds to summary.json."""
    student, teacher, teacher_identity = module.student, module.teacher, module.teacher_identity
    history = module.validation_history
    throughput, averaging, ema = callbacks.throughput, callbacks.averaging, callbacks.ema
    last_checkpoint, best_checkpoint = (callbacks.checkpoint(m) for m in (None, "val/student_top1"))
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
        "ema_decay": cfg.get("ema_decay"),
        "two_head_inference": has_distill_head(student),
        # The networks as built (a ViT fitted to small images says so); `*_arch` is the configured name.
        "student": built_name(cfg.student.arch, student),
        "teacher": built_name(cfg.teacher.arch, teacher),
        "student_arch": cfg.student.arch,
        "teacher_arch": cfg.teacher.arch,
        "student_top5": history[-1]["top5"] if history else None,
        "teacher_top1": module.teacher_top1,
        "teacher_reference_top1": cfg.teacher.get("reference_top1"),
        "teacher_source": teacher_identity.get("source"),
        "teacher_sha256": teacher_identity.get("sha256"),  # of the weights' content
        "teacher_file_sha256": teacher_identity.get("file_sha256"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_images_per_s": round(throughput.images_per_s, 1) if throughput.images_per_s else None,
        "best_checkpoint": (best_checkpoint.best_model_path or None) if best_checkpoint else None,
        "last_checkpoint": (last_checkpoint.best_model_path or None) if last_checkpoint else None,
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


def build_method(method_cfg: DictConfig) -> tuple[Objectives, LossWeights]:
    """The method's objectives (`method.objectives`, by term name, plus the shared `ce`) and the weight and
    warm-up of every term (`method.weights`, `method.warmup`)."""
    if "objective" in method_cfg:
        raise UserError(
            "method.objective is now method.objectives, a mapping from term name to objective (e.g. "
            "method.objectives.kd.temperature=2); see conf/method/*.yaml"
        )
    objectives_cfg = method_cfg.get("objectives") or {}
    objectives = {name: build(node, f"method.objectives.{name}") for name, node in objectives_cfg.items()}
    weights = OmegaConf.to_container(method_cfg.weights, resolve=True)
    warmup = OmegaConf.to_container(method_cfg.warmup, resolve=True) if method_cfg.get("warmup") else None
    loss_weights = LossWeights(weights, warmup)
    return assemble(objectives, loss_weights), loss_weights


def _check_class_counts(cfg: DictConfig, datamodule: ClassificationData) -> None:
    if cfg.dataset.get("num_classes") is None:  # counted from the data (imagefolder); models interpolate it
        cfg.dataset.num_classes = datamodule.num_classes
    for role in ("teacher", "student"):
        if cfg[role].num_classes != datamodule.num_classes:
            raise UserError(
                f"{role}.num_classes={cfg[role].num_classes} but dataset {cfg.dataset.name} has "
                f"{datamodule.num_classes} classes; set {role}.num_classes={datamodule.num_classes}"
            )


def _init_classifier(student: torch.nn.Module, init) -> None:
    """`student.classifier_init`: re-draw the student's classifier, {weight_std: s, bias_std: b} (weight ~
    N(0, s^2), bias ~ N(0, b^2), 0 = zeros, null = the model's own init), as the ND code does for its CIFAR
    students (e.g. ResNet: N(0, 0.01) weight and bias; MobileNetV2: N(0, 0.01) weight, zero bias)."""
    if not init:
        return
    unknown = set(init) - {"weight_std", "bias_std"}
    if unknown:
        raise UserError(f"student.classifier_init takes weight_std and bias_std, not {sorted(unknown)}")
    classifier = student.get_classifier()
    heads = [classifier, getattr(student, "head_dist", None)]
    for head in (h for h in heads if isinstance(h, torch.nn.Linear)):
        for tensor, std in ((head.weight, init.get("weight_std")), (head.bias, init.get("bias_std"))):
            if std is None or tensor is None:
                continue
            with torch.no_grad():
                tensor.normal_(0.0, std) if std > 0 else tensor.zero_()


def _probe(role: str, network, needs, images: torch.Tensor, datamodule: ClassificationData):
    """One no-grad, eval-mode forward that turns a network refusing the data into one line."""
    network.eval()
    try:
        with torch.no_grad():
            output = extract_features(network, images, needs)
    except UserError:
        raise
    except Exception as error:  # the network does not take these images (size, channels)
        reason = " ".join(str(error).split())[:300]
        raise UserError(
            f"the {role} ({type(network).__name__}) fails on one batch of {datamodule.name} images of "
            f"shape {tuple(images.shape[1:])}: {reason}"
        ) from None
    if output.logits is not None and output.logits.shape[1] != datamodule.num_classes:
        raise UserError(
            f"the {role} predicts {output.logits.shape[1]} classes, but {datamodule.name} has "
            f"{datamodule.num_classes}"
        )
    return output


def _setup_method(
    method: Objectives, student, teacher, datamodule: ClassificationData, teacher_input=None
) -> torch.nn.Module:
    """Probe both networks with one small batch (eval mode, so BatchNorm statistics stay untouched): check
    that they take the data and give the features and class count the method needs, let the method adapt
    the student and size its projectors, and run the objectives that need no teacher statistics once.
    The teacher may still hold random weights: only shapes matter here. Return the student to train."""
    images, labels = zip(*(datamodule.train_set[index] for index in range(2)), strict=True)
    probe_images, probe_labels = torch.stack(images), torch.as_tensor(labels).long()
    student_needs = method.student_features | {"logits"}
    student_probe = _probe("student", student, student_needs, probe_images, datamodule)
    teacher_images = teacher_input(probe_images) if teacher_input is not None else probe_images
    teacher_needs = method.teacher_features | {"logits"}
    teacher_probe = _probe("teacher", teacher, teacher_needs, teacher_images, datamodule)
    adapted = student
    for name, objective in method.objectives.items():
        with _objective_errors(name):
            adapted = objective.adapt_student(adapted, student_probe, teacher_probe)
    if adapted is not student:
        student_probe = _probe("student", adapted, student_needs, probe_images, datamodule)
    for name, objective in method.objectives.items():
        with _objective_errors(name):
            objective.setup(student_probe, teacher_probe)
    method.eval()
    for name, objective in method.objectives.items():
        if objective.statistics_name is None:  # the others need the trained teacher's statistics first
            with _objective_errors(name), torch.no_grad():
                objective(student_probe, teacher_probe, probe_labels)
    method.train()
    adapted.train()
    return adapted


@contextmanager
def _objective_errors(name: str):
    """An objective that cannot work with these networks says so in one line, naming its config key."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"method.objectives.{name}: {reason}") from None


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


def _standard_callbacks(cfg: DictConfig, output_dir: Path) -> list[pl.Callback]:
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
                    monitor="val/student_top1",
                    mode="max",
                    save_top_k=1,
                )
            )
        callbacks.append(last_epoch_checkpoint(output_dir / "checkpoints"))
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    return callbacks


def _logger_names(logger_cfg: DictConfig, output_dir: Path, run_id: str | None = None) -> dict:
    """W&B name and group: the run directory's name, and for a multirun the sweep as the group; a resumed
    run continues its W&B run (`run_id`)."""
    if "wandb_logger" not in str(logger_cfg.get("_target_", "")):
        return {}
    names = {"run_id": run_id} if run_id else {}
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
    resumed_at = summary["resumes"][-1]["from_epoch"] if summary.get("resumes") else 0
    resumed = f" (this attempt resumed at epoch {resumed_at})" if resumed_at else ""
    console.print(
        f"{summary['epochs'] - resumed_at} epochs in {summary['wall_s']:.1f}s{resumed}, {throughput} train "
        "images/s"
    )
    console.print(f"outputs: {summary['output_dir']}", soft_wrap=True)
