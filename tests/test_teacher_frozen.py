"""The teacher stays frozen: eval mode through training, no gradients, not in the optimizer, unchanged
weights, and absent from the checkpoint's trainable state (which records its identity instead)."""

import pytest
import pytorch_lightning as pl
import torch

from kd_experiments.errors import UserError
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.methods.kd import HintonKD
from kd_experiments.models import create_model
from kd_experiments.module import DistillationModule
from kd_experiments.teachers import Teacher
from tests.conftest import compose_config


class RecordTeacherState(pl.Callback):
    def __init__(self):
        self.teacher_training_flags = []
        self.teacher_grads = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.teacher_training_flags.append(module.teacher.training)

    def on_after_backward(self, trainer, module):
        self.teacher_grads.extend(p.grad for p in module.teacher.parameters())


def build_module():
    from kd_experiments.data.digits import DigitsData

    data = DigitsData(batch_size=64)
    data.setup()
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1)
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    module = DistillationModule(
        student=student,
        method=Objectives({"ce": CrossEntropy(), "kd": HintonKD(temperature=4.0)}),
        loss_weights=LossWeights({"ce": 0.1, "kd": 0.9}),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        num_classes=10,
        teacher=Teacher(teacher, identity={"arch": "convnet_wide", "source": "random", "sha256": "abc"}),
    )
    return module, data


def test_teacher_frozen_through_training(tmp_path):
    module, data = build_module()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    recorder = RecordTeacherState()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)

    assert len(recorder.teacher_training_flags) == 2 * 6  # 359 training images / 64 per batch, 2 epochs
    assert not any(recorder.teacher_training_flags), "the teacher left eval mode during training"
    assert recorder.teacher_grads and all(g is None for g in recorder.teacher_grads)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    # BatchNorm running statistics and weights untouched (eval mode + no optimizer)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key

    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in module.teacher.parameters()}
    assert optimizer_params == {id(p) for p in module.student.parameters()}

    assert not any(key.startswith("teacher") or "_frozen_teacher" in key for key in module.state_dict())
    assert all(key.startswith(("student.", "method.")) for key in module.state_dict() if "." in key)


def test_checkpoint_records_teacher_identity_not_weights(tmp_path):
    module, data = build_module()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["teacher_identity"] == {"arch": "convnet_wide", "source": "random", "sha256": "abc"}
    assert set(checkpoint["state_dict"]) == {f"student.{k}" for k in module.student.state_dict()}


def test_teacher_follows_module_dtype_but_stays_out_of_the_tree():
    module, _ = build_module()
    module.to(torch.float64)
    assert next(module.teacher.parameters()).dtype == torch.float64
    module.train()
    assert not module.teacher.training
    assert all(child is not module.teacher for child in module.modules())


def test_configured_weights_must_match_the_method_terms():
    module_args = dict(
        student=create_model("convnet_narrow", num_classes=10),
        method=Objectives({"ce": CrossEntropy(), "kd": HintonKD()}),
        optimizer=torch.optim.SGD,
        num_classes=10,
        teacher=create_model("convnet_narrow", num_classes=10),
    )
    with pytest.raises(UserError) as missing:  # a missing loss weight
        DistillationModule(loss_weights=LossWeights({"ce": 1.0}), **module_args)
    assert "['ce', 'kd']" in str(missing.value) and "['ce']" in str(missing.value)
    with pytest.raises(UserError) as extra:  # a weight for a term the method does not return
        DistillationModule(loss_weights=LossWeights({"ce": 1.0, "kd": 1.0, "nd": 1.0}), **module_args)
    assert "['ce', 'kd']" in str(extra.value) and "['ce', 'kd', 'nd']" in str(extra.value)
    DistillationModule(loss_weights=LossWeights({"kd": 1.0, "ce": 1.0}), **module_args)  # any order


def test_a_method_that_reads_the_teacher_needs_one():
    with pytest.raises(UserError, match="need a teacher"):
        DistillationModule(
            student=create_model("convnet_narrow", num_classes=10),
            method=Objectives({"ce": CrossEntropy(), "kd": HintonKD()}),
            loss_weights=LossWeights({"ce": 1.0, "kd": 1.0}),
            optimizer=torch.optim.SGD,
            num_classes=10,
        )
    DistillationModule(  # CE alone runs without a teacher
        student=create_model("convnet_narrow", num_classes=10),
        method=Objectives({"ce": CrossEntropy()}),
        loss_weights=LossWeights({"ce": 1.0}),
        optimizer=torch.optim.SGD,
        num_classes=10,
    )


def test_default_config_composes_with_the_documented_groups():
    cfg = compose_config()
    for group in (
        "teacher",
        "student",
        "method",
        "dataset",
        "trainer",
        "optimizer",
        "scheduler",
        "logger",
        "paths",
    ):
        assert group in cfg, group
    assert cfg.method.name == "kd" and cfg.dataset.name == "digits"
