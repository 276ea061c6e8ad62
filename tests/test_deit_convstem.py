"""The conv-stem DeiT student of SRD/VkD: 196 patch tokens + class + mean token at 224 px, the mean token
is the mean of the patch embeddings, two heads averaged at inference, ViT no-decay names kept."""

import torch

from kd_experiments.models import create_model, extract_features


def test_tokens_heads_and_mean_token_at_224():
    model = create_model("deit_ti_convstem", 10, depth=1).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    captured = {}
    model.patch_embed.register_forward_hook(lambda module, args, out: captured.setdefault("patches", out))
    tokens = model.forward_features(images)
    assert tokens.shape == (2, 198, 192) and captured["patches"].shape == (2, 196, 192)
    assert model.patch_embed.proj[0].kernel_size == (7, 7) and model.patch_embed.proj[-1].stride == (8, 8)
    # Before the blocks: token 1 = mean of the patch embeddings, plus its positional embedding.
    embedded = model._pos_embed(captured["patches"])
    torch.testing.assert_close(embedded[:, 1], captured["patches"].mean(1) + model.pos_embed[:, 1])
    out = extract_features(model, images, frozenset({"distill_logits", "patch_mean"}))
    torch.testing.assert_close(out.logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(out.distill_logits, model.head_dist(tokens[:, 1]))
    torch.testing.assert_close(out.patch_mean, tokens[:, 2:].mean(1))
    torch.testing.assert_close(model(images), (out.logits + out.distill_logits) / 2)
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())


def test_small_input_and_deit_s_width():
    model = create_model("deit_s_convstem", 100, img_size=32, depth=1, in_chans=1)
    assert model.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 2 + 4, 384)
    assert model.head_dist.out_features == 100
