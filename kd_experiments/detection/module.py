"""The LightningModule of the detection task: the classification module's machinery (frozen teacher kept
out of the module tree, method terms summed with their weights and warm-ups, optimizer and scheduler
factories, checkpoint hooks) with a detector's training step and an mAP validation."""

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from kd_experiments.callbacks import NonFiniteWatch
from kd_experiments.detection.features import DetectorOutput, student_pass, teacher_pass
from kd_experiments.detection.metrics import DetectionMAP
from kd_experiments.module import DistillationModule

# The detector's own losses, logged beside the method's terms (their sum is the `detection` term).
DETECTOR_LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
# What validation reports, in percent: COCO mAP@[.5:.95], mAP@.5, and VOC07's 11-point mAP@.5.
MAP_KEYS = ("map", "map50", "voc07_map50")


class DetectionModule(DistillationModule):
    """Trains a torchvision Faster R-CNN student with a detection method (`methods/detection.py`).

    A training step runs the student as torchvision does (its four losses, the RoIs it sampled), then the
    frozen teacher on the same resized batch and RoIs (`detection.features`), and sums the method's
    weighted terms. Validation scores the student's detections with `DetectionMAP`; the teacher is scored
    once, at the first real validation, and its numbers are kept (`teacher_map`)."""

    def _add_metrics(self, terms: tuple[str, ...], num_classes: int) -> None:
        names = (*terms, "loss", *DETECTOR_LOSSES)
        self.train_means = nn.ModuleDict({name: MeanMetric(nan_strategy="disable") for name in names})
        self.nonfinite_watch = NonFiniteWatch(terms)
        self.val_map = DetectionMAP()
        self.teacher_val_map = DetectionMAP()
        self.val_image_count = SumMetric()
        self.teacher_map: dict[str, float] | None = None

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return self.student(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        needs = self.method.student_features
        student = student_pass(self.student, images, targets, needs)
        teacher_out = None
        if self.method.teacher_features:
            with torch.no_grad():
                teacher_out = teacher_pass(
                    self.teacher, self.student, student.images, student.rois, self.method.teacher_features
                )
            self.teacher_batches["computed"] += 1
        terms = self.method(student.output, teacher_out, targets)
        self.nonfinite_watch.update(terms, self.global_step)
        weights = self.loss_weights.at(self.current_epoch)
        loss = sum(weights[name] * value for name, value in terms.items())
        weight = torch.full((), len(images), dtype=torch.float32, device=loss.device)
        logged = {**terms, "loss": loss, **student.output.losses}
        for name, value in logged.items():
            value = value.detach()
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
            self.train_means[name].update(value, weight=weight)
            self.log(f"train/{name}_epoch", self.train_means[name], on_step=False, on_epoch=True)
        return loss

    def teacher_outputs(self, images, sample_keys) -> DetectorOutput:
        raise NotImplementedError("the detection module runs the teacher on the student's RoIs")

    def on_train_epoch_start(self) -> None:
        """No teacher-output cache for detection (the RoIs change with the student), and the teacher stays
        in eval mode (out of the module tree, Lightning never switches it)."""

    def on_validation_epoch_start(self) -> None:
        self._measuring_teacher = (
            self.teacher is not None and self.teacher_map is None and not self.trainer.sanity_checking
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self.student(images), targets)
        self.val_image_count.update(len(images))
        if self._measuring_teacher:
            self.teacher_val_map.update(self.teacher(images), targets)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_map.compute()
        images = int(self.val_image_count.compute().item())
        self.val_map.reset()
        self.val_image_count.reset()
        synced = {"sync_dist": True, "reduce_fx": "max"}  # the same on every rank (computed, then synced)
        for key in MAP_KEYS:
            self.log(f"val/student_{key}", scores[key], prog_bar=key == "map", **synced)
        if self._measuring_teacher:
            self.teacher_map = dict(self.teacher_val_map.compute())
            self.teacher_val_map.reset()
            self._measuring_teacher = False
        if self.teacher_map is not None:
            for key in MAP_KEYS:
                self.log(f"val/teacher_{key}", self.teacher_map[key], **synced)
        if not self.trainer.sanity_checking:
            self.val_images = images
            self.validation_history.append({"epoch": self.current_epoch, **scores})

    def on_fit_start(self) -> None:
        """The teacher's map is measured at the first validation on every rank together (its metric syncs),
        so there is nothing to broadcast."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_map"] = self.teacher_map

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_map = checkpoint.get("teacher_map", self.teacher_map)
