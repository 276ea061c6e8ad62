"""Fidelity fixes found by auditing the official code: each is a behaviour the official code has and a test
that would fail without it (the recipe values themselves are in test_recipe_values.py)."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from timm.models.resnet import BasicBlock

from kd_experiments.assembly import init_classifier
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.models import create_model
from kd_experiments.module import DistillationModule
from kd_experiments.teachers import create_network, model_kwargs
from tests.conftest import compose_config


def test_timm_resnet18_student_starts_without_zeroed_last_batchnorms():
    # torchvision (SRD's torchdistill, ND, LSHFM) and mdistiller initialise every BN weight to 1; timm's
    # zero_init_last=True would start each residual block as the identity.
    cfg = compose_config("student=resnet18", "dataset=imagenet", "dataset.num_classes=10")
    assert model_kwargs(cfg.student) == {"zero_init_last": False}
    student = create_network("student", cfg.student, 224)
    blocks = [m for m in student.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in blocks)
    timm_default = create_model("resnet18", 10)
    assert all(b.bn2.weight.abs().sum() == 0 for b in timm_default.modules() if isinstance(b, BasicBlock))
    recipe = compose_config("experiment=srd_imagenet_resnet34_resnet18")
    assert recipe.student.model_kwargs.zero_init_last is False


def test_conv_stem_deit_is_initialised_as_vkd_models_deit():
    torch.manual_seed(0)
    model = create_model("deit_ti_convstem", 1000, depth=1)
    convs = [m for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:  # kaiming_normal_ with PyTorch's defaults: fan_in, gain sqrt(2)
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    head_dist = model.head_dist  # timm's trunc_normal_(std=0.02), not nn.Linear's uniform (std 0.042 here)
    assert head_dist.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(head_dist.bias) == 0


def test_classifier_init_redraws_the_student_head_as_nds_code():
    torch.manual_seed(0)
    student = create_model("resnet20", 100)
    init_classifier(student, {"weight_std": 0.01, "bias_std": 0.0})  # ND's MobileNetV2 init
    assert student.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(student.fc.bias) == 0
    init_classifier(student, {"weight_std": 0.01, "bias_std": 0.01})  # ND's CIFAR ResNets
    assert student.fc.bias.std().item() == pytest.approx(0.01, rel=0.3)
    before = student.fc.weight.clone()
    init_classifier(student, {"weight_std": None, "bias_std": 0.0})  # WRN: bias only
    assert torch.equal(student.fc.weight, before) and torch.count_nonzero(student.fc.bias) == 0


class _Constant(torch.nn.Module):
    """A 'network' whose CE gradient is known: logits = w * x."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.w * x


def _update_norm(clip_scaled: bool) -> float:
    module = DistillationModule(
        student=_Constant(),
        method=Objectives({"ce": CrossEntropy()}),
        loss_weights=LossWeights({"ce": 1000.0}),
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        num_classes=3,
        clip_scaled_gradients=clip_scaled,
    )
    data = torch.utils.data.TensorDataset(torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([1]))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = pl.Trainer(
        max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], gradient_clip_val=15.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=1))
    return (torch.ones(3) - module.student.w.detach()).norm().item()


def test_clip_scaled_gradients_clips_as_the_released_srd_loop():
    # The CE gradient here has norm ~1000 * 1.3: Lightning clips the unscaled gradient to 15; the SRD DeiT
    # loop clips the gradient still multiplied by the AMP scale (1024), i.e. to 15 / 1024 once unscaled.
    assert _update_norm(clip_scaled=False) == pytest.approx(15.0, rel=1e-3)
    assert _update_norm(clip_scaled=True) == pytest.approx(15.0 / 1024, rel=1e-3)
    cfg = compose_config("experiment=srd_imagenet_regnety_160_deit_ti_convstem")
    assert cfg.clip_scaled_gradients is False and cfg.trainer.gradient_clip_val == 15.0
