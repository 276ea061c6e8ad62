"""The DeiT student that SRD and VkD report with: a convolutional stem, a second token that is the mean of
the patch tokens (not learned), and a second head on it; inference averages both heads (roymiles/VkD
`models/deit.py`, roymiles/Simple-Recipe-Distillation `deit/models.py`). Built on timm's
VisionTransformer, so timm's feature API, init and no-decay names come with it."""

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kd_experiments.models.registry import register_model

DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE = 224, 16


class ConvStemPatchEmbed(PatchEmbed):
    """Co-advise style stem: conv 7x7 s2 (3 -> 64) + BN + ReLU, two conv 3x3 (64 -> 64) + BN + ReLU, then a
    (patch/2)x(patch/2) conv with the same stride to `embed_dim`: at the default patch 16, VkD's 8x8
    stride-8 conv and DeiT's 16x16 patch grid (14 x 14 tokens at 224 px). A smaller even patch size (a
    ViT fitted to small images) shrinks only that last conv; patch 2 makes it 1x1."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_channels=64, **kwargs):
        if patch_size < 2 or patch_size % 2:
            raise ValueError(
                f"the conv-stem DeiT needs an even patch size >= 2 (its stem halves), got {patch_size}"
            )
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs
        )

        def conv_bn_relu(cin, cout, kernel, stride):
            return [
                nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        last = patch_size // 2
        self.proj = nn.Sequential(
            *conv_bn_relu(in_chans, stem_channels, 7, 2),
            *conv_bn_relu(stem_channels, stem_channels, 3, 1),
            *conv_bn_relu(stem_channels, stem_channels, 3, 1),
            nn.Conv2d(stem_channels, embed_dim, last, stride=last),
        )
        # VkD models/deit.py `init_weight`: kaiming-normal (PyTorch's defaults: fan_in, gain sqrt(2)) on
        # every conv of the stem, the last one included; its bias and the BNs keep PyTorch's defaults.
        for module in self.proj.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)


class MeanTokenDeiT(VisionTransformer):
    """Tokens: [class, mean of the patch tokens, patches...], positional embedding over all of them.
    `head` reads the class token, `head_dist` the mean token (trained by the methods' `distill_logits`
    taps: SRD's and VkD's KL term); `forward` returns the mean of both heads' logits.

    Init as VkD's `models/deit.py`: timm's ViT init (trunc-normal 0.02 Linear weights with zero bias, class
    token N(0, 1e-6), positional embedding trunc-normal 0.02), the stem as `ConvStemPatchEmbed`, and
    `head_dist` like every other Linear (trunc-normal 0.02, zero bias)."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, embed_layer=ConvStemPatchEmbed, class_token=True, **kwargs)
        self.num_prefix_tokens = 2
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, self.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.head_dist = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

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
        self.head_dist = self._new_head(num_classes)

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


for _builder in (deit_ti_convstem, deit_s_convstem):  # read by create_model to fit small images
    _builder.default_image_size, _builder.default_patch_size = DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE
    _builder.patch_multiple = 2
