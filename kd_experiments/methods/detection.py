"""Distillation objectives for detectors (the detection task, `kd_experiments/detection/`).

They follow the classification contract (`DistillationMethod`: declared features, `setup` with one probe
batch, `forward(student, teacher, targets) -> scalar`), with `detection.features.DetectorOutput` for the
network outputs and the detection feature kinds (`fpn`, `roi_pooled`, `roi_embedding`, `roi_logits`). The
teacher's RoI features are computed on the student's sampled RoIs, so RoI rows correspond one to one.

A detection method lists the student's own detector losses as the term `detection` (`DetectorLosses`),
weighted like any term; an objective that needs the teacher's weights (LSH's hash std) gets the teacher in
`bind_teacher` once its weights are loaded.
"""

import torch
from torch import nn

from kd_experiments.losses import batch_standardised_smooth_l1, feature_mse, kd_loss, lsh_loss
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.methods.vkd import orthogonal_linear


class DetectionObjective(DistillationMethod):
    """A detection objective; `bind_teacher(teacher)` is called once with the teacher detector, its
    weights loaded, before training (after `setup`)."""

    student_features = frozenset()
    teacher_features = frozenset()

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Read what the objective needs from the teacher's weights; by default nothing."""


class DetectorLosses(DetectionObjective):
    """The detector's own training loss: torchvision Faster R-CNN's RPN objectness + RPN box regression +
    RoI classification + RoI box regression, each a mean as torchvision computes it and summed with weight
    1 (Ren et al., "Faster R-CNN", NeurIPS 2015, eq. 1 with lambda = 1; torchvision's and LSHFM's
    `sum(losses.values())`). The module logs the four parts."""

    def forward(self, student, teacher, targets) -> torch.Tensor:
        return sum(student.losses.values())


class RoIFeatureL2(DetectionObjective):
    """LSHFM's L2 feature mimicking for detection: Wang, Ge & Wu, "Distilling Knowledge by Mimicking
    Features" (TPAMI 2021), Sec. 3.2 (L2 loss); DoctorKey/LSHFM.detection `src/model/KD/L2.py` on the box
    features of `src/model/faster_rcnn_KD.py`:

        L = MSE_mean(e_s, e_t)  over R x D,

    e = the box head's output (`roi_embedding`, 1024-d) of each RoI the student sampled, for student and
    teacher alike. LSHFM's `--beta` (7 in every detection script) is this term's weight. The student and
    teacher box heads must have the same width (LSHFM's pairs do); no projector is added."""

    student_features = frozenset({"roi_embedding"})
    teacher_features = frozenset({"roi_embedding"})

    def setup(self, student_probe, teacher_probe) -> None:
        _check_widths(student_probe.roi_embedding, teacher_probe.roi_embedding, "roi_embedding")

    def forward(self, student, teacher, targets) -> torch.Tensor:
        return feature_mse(student.roi_embedding, teacher.roi_embedding)


class RoIFeatureLSH(DetectionObjective):
    """LSHFM's LSH loss for detection (TPAMI 2021, Sec. 3.3; DoctorKey/LSHFM.detection
    `src/model/KD/LSH.py`): a frozen random hash layer h(e) = W e + b, W ~ N(0, std^2) of N x D, and

        L = BCEWithLogits_mean( h(e_s), 1[h(e_t) > 0] )  over R x N,

    on the RoI box features as `RoIFeatureL2`. Detection defaults (`src/train.py`, the `*_lsh*.sh` scripts):
    N = 4 D (`hash_num` None -> feature_dim * 4), std = the std of the teacher's RoI classifier weight
    (`cls_score`), b = 0 (`--bias 0`). `hash_seed` draws W independently of the run's seed."""

    student_features = frozenset({"roi_embedding"})
    teacher_features = frozenset({"roi_embedding"})

    def __init__(self, num_hashes: int | None = None, std: float | None = None, hash_seed: int = 0):
        super().__init__()
        if num_hashes is not None and num_hashes <= 0:
            raise ValueError(f"num_hashes must be positive, got {num_hashes}")
        if std is not None and std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.num_hashes, self.std, self.hash_seed = num_hashes, std, hash_seed
        self.register_buffer("hash_weight", torch.empty(0))
        self.register_buffer("hash_bias", torch.empty(0))
        self.register_buffer("hash_std", torch.tensor(float("nan")))

    def setup(self, student_probe, teacher_probe) -> None:
        width = _check_widths(student_probe.roi_embedding, teacher_probe.roi_embedding, "roi_embedding")
        hashes = self.num_hashes or 4 * width
        generator = torch.Generator().manual_seed(self.hash_seed)
        # Unit normals now, scaled by the std once it is known (the teacher's weights arrive later).
        self.hash_weight = torch.randn(hashes, width, generator=generator)
        self.hash_bias = torch.zeros(hashes)
        if self.std is not None:
            self._scale(self.std)

    def bind_teacher(self, teacher: nn.Module) -> None:
        if self.std is None:
            self._scale(teacher.roi_heads.box_predictor.cls_score.weight.detach().std().item())

    def _scale(self, std: float) -> None:
        if not torch.isnan(self.hash_std):  # a checkpoint restored the scaled weights already
            return
        self.hash_weight = self.hash_weight * std
        self.hash_std = torch.tensor(float(std))

    def forward(self, student, teacher, targets) -> torch.Tensor:
        return lsh_loss(student.roi_embedding, teacher.roi_embedding, self.hash_weight, self.hash_bias)


class RoILogitKD(DetectionObjective):
    """Hinton KD on the RoI classifier: Hinton et al. 2015 (the soft-target term) applied per sampled RoI,
    over the K + 1 classes including the background, as Chen et al. ("Learning Efficient Object Detection
    Models with Knowledge Distillation", NeurIPS 2017, Sec. 3.1) distil a Faster R-CNN's classifier:

        L = T^2 * mean over RoIs of KL( softmax(z_t / T) || softmax(z_s / T) )."""

    student_features = frozenset({"roi_logits"})
    teacher_features = frozenset({"roi_logits"})

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def setup(self, student_probe, teacher_probe) -> None:
        _check_widths(student_probe.roi_logits, teacher_probe.roi_logits, "roi_logits (class count)")

    def forward(self, student, teacher, targets) -> torch.Tensor:
        return kd_loss(student.roi_logits, teacher.roi_logits, self.temperature)


def _check_widths(student: torch.Tensor, teacher: torch.Tensor, what: str) -> int:
    if student.shape[1:] != teacher.shape[1:]:
        raise ValueError(
            f"student {what} is {tuple(student.shape[1:])} wide but the teacher's is "
            f"{tuple(teacher.shape[1:])}; give both detectors the same representation_size"
        )
    return student.shape[1]


class ScaledOrthogonal(nn.Module):
    """VkD's detection projector (roymiles/VkD `vidt/main.py` `OrthogonalLinear`): an orthogonal Linear
    without bias followed by a learnable per-channel scale (init 1) and bias (init 0)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.rotation = orthogonal_linear(nn.Linear(in_features, out_features, bias=False))
        self.scale = nn.Parameter(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rotation(tokens) * self.scale + self.bias


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> (B H W) x C: one token per position, as VkD flattens ViDT's patch maps."""
    return feature_map.flatten(2).transpose(1, 2).flatten(0, 1)


class BatchStandardisedMimic(DetectionObjective):
    """VkD for detection, transferred from ViDT to Faster R-CNN: Miles, Elezi & Deng, "VkD: Improving
    Knowledge Distillation using Orthogonal Projections" (CVPR 2024), the detection loss of roymiles/VkD
    (`vidt/methods/vidt/criterion.py`, `vidt/main.py`):

        L = sum over tapped groups g of SmoothL1_mean( z(P_g s_g), z(t_g) )

    (`losses.batch_standardised_smooth_l1`), z the per-channel standardisation over the batch's tokens,
    P_g an orthogonal projection with a per-channel scale and bias (`ScaledOrthogonal`, one per group,
    trained with the student and discarded after). The groups: each FPN level in `levels` (ViDT's four
    multi-scale patch maps, strides 8-64, are this detector's FPN levels: teacher level indices, each paired
    with the student level of the same stride; null = every stride both detectors have), one token per
    position; and with `roi_embedding` the box-head features of the student's sampled RoIs (ViDT's
    detection tokens, whose nearest Faster R-CNN counterpart they are). VkD weighs the summed term 4.0
    (`--distil_loss_coef`)."""

    def __init__(self, levels: list[int] | None = None, roi_embedding: bool = True):
        super().__init__()
        self.levels = None if levels is None else [int(level) for level in levels]
        self.roi_embedding = roi_embedding
        kinds = {"fpn"} | ({"roi_embedding"} if roi_embedding else set())
        self.student_features = self.teacher_features = frozenset(kinds)
        self.projectors = nn.ModuleList()
        self.student_levels: list[int] = []  # the student level paired with each tapped teacher level
        self.roi_projector: nn.Module | None = None

    def setup(self, student_probe, teacher_probe) -> None:
        """Pair each tapped teacher level with the student level of the same stride (the same map size:
        both see the same resized batch), e.g. a ResNet-FPN teacher's strides 4-64 and a MobileNet-FPN
        student's 8-64."""
        student_maps, teacher_maps = student_probe.fpn, teacher_probe.fpn
        by_size = {tuple(m.shape[2:]): index for index, m in enumerate(student_maps)}
        shared = [index for index, m in enumerate(teacher_maps) if tuple(m.shape[2:]) in by_size]
        self.levels = self.levels if self.levels is not None else shared
        if not self.levels:
            raise ValueError("the student and the teacher have no feature level of the same stride")
        self.student_levels = []
        for level in self.levels:
            if level not in shared:
                raise ValueError(
                    f"teacher level {level} does not exist or has no student level of the same stride; "
                    f"levels both detectors have: {shared}"
                )
            student_level = by_size[tuple(teacher_maps[level].shape[2:])]
            self.student_levels.append(student_level)
            channels = student_maps[student_level].shape[1], teacher_maps[level].shape[1]
            self.projectors.append(ScaledOrthogonal(*channels))
        if self.roi_embedding:
            width_s, width_t = student_probe.roi_embedding.shape[1], teacher_probe.roi_embedding.shape[1]
            self.roi_projector = ScaledOrthogonal(width_s, width_t)

    def forward(self, student, teacher, targets) -> torch.Tensor:
        total = 0.0
        pairs = zip(self.student_levels, self.levels, self.projectors, strict=True)
        for student_level, level, projector in pairs:
            projected = projector(_tokens(student.fpn[student_level]))
            total = total + batch_standardised_smooth_l1(projected, _tokens(teacher.fpn[level]))
        if self.roi_projector is not None:
            projected = self.roi_projector(student.roi_embedding)
            total = total + batch_standardised_smooth_l1(projected, teacher.roi_embedding)
        return total
