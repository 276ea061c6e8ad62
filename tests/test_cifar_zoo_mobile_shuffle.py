"""CIFAR zoo ResNet18/ResNet50 (resnetv2), MobileNetV2 (mobile_half) and ShuffleV1/V2: checkpoint-compatible
names/shapes, parameter counts, stage shapes, and the feature API (stages, pre-activation stages)."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kd_experiments.models.cifar_resnetv2  # noqa: F401  (registers the models)
import kd_experiments.models.mobilenetv2  # noqa: F401
import kd_experiments.models.shufflenet  # noqa: F401
from kd_experiments.models.features import extract_features
from kd_experiments.models.registry import ZOO
from kd_experiments.models.shufflenet import channel_shuffle
from tests.zoo_helpers import build, count_parameters, shapes_digest, state_dict_shapes

MODEL_NAMES = ["ResNet18", "ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
ALL_KINDS = frozenset({"stages", "logits", "embedding", "preact_stages"})

# sha256 (first 16 hex digits) of the sorted "name:shape" list of each mdistiller CIFAR-100 state dict,
# computed from the reference JSON so the check still runs where that file is not available.
REFERENCE_DIGESTS = {
    "ResNet18": "14f6a2b53e412cdf",
    "ResNet50": "1fa3ccc0fcd31230",
    "MobileNetV2": "847d8649e8991581",
    "ShuffleV1": "54f4d15c21e2ab51",
    "ShuffleV2": "cbed1208962b9d1c",
}

REFERENCE_JSON_CANDIDATES = [
    os.environ.get("KD_CIFAR_ZOO_REFERENCE", ""),
    # CI and developers have the shared folder beside the repository.
    str(Path(__file__).resolve().parents[2] / "shared/reference/cifar_zoo_state_dicts.json"),
]

# Parameter counts for 100 classes: measured exactly, and the rounded figures of the methods.md zoo table.
PARAMETER_COUNTS = {
    "ResNet18": (11_220_132, 11.22),
    "ResNet50": (23_705_252, 23.705),
    "MobileNetV2": (812_836, 0.813),
    "ShuffleV1": (949_258, 0.95),
    "ShuffleV2": (1_355_528, 1.356),
}

# (C, H, W) of f0 (stem) and the stage outputs on a 32x32 input, and the pooled dim (methods.md table).
STAGE_SHAPES = {
    "ResNet18": [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "ResNet50": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)],
}
POOLED_DIMS = {"ResNet18": 512, "ResNet50": 2048, "MobileNetV2": 1280, "ShuffleV1": 960, "ShuffleV2": 1024}
# Models whose final map is a 1x1 conv head after the last stage, not the last stage itself.
FINAL_MAP_SHAPES = {"MobileNetV2": (1280, 2, 2), "ShuffleV2": (1024, 4, 4)}
RELU_OF_PREACT_IS_POST = {"ResNet18", "ResNet50", "ShuffleV1"}


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Random BN affine parameters so that pre-activation maps really take negative values."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.randn(module.weight.shape, generator=generator)
            module.bias.data = torch.randn(module.bias.shape, generator=generator)
    return model.eval()


def test_all_models_registered():
    assert set(MODEL_NAMES) <= set(ZOO)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_matches_reference_json(name, reference_shapes):
    assert state_dict_shapes(build(name)) == reference_shapes[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_matches_reference_digest(name):
    assert shapes_digest(state_dict_shapes(build(name))) == REFERENCE_DIGESTS[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts(name):
    exact, millions = PARAMETER_COUNTS[name]
    count = count_parameters(build(name))
    assert count == exact
    assert abs(count / 1e6 - millions) <= 1e-3 * millions


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_stage_shapes_and_embedding(name, sample_batch):
    model = build(name)
    with torch.no_grad():
        final_map, features = model.forward_intermediates(sample_batch)
        embedding = model.forward_head(final_map, pre_logits=True)
        logits = model(sample_batch)
    assert [tuple(feature.shape[1:]) for feature in features] == STAGE_SHAPES[name]
    assert all(feature.shape[0] == 2 for feature in features)
    assert model.stage_channels == [shape[0] for shape in STAGE_SHAPES[name]]
    assert model.num_features == POOLED_DIMS[name]
    assert model.num_classes == 100
    assert tuple(embedding.shape) == (2, POOLED_DIMS[name])
    assert tuple(logits.shape) == (2, 100)
    if name in FINAL_MAP_SHAPES:
        assert tuple(final_map.shape[1:]) == FINAL_MAP_SHAPES[name]
    else:
        assert torch.equal(final_map, features[-1])
    torch.testing.assert_close(final_map, model.forward_features(sample_batch))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_extract_features_agrees_with_forward(name, sample_batch):
    model = randomise_batchnorm(build(name))
    with torch.no_grad():
        output = extract_features(model, sample_batch, ALL_KINDS)
        logits = model(sample_batch)
        final_map, stages = model.forward_intermediates(sample_batch)
        embedding = model.forward_head(final_map, pre_logits=True)
    torch.testing.assert_close(output.logits, logits)
    torch.testing.assert_close(output.embedding, embedding)
    torch.testing.assert_close(model.get_classifier()(embedding), logits)
    assert len(output.stages) == len(stages) == len(output.preact_stages)
    for extracted, plain in zip(output.stages, stages, strict=True):
        torch.testing.assert_close(extracted, plain)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_preact_stages(name, sample_batch):
    model = randomise_batchnorm(build(name))
    with torch.no_grad():
        final_map, pre, post = model.forward_intermediates_preact(sample_batch)
        _, pre_again = model.forward_intermediates(sample_batch, preact=True)
        plain_final, plain_post = model.forward_intermediates(sample_batch)
    torch.testing.assert_close(final_map, plain_final)
    torch.testing.assert_close(pre[0], post[0])  # the stem entry stays post-ReLU
    assert (post[0] >= 0).all()
    for pre_stage, pre_stage_again, post_stage, plain in zip(
        pre[1:], pre_again[1:], post[1:], plain_post[1:], strict=True
    ):
        torch.testing.assert_close(pre_stage_again, pre_stage)
        torch.testing.assert_close(post_stage, plain)
        assert pre_stage.shape == post_stage.shape
        assert (pre_stage < 0).any()
        if name in RELU_OF_PREACT_IS_POST:
            assert not torch.allclose(pre_stage, post_stage)
            torch.testing.assert_close(F.relu(pre_stage), post_stage)
        elif name == "ShuffleV2":
            # mdistiller takes the pre-activation map before the unit's channel shuffle.
            assert not torch.allclose(F.relu(pre_stage), post_stage)
            torch.testing.assert_close(channel_shuffle(F.relu(pre_stage), 2), post_stage)
        else:  # MobileNetV2: linear bottleneck outputs, no ReLU after a stage
            torch.testing.assert_close(pre_stage, post_stage)


def test_resnet50_preact_is_the_last_residual_sum(sample_batch):
    model = randomise_batchnorm(build("ResNet50"))
    with torch.no_grad():
        _, pre, _ = model.forward_intermediates_preact(sample_batch)
        x = model.layer1(F.relu(model.bn1(model.conv1(sample_batch))))
        x = model.layer2[:-1](x)
        block = model.layer2[-1]
        branch = F.relu(block.bn1(block.conv1(x)))
        branch = F.relu(block.bn2(block.conv2(branch)))
        expected = block.bn3(block.conv3(branch)) + x
    torch.testing.assert_close(pre[2], expected)


def test_shufflev2_preact_is_the_unshuffled_concat(sample_batch):
    model = randomise_batchnorm(build("ShuffleV2"))
    with torch.no_grad():
        _, pre, _ = model.forward_intermediates_preact(sample_batch)
        x = model.layer1[:-1](F.relu(model.bn1(model.conv1(sample_batch))))
        unit = model.layer1[-1]
        kept, branch = x[:, :58], x[:, 58:]
        branch = F.relu(unit.bn1(unit.conv1(branch)))
        branch = unit.bn3(unit.conv3(unit.bn2(unit.conv2(branch))))
    torch.testing.assert_close(pre[1], torch.cat([kept, branch], dim=1))


def test_shufflev1_preact_is_branch_plus_identity(sample_batch):
    model = randomise_batchnorm(build("ShuffleV1"))
    with torch.no_grad():
        _, pre, _ = model.forward_intermediates_preact(sample_batch)
        x = model.layer1(F.relu(model.bn1(model.conv1(sample_batch))))
        x = model.layer2[:-1](x)
        block = model.layer2[-1]
        branch = channel_shuffle(F.relu(block.bn1(block.conv1(x))), 3)
        branch = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(branch)))))
    torch.testing.assert_close(pre[2], branch + x)


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV2"])
def test_intermediate_indices(name, sample_batch):
    model = build(name)
    channels = [shape[0] for shape in STAGE_SHAPES[name]]
    with torch.no_grad():
        _, all_features = model.forward_intermediates(sample_batch)
        last_two = model.forward_intermediates(sample_batch, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(sample_batch, indices=[0, -1], intermediates_only=True)
        stem_only = model.forward_intermediates(sample_batch, indices=[0], intermediates_only=True)
        second_pre = model.forward_intermediates(
            sample_batch, indices=[2], intermediates_only=True, preact=True
        )
    assert [f.shape[1] for f in last_two] == channels[-2:]
    torch.testing.assert_close(last_two[1], all_features[-1])
    assert [f.shape[1] for f in picked] == [channels[0], channels[-1]]
    assert len(stem_only) == 1 and stem_only[0].shape[1] == channels[0]
    assert len(second_pre) == 1 and second_pre[0].shape[1] == channels[2]
    with pytest.raises(ValueError):
        model.forward_intermediates(sample_batch, indices=[len(channels)])
    with pytest.raises(ValueError):
        model.forward_intermediates(sample_batch, indices=len(channels) + 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_loads_strictly_into_a_fresh_instance(name, sample_batch):
    source = randomise_batchnorm(build(name))
    target = build(name)
    target.load_state_dict(source.state_dict(), strict=True)
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(sample_batch), source(sample_batch))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grayscale_input(name):
    model = build(name, num_classes=10, in_chans=1)
    first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
        features = model.forward_intermediates(torch.randn(2, 1, 32, 32), intermediates_only=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in features] == STAGE_SHAPES[name]


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet18"])
def test_training_step_through_preact_path(name, sample_batch):
    model = build(name).train()
    output = extract_features(model, sample_batch, ALL_KINDS)
    loss = output.logits.sum() + sum(stage.square().mean() for stage in output.preact_stages[1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unknown_kwargs_rejected(name):
    with pytest.raises(TypeError):
        ZOO[name](num_classes=100, pretrained=True)


def test_weight_init():
    resnet = build("ResNet50")
    for module in resnet.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * k * k))
    weight = resnet.layer3[1].conv2.weight
    expected_std = (2.0 / (256 * 3 * 3)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.02

    mobile = build("MobileNetV2")
    classifier = mobile.get_classifier()[0]
    assert abs(classifier.weight.std().item() / 0.01 - 1) < 0.05
    assert torch.all(classifier.bias == 0)
    depthwise = mobile.blocks[5][1].conv[3].weight  # 480 x 1 x 3 x 3
    assert abs(depthwise.std().item() / (2.0 / (480 * 9)) ** 0.5 - 1) < 0.05
