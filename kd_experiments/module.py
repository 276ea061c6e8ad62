"""The one LightningModule: a frozen teacher, a student and a distillation method. It knows no method by
name: it asks the method which features it needs, runs the networks, and sums the named loss terms with
their configured weights and warm-ups."""

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import GradClipAlgorithmType
from timm.optim import create_optimizer_v2
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_experiments.callbacks import NonFiniteWatch
from kd_experiments.errors import UserError
from kd_experiments.fast_path import FastPath
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.models.features import NetworkOutput, extract_features
from kd_experiments.output_cache import TeacherOutputCache
from kd_experiments.teachers import Teacher

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]
# Arguments of timm's schedulers counted in epochs, rescaled to updates for per-iteration stepping.
TIMM_EPOCH_KEYS = ("t_initial", "warmup_t", "decay_t", "patience_t", "cooldown_t")


def _check_terms(method: Objectives, loss_weights: LossWeights, teacher) -> None:
    if set(loss_weights.terms) != set(method.terms):
        raise UserError(
            f"the method returns the loss terms {sorted(method.terms)} but method.weights gives weights "
            f"for {sorted(loss_weights.terms)}; give exactly one weight per term"
        )
    if method.teacher_features and teacher is None:
        raise UserError(f"the method's terms {list(method.terms)} need a teacher; configure teacher=...")


class DistillationModule(pl.LightningModule):
    """Trains `student` with `method`'s loss terms, weighted (and warmed up) by `loss_weights`.

    The teacher is kept outside the module tree (a plain attribute, not a submodule), which gives every
    freezing guarantee by construction: Lightning's `train()` calls never reach it, it is never in
    `parameters()` (so never in the optimizer, nor wrapped by DDP), and never in `state_dict()` (checkpoints
    record its identity instead). `_apply` still moves it with the module to each device and dtype.
    `teacher` is a `teachers.Teacher` (network, input normalisation, identity) or a bare network that takes
    the data as it is.
    """

    def __init__(
        self,
        student: nn.Module,
        method: Objectives,
        loss_weights: LossWeights,
        optimizer: OptimizerFactory,
        num_classes: int,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        teacher: Teacher | nn.Module | None = None,
        clip_scaled_gradients: bool = False,
        output_cache: TeacherOutputCache | None = None,
        fast_path: FastPath | None = None,
    ):
        super().__init__()
        _check_terms(method, loss_weights, teacher)
        self.student = student
        self.method = method
        self.loss_weights = loss_weights
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        if isinstance(teacher, nn.Module):  # a bare network: it takes the data as it is, no identity
            teacher = Teacher(teacher)
        self._frozen_teacher = () if teacher is None else (teacher.network,)
        # The teacher's own input normalisation, when it differs from the data's (data.base.Renormalize).
        self.teacher_input = (teacher.input if teacher is not None else None) or nn.Identity()
        self.teacher_identity = dict(teacher.identity) if teacher is not None else {}
        self.clip_scaled_gradients = clip_scaled_gradients
        self.output_cache = output_cache
        # Training batches whose teacher outputs were computed / read from the cache (this rank).
        self.teacher_batches = {"computed": 0, "read": 0}

        self._add_metrics(method.terms, num_classes)
        self.val_images: int | None = None  # of the last validation (not the sanity check)
        self.teacher_top1: float | None = None  # measured once, at the first real validation
        self.validation_history: list[dict] = []
        self._measuring_teacher = False
        # channels_last and torch.compile (fast_path.py): applied to the networks once, here.
        self.fast_path = fast_path or FastPath()
        self.fast_path.install(self)

    def _add_metrics(self, terms: tuple[str, ...], num_classes: int) -> None:
        # nan_strategy "disable": the default checks every update for NaN with a host sync (a stalled GPU
        # each step); NonFiniteWatch finds non-finite terms on the device instead.
        means = {name: MeanMetric(nan_strategy="disable") for name in (*terms, "loss")}
        self.train_means = nn.ModuleDict(means)
        self.nonfinite_watch = NonFiniteWatch(terms)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.teacher_val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        # Images scored by a validation, summed over DDP ranks: the whole split, each image once.
        self.val_image_count = SumMetric()

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen_teacher[0] if self._frozen_teacher else None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for teacher in self._frozen_teacher:
            teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        sample_keys = batch[2] if len(batch) > 2 else None  # B x 5 on the CPU (data/sampling.py)
        # The teacher runs (or its outputs are read) first, so its activations are freed before the
        # student's autograd graph holds memory.
        teacher_out = self.teacher_outputs(images, sample_keys) if self.method.teacher_features else None
        student_out = extract_features(self.student, images, self.method.student_features)
        terms = self.method(student_out, teacher_out, targets)
        self.nonfinite_watch.update(terms, self.global_step)
        weights = self.loss_weights.at(self.current_epoch)
        loss = sum(weights[name] * value for name, value in terms.items())

        batch_size = images.shape[0]
        # The weight as a device tensor made by a fill: a Python number would be copied to the device on every
        # update, and a host-to-device copy waits for the GPU. Nothing in this loop reads a value back.
        weight = torch.full((), batch_size, dtype=torch.float32, device=loss.device)
        for name, value in (*terms.items(), ("loss", loss)):  # the terms unweighted, the loss weighted
            value = value.detach()
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
            # Epoch means go through torchmetrics so that they reduce correctly across DDP ranks.
            self.train_means[name].update(value, weight=weight)
            self.log(f"train/{name}_epoch", self.train_means[name], on_step=False, on_epoch=True)
        return loss

    def teacher_outputs(self, images: torch.Tensor, sample_keys: torch.Tensor | None) -> NetworkOutput:
        """The teacher features the method reads for this batch: read from the teacher-output cache when it
        holds every sample of the batch, otherwise computed (and stored, when the cache writes this epoch).
        no_grad, not inference_mode: a loss may save teacher tensors for its backward."""
        cache = self.output_cache if sample_keys is not None else None
        if cache is not None:
            stored = cache.read(sample_keys)
            if stored is not None:
                self.teacher_batches["read"] += 1
                return stored.to(images.device)
        with torch.no_grad():
            output = extract_features(self.teacher, self.teacher_input(images), self.method.teacher_features)
        self.teacher_batches["computed"] += 1
        if cache is not None:
            cache.write(sample_keys, output)
        return output

    def on_train_epoch_start(self) -> None:
        if self.output_cache is not None:
            sampler = getattr(self.trainer.train_dataloader, "sampler", None)
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            self.output_cache.begin_epoch(self.current_epoch, len(sampler), rank, world_size)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (self.global_step % self.trainer.log_every_n_steps == 0) or self.trainer.fit_loop.epoch_loop.done:
            self.nonfinite_watch.raise_if_nonfinite(self.global_step)

    def on_train_epoch_end(self) -> None:
        self.nonfinite_watch.raise_if_nonfinite(self.global_step)
        if self.output_cache is not None:
            self.output_cache.end_epoch()  # published only once its epoch trained without an error

    def on_fit_start(self) -> None:
        """Every rank takes global rank zero's teacher top-1: only rank zero runs the reference check, and
        all ranks must agree whether the first validation measures the teacher (its metric's sync is a
        collective that would hang with one rank missing)."""
        self.teacher_top1 = self.trainer.strategy.broadcast(self.teacher_top1, src=0)

    def on_validation_epoch_start(self) -> None:
        self._measuring_teacher = (
            self.teacher is not None and self.teacher_top1 is None and not self.trainer.sanity_checking
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self.student(images)
        self.val_top1.update(logits, targets)
        self.val_top5.update(logits, targets)
        self.val_image_count.update(targets.shape[0])
        if self._measuring_teacher:
            self.teacher_val_top1.update(self.teacher(self.teacher_input(images)), targets)

    def on_validation_epoch_end(self) -> None:
        top1 = self.val_top1.compute().item() * 100
        top5 = self.val_top5.compute().item() * 100
        images = int(self.val_image_count.compute().item())
        self.val_top1.reset()
        self.val_top5.reset()
        self.val_image_count.reset()
        # The numbers are the same on every rank (torchmetrics' compute() reduced them): sync_dist tells
        # Lightning so under DDP, and reduce_fx max passes a number shared by all ranks through unchanged.
        synced = {"sync_dist": True, "reduce_fx": "max"}
        self.log("val/student_top1", top1, prog_bar=True, **synced)
        self.log("val/student_top5", top5, **synced)
        if self._measuring_teacher:
            self.teacher_top1 = self.teacher_val_top1.compute().item() * 100
            self.teacher_val_top1.reset()
            self._measuring_teacher = False
        if self.teacher_top1 is not None:
            self.log("val/teacher_top1", self.teacher_top1, **synced)
        if not self.trainer.sanity_checking:
            self.val_images = images
            self.validation_history.append({"epoch": self.current_epoch, "top1": top1, "top5": top5})

    def no_weight_decay(self) -> set[str]:
        """The student's own no-decay names (timm ViTs: pos_embed, cls_token, ...), for timm's optimizer."""
        names = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{name}" for name in names}

    def configure_optimizers(self):
        if getattr(self.optimizer_factory, "func", None) is create_optimizer_v2:
            # timm builds the parameter groups from the module: norms, biases and the student's
            # no_weight_decay() names get no weight decay when filter_bias_and_bn is set.
            optimizer = self.optimizer_factory(self)
        else:
            optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        self._exempt_parametrized_from_weight_decay(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self._build_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def _exempt_parametrized_from_weight_decay(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the unconstrained tensors of parametrized weights (VkD's orthogonal projector:
        `...parametrizations.weight.original`) into a group without weight decay. Decay is meaningless on
        them and, for torch's default Householder map, fatal: the map multiplies by `X.diagonal().int()`,
        so shrinking a diagonal of ones to 0.99999 makes the weight exactly zero after the first step."""
        exempt = {id(p) for name, p in self.named_parameters() if ".parametrizations." in f".{name}"}
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in exempt and group.get("weight_decay", 0)]
            group["params"] = [p for p in group["params"] if id(p) not in {id(m) for m in moved}]
        if moved:
            optimizer.add_param_group({"params": moved, "weight_decay": 0.0})

    def _build_scheduler(self, optimizer: torch.optim.Optimizer):
        """The configured scheduler. A timm schedule is written in epochs (`t_initial`, `warmup_t`, ...);
        with `interval: step` it is converted to optimizer updates and stepped after every update, as the
        per-iteration cosine schedules of the Swin / SRD / VkD code do (timm's `create_scheduler_v2`
        converts the same way for `step_on_epochs=False`)."""
        return self.scheduler_factory(optimizer, **self._scheduler_arguments())

    def _scheduler_arguments(self) -> dict:
        """The scheduler's keyword arguments as built: the config's, in updates for a per-step timm one."""
        factory = self.scheduler_factory
        target = getattr(factory, "func", factory)
        arguments = dict(getattr(factory, "keywords", {}))
        if self.scheduler_interval != "step" or not (
            isinstance(target, type) and issubclass(target, TimmScheduler)
        ):
            return arguments
        updates = self.updates_per_epoch()
        for key, epochs in factory.keywords.items():
            if key in TIMM_EPOCH_KEYS and epochs is not None:
                is_list = isinstance(epochs, Sequence) and not isinstance(epochs, str)  # list or ListConfig
                scaled = [round(e * updates) for e in epochs] if is_list else None
                arguments[key] = scaled if scaled is not None else round(epochs * updates)
        return arguments | {"t_in_epochs": False}

    def on_train_start(self) -> None:
        """Resumed with a longer trainer.max_epochs: Lightning restored the schedulers with the old length
        (a cosine's T_max); give them the config's, so the schedule ends at the new last epoch, and set the
        learning rate to that schedule's value at this point (torch's closed form)."""
        if self.trainer.ckpt_path is None or self.scheduler_factory is None:
            return
        arguments = self._scheduler_arguments()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            changed = {k: v for k, v in arguments.items() if getattr(scheduler, k, v) != v}
            for key, value in changed.items():
                setattr(scheduler, key, value)
            closed_form = getattr(scheduler, "_get_closed_form_lr", None)
            if changed and closed_form is not None:
                for group, lr in zip(scheduler.optimizer.param_groups, closed_form(), strict=True):
                    group["lr"] = lr

    def updates_per_epoch(self) -> int:
        """Optimizer updates in one training epoch on this rank (after limit_train_batches, DDP sharding
        and gradient accumulation)."""
        self.trainer.estimated_stepping_batches  # noqa: B018 - sets up the train loader and its length
        batches = self.trainer.num_training_batches
        if batches == float("inf"):
            raise UserError("interval: step needs a train loader with a length (not an iterable data set)")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if isinstance(scheduler, TimmScheduler):  # timm schedulers are told the epoch / update count
            if self.scheduler_interval == "step":
                scheduler.step_update(num_updates=self.global_step)
            else:
                scheduler.step(epoch=self.current_epoch + 1)
        else:
            super().lr_scheduler_step(scheduler, metric)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning unscales AMP gradients before clipping them. With `clip_scaled_gradients`, clip as
        code that clips the still-scaled gradients does (SRD's DeiT loop: `scaler.scale(loss).backward()`,
        then `clip_grad_norm_(..., 15)`, no `unscale_`): a threshold c on gradients scaled by S is the
        threshold c / S on the unscaled ones, so the clip fires whenever |g| > c / S, i.e. nearly always.
        Without a gradient scaler (fp32, bf16) S = 1 and nothing changes."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not (self.clip_scaled_gradients and gradient_clip_val and scaler is not None):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # clip_gradients refuses a value other than the Trainer's: call the precision plugin directly.
        algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())
        self.trainer.precision_plugin.clip_gradients(
            optimizer, gradient_clip_val / scaler.get_scale(), algorithm
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["teacher_identity"] = self.teacher_identity
        # What a resumed run needs beyond weights and loops: the epochs it has validated (its best and last
        # top-1), the teacher's measured top-1, and the logger's run id (W&B continues the same run).
        checkpoint["validation_history"] = list(self.validation_history)
        checkpoint["teacher_top1"] = self.teacher_top1
        checkpoint["val_images"] = self.val_images
        checkpoint["teacher_batches"] = dict(self.teacher_batches)
        logger = self.trainer.logger if self._trainer is not None else None
        checkpoint["logger_run_id"] = str(logger.version) if logger is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.validation_history = list(checkpoint.get("validation_history", []))
        if checkpoint.get("teacher_top1") is not None:
            self.teacher_top1 = checkpoint["teacher_top1"]
        self.val_images = checkpoint.get("val_images", self.val_images)
        self.teacher_batches = dict(checkpoint.get("teacher_batches", self.teacher_batches))
