"""CIFAR ResNet zoo: checkpoint-compatible names/shapes, parameter counts, and the timm-like feature API."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kd_experiments.models.cifar_resnet  # noqa: F401  (registers the models)
from kd_experiments.models.registry import ZOO
from tests.zoo_helpers import build, count_parameters, shapes_digest, state_dict_shapes

MODEL_NAMES = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]
WIDE_MODELS = {"resnet8x4", "resnet32x4"}

# sha256 (first 16 hex digits) of the sorted "name:shape" list of each mdistiller CIFAR-100 state dict,
# computed from the reference JSON so the check still runs where that file is not available.
REFERENCE_DIGESTS = {
    "resnet8": "9383abdf90e8a6c9",
    "resnet14": "c5374d21e562c91a",
    "resnet20": "9b2d9d5826bb6fdc",
    "resnet32": "cd99e2c683eb42fe",
    "resnet44": "b30049cc5878470f",
    "resnet56": "1c402c8c57507494",
    "resnet110": "6366508fd9b819d1",
    "resnet8x4": "ec56cd25f596e6ac",
    "resnet32x4": "5dc9a77aa1aa364a",
}


def expected_widths(name: str) -> list[int]:
    return [32, 64, 128, 256] if name in WIDE_MODELS else [16, 16, 32, 64]


def test_all_models_registered():
    assert set(MODEL_NAMES) <= set(ZOO)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_matches_reference_json(name, reference_shapes):
    assert state_dict_shapes(build(name)) == reference_shapes[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_matches_reference_digest(name):
    assert shapes_digest(state_dict_shapes(build(name))) == REFERENCE_DIGESTS[name]


@pytest.mark.parametrize(
    ("name", "millions", "decimals"),
    [("resnet32x4", 7.434, 3), ("resnet8x4", 1.234, 3), ("resnet56", 0.86, 2), ("resnet20", 0.28, 2)],
)
def test_parameter_counts(name, millions, decimals):
    assert round(count_parameters(build(name)) / 1e6, decimals) == millions


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_stage_shapes_and_embedding(name, sample_batch):
    model = build(name)
    widths = expected_widths(name)
    expected = [(2, widths[0], 32, 32), (2, widths[1], 32, 32), (2, widths[2], 16, 16), (2, widths[3], 8, 8)]
    with torch.no_grad():
        final_map, features = model.forward_intermediates(sample_batch)
        embedding = model.forward_head(final_map, pre_logits=True)
        logits = model(sample_batch)
    assert [tuple(feature.shape) for feature in features] == expected
    assert model.stage_channels == widths
    assert model.num_features == widths[3]
    assert model.num_classes == 100
    assert tuple(embedding.shape) == (2, widths[3])
    assert tuple(logits.shape) == (2, 100)
    assert torch.equal(final_map, features[-1])


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4"])
def test_forward_equals_head_of_features(name, sample_batch):
    model = build(name)
    with torch.no_grad():
        final_map = model.forward_features(sample_batch)
        torch.testing.assert_close(model(sample_batch), model.forward_head(final_map))
        embedding = model.forward_head(final_map, pre_logits=True)
        torch.testing.assert_close(model.get_classifier()(embedding), model(sample_batch))
    assert model.get_classifier() is model.fc


@pytest.mark.parametrize("name", ["resnet14", "resnet8x4"])
def test_preact_features(name, sample_batch):
    model = build(name)
    with torch.no_grad():
        final_post, post = model.forward_intermediates(sample_batch)
        final_pre, pre = model.forward_intermediates(sample_batch, preact=True)
    torch.testing.assert_close(final_pre, final_post)
    torch.testing.assert_close(pre[0], post[0])  # the stem entry stays post-ReLU
    for pre_stage, post_stage in zip(pre[1:], post[1:], strict=True):
        assert (pre_stage < 0).any()
        assert not torch.allclose(pre_stage, post_stage)
        torch.testing.assert_close(F.relu(pre_stage), post_stage)


def test_intermediate_indices(sample_batch):
    model = build("resnet8x4")
    with torch.no_grad():
        _, all_features = model.forward_intermediates(sample_batch)
        last_two = model.forward_intermediates(sample_batch, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(sample_batch, indices=[0, -1], intermediates_only=True)
        stem_only = model.forward_intermediates(sample_batch, indices=[0], intermediates_only=True)
    assert [f.shape[1] for f in last_two] == [128, 256]
    torch.testing.assert_close(last_two[1], all_features[3])
    assert [f.shape[1] for f in picked] == [32, 256]
    assert len(stem_only) == 1 and stem_only[0].shape[1] == 32
    with pytest.raises(ValueError):
        model.forward_intermediates(sample_batch, indices=[4])
    with pytest.raises(ValueError):
        model.forward_intermediates(sample_batch, indices=5)


def test_grayscale_small_input():
    model = build("resnet8", num_classes=10, in_chans=1)
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 8, 8))
        features = model.forward_intermediates(torch.randn(1, 1, 8, 8), intermediates_only=True)
    assert logits.shape == (1, 10)
    assert [tuple(f.shape[2:]) for f in features] == [(8, 8), (8, 8), (4, 4), (2, 2)]


def test_unknown_kwargs_rejected():
    with pytest.raises(TypeError):
        ZOO["resnet20"](num_classes=100, pretrained=True)


def test_weight_init():
    model = build("resnet32x4")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * k * k))
    weight = model.layer3[1].conv2.weight
    expected_std = (2.0 / (256 * 3 * 3)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.02
    assert abs(weight.mean().item()) < 0.05 * expected_std
