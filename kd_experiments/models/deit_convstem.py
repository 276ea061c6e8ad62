"""The DeiT student that SRD and VkD report with: a convolutional stem, a second token that is the mean of
the patch tokens (not learned), and a second head on it; inference averages both heads (methods.md e.3,
f.1). Built on timm's VisionTransformer, so timm's feature API, init and no-decay names come with it."""

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kd_experiments.models.registry import register_model


class ConvStemPatchEmbed(PatchEmbed):
    """Co-advise style stem: conv 7x7 s2 (3 -> 64) + BN + ReLU, two conv 3x3 (64 -> 64) + BN + ReLU, then an
    8x8 stride-8 conv to `embed_dim`: the same 16x16 patch grid as DeiT (14 x 14 tokens at 224 px)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_channels=64, **kwargs):
        super().__init__(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=embed_dim, **kwargs)

        def conv_bn_relu(cin, cout, kernel, stride):
            return [
                nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.proj = nn.Sequential(
            *conv_bn_relu(in_chans, stem_channels, 7, 2),
            *conv_bn_relu(stem_channels, stem_channels, 3, 1),
            *conv_bn_relu(stem_channels, stem_channels, 3, 1),
            nn.Conv2d(stem_channels, embed_dim, 8, stride=8),
        )


class MeanTokenDeiT(VisionTransformer):
    """Tokens: [class, mean of the patch tokens, patches...], positional embedding over all of them.
    `head` reads the class token, `head_dist` the mean token (trained by the methods' `distill_logits`
    taps: SRD's and VkD's KL term); `forward` returns the mean of both heads' logits."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, embed_layer=ConvStemPatchEmbed, class_token=True, **kwargs)
        self.num_prefix_tokens = 2
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, self.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # timm's ViT init
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        patches = x
        if patches.dim() == 4:  # B x H x W x C when the patch embed keeps the grid
            patches = patches.flatten(1, 2)
        mean_token = patches.mean(dim=1, keepdim=True)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), mean_token, patches], dim=1)
        return self.pos_drop(tokens + self.pos_embed)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        class_token, mean_token = x[:, 0], x[:, 1]
        if pre_logits:
            return (class_token + mean_token) / 2
        return (self.head(class_token) + self.head_dist(mean_token)) / 2


def _build(embed_dim: int, num_heads: int, num_classes: int, in_chans: int, **kwargs) -> MeanTokenDeiT:
    kwargs.setdefault("depth", 12)
    return MeanTokenDeiT(
        num_classes=num_classes, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads, **kwargs
    )


@register_model("deit_ti_convstem")
def deit_ti_convstem(num_classes: int, in_chans: int = 3, **kwargs) -> MeanTokenDeiT:
    return _build(192, 3, num_classes, in_chans, **kwargs)


@register_model("deit_s_convstem")
def deit_s_convstem(num_classes: int, in_chans: int = 3, **kwargs) -> MeanTokenDeiT:
    return _build(384, 6, num_classes, in_chans, **kwargs)
