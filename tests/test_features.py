"""Feature taps: pre-/post-activation stages, ViT tokens and the second DeiT head, from one mechanism for
the zoo and timm models; the same values under torch.compile; clear errors for impossible requests."""

import pytest
import torch
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.models import create_model, extract_features

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """timm zero-initialises each block's last BN, which makes the pre-activation sum non-negative at
    init; random affine parameters make pre- and post-activation maps differ."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.randn(module.weight.shape, generator=generator)
            module.bias.data = torch.randn(module.bias.shape, generator=generator)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet8x4", "resnet20", "convnet_wide", "resnet18", "resnet50"])
def test_preact_stages_are_the_maps_before_each_stage_relu(name):
    model = randomise_batchnorm(create_model(name, 10))
    both = extract_features(model, IMAGES, frozenset({"stages", "preact_stages"}))
    post_only = extract_features(model, IMAGES, frozenset({"stages"}))
    assert len(both.preact_stages) == len(post_only.stages) >= 4
    torch.testing.assert_close(both.preact_stages[0], post_only.stages[0])  # the stem stays post-ReLU
    for pre, post, reference in zip(
        both.preact_stages[1:], both.stages[1:], post_only.stages[1:], strict=True
    ):
        assert pre.shape == post.shape
        assert (pre < 0).any()  # really before the ReLU
        torch.testing.assert_close(torch.relu(pre), post)
        torch.testing.assert_close(post, reference)
    torch.testing.assert_close(both.logits, model(IMAGES))


def test_timm_preact_stage_is_the_residual_sum_of_the_last_block():
    model = randomise_batchnorm(create_model("resnet18", 10))
    preact = extract_features(model, IMAGES, frozenset({"preact_stages"})).preact_stages
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(IMAGES))))
        x = model.layer2[0](model.layer1(x))
        block = model.layer2[1]
        expected = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x))))) + x
    torch.testing.assert_close(preact[2], expected)


def test_vit_tokens_class_token_and_mean_of_patch_tokens():
    model = create_model("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=2).eval()
    out = extract_features(model, IMAGES, frozenset({"class_token", "patch_mean"}))
    tokens = model.forward_features(IMAGES)  # B x (1 + 16) x 192, after the final norm
    assert tokens.shape == (2, 17, 192)
    torch.testing.assert_close(out.class_token, tokens[:, 0])
    torch.testing.assert_close(out.patch_mean, tokens[:, 1:].mean(1))
    torch.testing.assert_close(out.logits, model(IMAGES))


def test_distilled_deit_two_heads():
    model = create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=2).eval()
    out = extract_features(model, IMAGES, frozenset({"distill_logits", "patch_mean"}))
    tokens = model.forward_features(IMAGES)  # class token, distillation token, 16 patch tokens
    torch.testing.assert_close(out.logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(out.distill_logits, model.head_dist(tokens[:, 1]))
    torch.testing.assert_close(out.patch_mean, tokens[:, 2:].mean(1))
    # Inference (what validation measures) averages both heads.
    torch.testing.assert_close(model(IMAGES), (out.logits + out.distill_logits) / 2)
    # A method that reads logits alone (CE, KD on a one-head tap) trains the deployed output, the mean of
    # both heads, so no head stays untrained; the class head alone only comes with distill_logits.
    alone = extract_features(model, IMAGES, frozenset({"logits"})).logits
    torch.testing.assert_close(alone, (out.logits + out.distill_logits) / 2)
    assert not torch.allclose(alone, out.logits)


@pytest.mark.parametrize(
    "name, needs, message",
    [
        ("resnet8", {"patch_mean"}, "not ViT tokens"),
        ("vit_tiny_patch16_224", {"distill_logits"}, "has one head"),
        ("regnety_002", {"preact_stages"}, "pre-activation stage features are available"),
    ],
)
def test_impossible_feature_requests_are_one_line_user_errors(name, needs, message):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1} if "vit" in name else {}
    model = create_model(name, 10, **kwargs).eval()
    with pytest.raises(UserError, match=message) as error:
        extract_features(model, IMAGES, frozenset(needs))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name, needs",
    [
        ("resnet18", {"preact_stages", "stages"}),
        ("resnet8x4", {"preact_stages"}),
        ("deit_tiny_distilled_patch16_224", {"distill_logits", "patch_mean"}),
    ],
)
def test_taps_give_the_same_values_under_torch_compile(name, needs):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2} if "deit" in name else {}
    model = randomise_batchnorm(create_model(name, 10, **kwargs))
    needs = frozenset(needs)
    eager = extract_features(model, IMAGES, needs)
    compiled = torch.compile(lambda images: extract_features(model, images, needs), backend="aot_eager")(
        IMAGES
    )
    for kind in needs | {"logits"}:
        expected, actual = getattr(eager, kind), getattr(compiled, kind)
        for e, a in zip(expected if isinstance(expected, list) else [expected],
                        actual if isinstance(actual, list) else [actual], strict=True):  # fmt: skip
            torch.testing.assert_close(a, e)


def test_hooked_taps_train_under_ddp(workdir):
    """Two CPU processes (gloo): ReviewKD reads a timm ResNet teacher's hooked pre-activation stages and
    trains its ABF chain with the student, wrapped by DDP (which fails on unused or mismatched params)."""
    from tests.conftest import run_cli

    result = run_cli(
        "method=reviewkd", "dataset.image_size=32", "dataset.channels=3", "teacher.arch=resnet18",
        "teacher.weights=random", "student.arch=resnet10t", "trainer.max_epochs=1", "logger=csv",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "++trainer.limit_val_batches=2", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(workdir.glob("outputs/runs/*/*/"))
    assert "Starting with 2 processes" in result.stdout + result.stderr
    summary = (run_dir / "summary.json").read_text()
    assert '"status": "completed"' in summary and '"steps": 3' in summary  # 359 images / (2 x 64) per step
    metrics = (run_dir / "csv/metrics.csv").read_text()
    assert "train/reviewkd" in metrics


def test_timm_mobilenet_v1_preact_stages_end_before_relu6():
    model = randomise_batchnorm(create_model("mobilenetv1_100", 10))
    out = extract_features(model, IMAGES, frozenset({"preact_stages", "stages"}))
    assert [t.shape[1] for t in out.preact_stages] == [64, 128, 256, 512, 1024]
    for pre, post in zip(out.preact_stages[1:], out.stages[1:], strict=True):
        assert (pre < 0).any()  # before the ReLU6
        torch.testing.assert_close(pre.clamp(0, 6), post)
