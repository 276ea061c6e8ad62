import pytest
import torch

from kd_experiments.errors import UserError
from kd_experiments.models import ZOO, create_model, extract_features


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet56", "resnet8x4", "resnet32x4"])
def test_required_zoo_models_exist(name):
    model = create_model(name, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_zoo_and_timm_models_expose_the_same_features():
    images = torch.randn(2, 3, 32, 32)
    needs = frozenset({"logits", "embedding", "stages"})
    for name, embedding_dim in (("resnet8x4", 256), ("resnet18", 512)):  # zoo, timm
        model = create_model(name, num_classes=7).eval()
        out = extract_features(model, images, needs)
        assert out.logits.shape == (2, 7)
        assert out.embedding.shape == (2, embedding_dim)
        assert len(out.stages) >= 4 and all(s.dim() == 4 and s.shape[0] == 2 for s in out.stages)
        # the feature path computes the same logits as a plain forward
        torch.testing.assert_close(out.logits, model(images))


def test_logits_only_is_one_plain_forward():
    model = create_model("convnet_narrow", num_classes=10, in_chans=1).eval()
    images = torch.randn(3, 1, 8, 8)
    out = extract_features(model, images, frozenset({"logits"}))
    assert out.embedding is None and out.stages is None
    torch.testing.assert_close(out.logits, model(images))


def test_default_digits_pair_stage_shapes():
    images = torch.randn(2, 1, 8, 8)
    teacher = create_model("convnet_wide", num_classes=10, in_chans=1)
    student = create_model("convnet_narrow", num_classes=10, in_chans=1)
    t = extract_features(teacher, images, frozenset({"stages", "embedding"}))
    s = extract_features(student, images, frozenset({"stages", "embedding"}))
    assert [tuple(m.shape[1:]) for m in t.stages] == [(32, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert [tuple(m.shape[1:]) for m in s.stages] == [(4, 8, 8), (8, 8, 8), (8, 4, 4), (16, 2, 2)]
    assert sum(p.numel() for p in teacher.parameters()) > 50 * sum(p.numel() for p in student.parameters())


def test_unknown_model_is_a_user_error_naming_the_options():
    with pytest.raises(UserError, match="unknown model 'resnet9000'.*resnet20"):
        create_model("resnet9000", num_classes=10)


def test_zoo_models_have_no_pretrained_tags():
    with pytest.raises(UserError, match="teacher.checkpoint"):
        create_model("resnet20", num_classes=10, pretrained="imagenet")
    assert "resnet20" in ZOO and "convnet_wide" in ZOO
