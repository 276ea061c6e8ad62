"""The ND regulariser: pull the student embedding towards its teacher class centre (direction and norm)."""

from collections.abc import Iterable

import torch
from torch import nn

from kd_experiments.losses import nd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


class EmbeddingProjector(nn.Sequential):
    """ND's "EmbTrans" side branch, BN -> Dropout(0.5) -> Linear(D_s -> D_t), used only for the ND term
    (the student's classifier reads the raw embedding) and discarded after training. `init="cifar"`: BN
    weight 1, bias 0, Linear default weights with bias 0 (ND CIFAR code); `"imagenet"`: Linear weight and
    bias ~ N(0, 0.01) (ND ImageNet code)."""

    def __init__(self, student_dim: int, teacher_dim: int, init: str = "cifar"):
        super().__init__(nn.BatchNorm1d(student_dim), nn.Dropout(0.5), nn.Linear(student_dim, teacher_dim))
        if init not in ("cifar", "imagenet"):
            raise ValueError(f"ND projector_init must be 'cifar' or 'imagenet', got {init!r}")
        if init == "imagenet":
            nn.init.normal_(self[2].weight, std=0.01)
            nn.init.normal_(self[2].bias, std=0.01)
        else:
            nn.init.zeros_(self[2].bias)


class NormDirection(DistillationMethod):
    """Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (ICCV
    2023), Eq. 7 (`losses.nd_loss`); official code WangYZ1608/Knowledge-Distillation-via-ND
    `CIFAR/utils.py` (`DirectNormLoss`). Term: `nd`, added beside a base objective (KD++ = {kd, nd},
    DKD++, DIST++, ReviewKD++); on its own it does not train the classifier. The ImageNet DKD++ script
    warms it up with the DKD term (`method.warmup.nd`).

    Teacher statistics: the per-class mean of the teacher's embedding over the training split (training
    augmentation, eval mode, one pass), computed once and cached by the framework.

    `student_embedding` names the student feature ND reads (`base.EMBEDDING_TAPS`): `embedding` (default)
    is the pooled vector the classifier reads; for timm's two-headed DeiT that is the mean of the class and
    distillation tokens after the final norm, ND's DeiT++ embedding. A ViT student may instead use
    `class_token` or `patch_mean`.
    """

    student_features = frozenset({"embedding"})
    teacher_features = frozenset({"embedding"})
    statistics_name = "class_centers"

    def __init__(self, projector_init: str = "cifar", student_embedding: str = "embedding"):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.student_features = frozenset({student_embedding})
        self.projector_init = projector_init
        self.projector: nn.Module = nn.Identity()
        self.register_buffer("class_centers", torch.empty(0), persistent=False)

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_dim = getattr(student_probe, self.student_embedding).shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        if student_dim != teacher_dim:
            self.projector = EmbeddingProjector(student_dim, teacher_dim, self.projector_init)

    def compute_teacher_statistics(
        self, teacher: nn.Module, batches: Iterable[tuple[NetworkOutput, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        sums, counts = None, None
        for output, labels in batches:
            embedding = output.embedding
            if sums is None:
                sums = embedding.new_zeros(teacher.num_classes, embedding.shape[1])
                counts = embedding.new_zeros(teacher.num_classes)
            labels = labels.to(embedding.device)
            sums.index_add_(0, labels, embedding)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=embedding.dtype))
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"ND class centres: no training images of classes {missing[:10]}")
        return {"class_centers": sums / counts[:, None]}

    def set_teacher_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        self.class_centers = statistics["class_centers"]

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        projected = self.projector(getattr(student, self.student_embedding))
        return nd_loss(projected, teacher.embedding, targets, self.class_centers)
