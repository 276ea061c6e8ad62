"""Building a run's parts from its config: Hydra instantiation with one-line errors, the method and its
loss weights, the optimizer and scheduler factories, both networks probed with one batch (so that a shape
or feature mistake costs seconds), and the CE training of a teacher made on the fly."""

from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_experiments.callbacks import progress_bar
from kd_experiments.data.base import ClassificationData
from kd_experiments.errors import UserError
from kd_experiments.methods.bce import MultiLabelBCE
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives, assemble
from kd_experiments.models import extract_features
from kd_experiments.module import DistillationModule
from kd_experiments.multilabel.module import MultiLabelModule
from kd_experiments.teachers import load_weights, read_state_dict


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


def dummy_parameters() -> list[torch.nn.Parameter]:
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


def check_class_counts(cfg: DictConfig, datamodule: ClassificationData) -> None:
    if cfg.dataset.get("num_classes") is None:  # counted from the data (imagefolder); models interpolate it
        cfg.dataset.num_classes = datamodule.num_classes
    for role in ("teacher", "student"):
        if cfg[role].num_classes != datamodule.num_classes:
            raise UserError(
                f"{role}.num_classes={cfg[role].num_classes} but dataset {cfg.dataset.name} has "
                f"{datamodule.num_classes} classes; set {role}.num_classes={datamodule.num_classes}"
            )


def init_classifier(student: torch.nn.Module, init) -> None:
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


def probe(role: str, network, needs, images: torch.Tensor, datamodule: ClassificationData):
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


def setup_method(
    method: Objectives, student, teacher, datamodule: ClassificationData, teacher_input=None
) -> torch.nn.Module:
    """Probe both networks with one small batch (eval mode, so BatchNorm statistics stay untouched): check
    that they take the data and give the features and class count the method needs, let the method adapt
    the student and size its projectors, and run the objectives that need no teacher statistics once.
    The teacher may still hold random weights: only shapes matter here. Return the student to train."""
    images, labels = zip(*(datamodule.train_set[index] for index in range(2)), strict=True)
    multi_hot = isinstance(labels[0], torch.Tensor) and labels[0].dim() > 0  # a multi-label data set
    probe_labels = torch.stack(labels) if multi_hot else torch.as_tensor(labels).long()
    probe_images = torch.stack(images)
    student_needs = method.student_features | {"logits"}
    student_probe = probe("student", student, student_needs, probe_images, datamodule)
    teacher_images = teacher_input(probe_images) if teacher_input is not None else probe_images
    teacher_needs = method.teacher_features | {"logits"}
    teacher_probe = probe("teacher", teacher, teacher_needs, teacher_images, datamodule)
    adapted = student
    for name, objective in method.objectives.items():
        with objective_errors(name):
            adapted = objective.adapt_student(adapted, student_probe, teacher_probe)
    if adapted is not student:
        student_probe = probe("student", adapted, student_needs, probe_images, datamodule)
    for name, objective in method.objectives.items():
        with objective_errors(name):
            objective.setup(student_probe, teacher_probe)
    method.eval()
    for name, objective in method.objectives.items():
        if objective.statistics_name is None:  # the others need the trained teacher's statistics first
            with objective_errors(name), torch.no_grad():
                objective(student_probe, teacher_probe, probe_labels)
    method.train()
    adapted.train()
    return adapted


@contextmanager
def objective_errors(name: str):
    """An objective that cannot work with these networks says so in one line, naming its config key."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"method.objectives.{name}: {reason}") from None


def optimization_factories(cfg: DictConfig) -> tuple:
    """The optimizer and scheduler factories (checked on dummy parameters now, applied by the module)."""
    optimizer = build_factory(cfg.optimizer, "optimizer", lambda make: make(dummy_parameters()))
    scheduler_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else {}
    scheduler_interval = scheduler_cfg.pop("interval", "epoch")
    scheduler = (
        build_factory(
            scheduler_cfg, "scheduler", lambda make: make(torch.optim.SGD(dummy_parameters(), lr=0.1))
        )
        if scheduler_cfg
        else None
    )
    return optimizer, scheduler, scheduler_interval


def train_teacher_with_ce(
    model: torch.nn.Module, datamodule: ClassificationData, recipe: DictConfig, seed: int
) -> float:
    """Train `model` with cross-entropy on `datamodule` (`teacher.recipe`: optimizer, scheduler, epochs),
    from `seed`; return its validation top-1 (%). What `teachers.build_teacher` calls for a teacher
    trained on the fly: the LightningModule and the CE method live above the teacher code."""
    pl.seed_everything(seed, workers=True, verbose=False)
    # A multi-label teacher trains with BCE on its multi-hot labels and is scored by its mAP.
    multilabel = getattr(datamodule, "task", "classification") == "multilabel"
    term, objective = ("bce", MultiLabelBCE()) if multilabel else ("ce", CrossEntropy())
    module_class, extra = DistillationModule, {}
    if multilabel:
        module_class, extra = MultiLabelModule, {"ap_interpolation": datamodule.ap_interpolation}
    module = module_class(
        student=model,
        method=Objectives({term: objective}),
        loss_weights=LossWeights({term: 1.0}),
        optimizer=instantiate(recipe.optimizer),
        scheduler=instantiate(recipe.scheduler) if recipe.get("scheduler") else None,
        num_classes=datamodule.num_classes,
        **extra,
    )
    fit_teacher(module, datamodule, recipe, seed)
    return module.validation_history[-1]["map" if multilabel else "top1"]


def fit_teacher(module: pl.LightningModule, datamodule, recipe: DictConfig, seed: int) -> None:
    """Train a teacher's module for `recipe.max_epochs` on one device, without logger or checkpoints, with
    one validation at the end, on the teacher's own augmentation stream (`seed`): the shared part of
    training a classifier (`train_teacher_with_ce`) or a detector (`detection.run.train_detector`)."""
    trainer = pl.Trainer(
        max_epochs=recipe.max_epochs,
        accelerator=recipe.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=recipe.max_epochs,  # one validation, at the end
        callbacks=[progress_bar()],
    )
    run_seed, datamodule.augmentation_seed = datamodule.augmentation_seed, seed  # the teacher's own stream
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        datamodule.augmentation_seed = run_seed


def initial_student_weights(student_cfg: DictConfig, student: torch.nn.Module) -> None:
    """`student.checkpoint`: start from these weights (a state_dict file, or a run's Lightning checkpoint,
    whose `student.*` weights are read), loaded into the student as the method adapted it (LSHFM's feat_fc
    included): the second stage of a two-stage recipe starts from the first stage's last.ckpt."""
    path = student_cfg.get("checkpoint")
    if path:
        state = read_state_dict(Path(path).expanduser(), role="student")
        load_weights(student, state, student_cfg.arch, str(path), role="student")


def freeze_student(student_cfg: DictConfig, student: torch.nn.Module) -> None:
    """`student.trainable`: train only the student's parameters under these module names (e.g. [feat_fc],
    LSHFM's first multi-label stage); the rest keep their weights (BatchNorm statistics still update, as
    there). null trains everything."""
    prefixes = student_cfg.get("trainable")
    if prefixes is None:
        return
    names = [name for name, _ in student.named_parameters()]

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    unknown = [prefix for prefix in prefixes if not any(under(name, prefix) for name in names)]
    if unknown:
        modules = sorted({name.split(".")[0] for name in names})
        raise UserError(
            f"student.trainable names {unknown}, which the student has no parameters under; its modules: "
            f"{', '.join(modules)}"
        )
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(any(under(name, prefix) for prefix in prefixes))
