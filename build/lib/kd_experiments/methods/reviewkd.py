"""ReviewKD: student stages fused top-down by attention (ABF), matched to the teacher's stages with HCL."""

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.losses import hcl_loss
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class AttentionFusion(nn.Module):
    """One ABF block (Chen et al. 2021, Sec. 3.2, Fig. 3; mdistiller
    `mdistiller/distillers/ReviewKD.py`, `ABF`): a 1×1 conv to `mid_channels`; at every level
    but the deepest, a fusion with the (nearest-upsampled) residual from the deeper level, weighted per pixel
    by two sigmoid attention maps; nearest upsampling to the teacher's spatial size when it differs; a 3×3
    conv to the teacher's channels gives this level's prediction. Returns (prediction, residual)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # The official init (kaiming_uniform with a=1) of the two main convs.
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(DistillationMethod):
    """Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021), Eq. 6 (HCL over the ABF
    outputs), as in mdistiller `mdistiller/distillers/ReviewKD.py` and dvlab-research/ReviewKD.

    Levels: each stage's map (the stem dropped) plus the pooled embedding as a C×1×1 map, shallow to deep.
    Student levels are post-ReLU (`student_preact=False`, CIFAR) or pre-ReLU (`True`, the ImageNet setting);
    teacher levels are pre-ReLU (`teacher_preact=True`, official everywhere). The student levels run deepest
    first through a chain of `AttentionFusion` blocks (mid channels = min(512, deepest student channels));
    each block's prediction is matched to the teacher level of the same depth.

    Term `reviewkd` = HCL (`losses.hcl_loss`, summed over levels). mdistiller: the shared CE 1, λ 5 (res32x4
    -> res8x4), warmed up over 20 epochs counted from 1 (`method.warmup.reviewkd`). The ABF chain is a side
    branch, discarded after training.
    """

    def __init__(
        self,
        student_preact: bool = False,
        teacher_preact: bool = True,
        max_mid_channels: int = 512,
    ):
        super().__init__()
        self.student_preact, self.teacher_preact = student_preact, teacher_preact
        self.max_mid_channels = max_mid_channels
        self.student_features = frozenset({"logits", "embedding", self._stage_kind(student_preact)})
        self.teacher_features = frozenset({"embedding", self._stage_kind(teacher_preact)})
        self.fusions = nn.ModuleList()

    @staticmethod
    def _stage_kind(preact: bool) -> str:
        return "preact_stages" if preact else "stages"

    def _levels(self, network: NetworkOutput, preact: bool) -> list[torch.Tensor]:
        stages = network.preact_stages if preact else network.stages
        return [*stages[1:], network.embedding[:, :, None, None]]

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_levels = self._levels(student_probe, self.student_preact)
        teacher_levels = self._levels(teacher_probe, self.teacher_preact)
        if len(student_levels) != len(teacher_levels):
            raise UserError(
                f"ReviewKD matches student and teacher levels one to one, but the student has "
                f"{len(student_levels)} (stages + pooled) and the teacher {len(teacher_levels)}; pick a pair "
                "with the same number of stages"
            )
        in_channels = [level.shape[1] for level in student_levels]
        mid_channels = min(self.max_mid_channels, in_channels[-1])
        # Built shallow to deep; only the deepest block has no residual to fuse.
        self.fusions = nn.ModuleList(
            AttentionFusion(channels, mid_channels, teacher.shape[1], fuse=index < len(in_channels) - 1)
            for index, (channels, teacher) in enumerate(zip(in_channels, teacher_levels, strict=True))
        )
        self._teacher_sizes = [tuple(level.shape[-2:]) for level in teacher_levels]

    def review(self, student_levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF chain (deepest level first, each fused with the residual from below), shallow to deep."""
        predictions: list[torch.Tensor] = []
        residual = None
        for level, fusion, size in zip(
            reversed(student_levels), reversed(self.fusions), reversed(self._teacher_sizes), strict=True
        ):
            prediction, residual = fusion(level, residual, size)
            predictions.insert(0, prediction)
        return predictions

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        predictions = self.review(self._levels(student, self.student_preact))
        return hcl_loss(predictions, self._levels(teacher, self.teacher_preact))
