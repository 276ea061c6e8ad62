"""LSHFM: mimic the teacher's penultimate feature with an L2 loss plus a locality-sensitive-hashing loss."""

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.losses import lsh_loss
from kd_experiments.methods.base import DistillationMethod, require_class_targets
from kd_experiments.models.features import NetworkOutput

BIAS_MODES = ("median", "mean", "zero")
CLASSIFIER_ATTRIBUTES = ("fc", "head", "classifier")


class ProjectedEmbeddingNetwork(nn.Module):
    """A student with LSHFM's `feat_fc` (DoctorKey/LSHFM.singleclassification
    `models/resnet.py`): the network's pooled
    embedding (D_s) -> `feat_fc` Linear(D_s, D_t) -> a new classifier `fc` Linear(D_t, K).

    The projection is part of the deployed student: the classifier reads the projected D_t vector, which is
    also the `embedding` (timm's `pre_logits`) that LSHFM mimics. The wrapped network's own classifier is
    replaced by nn.Identity, so no parameter is left unused (DDP would refuse one). The wrapper has the zoo's
    feature API (forward_features, forward_head(pre_logits=), get_classifier, forward_intermediates), so
    `extract_features` and every other method read it like any zoo model.
    """

    def __init__(self, network: nn.Module, student_dim: int, teacher_dim: int, num_classes: int):
        super().__init__()
        _remove_classifier(network)
        self.network = network
        self.feat_fc = nn.Linear(student_dim, teacher_dim)
        self.fc = nn.Linear(teacher_dim, num_classes)
        self.num_features = teacher_dim
        self.num_classes = num_classes
        if hasattr(network, "fitted_input"):  # a ViT fitted to small images (models.built_name)
            self.fitted_input = network.fitted_input
        if hasattr(network, "forward_intermediates_preact"):  # the zoo's pre-activation stages, if any
            self.forward_intermediates_preact = network.forward_intermediates_preact

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        return self.network.forward_intermediates(x, *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        embedding = self.feat_fc(self.network.forward_head(x, pre_logits=True))
        return embedding if pre_logits else self.fc(embedding)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _remove_classifier(network: nn.Module) -> None:
    """Replace the network's classifier by nn.Identity (timm's `reset_classifier(0)` where it exists)."""
    if hasattr(network, "reset_classifier"):
        network.reset_classifier(0)
        return
    classifier = network.get_classifier()
    for name in CLASSIFIER_ATTRIBUTES:
        if getattr(network, name, None) is classifier:
            setattr(network, name, nn.Identity())
            return
    raise UserError(
        f"LSHFM: cannot find the classifier of {type(network).__name__} (looked for "
        f"{', '.join(CLASSIFIER_ATTRIBUTES)}) to put feat_fc before it"
    )


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum_b m_b l_b / max(sum_b m_b, 1), or the plain mean when there is no mask."""
    if mask is None:
        return per_sample.mean()
    mask = mask.to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1)


class _FeatureMimicking(DistillationMethod):
    """What LSHFM's two terms share: the student projection before the classifier and the selective mask.

    Student projection: if D_s ≠ D_t (or `force_projection`, the official `--force_2FC`), `adapt_student`
    wraps the student in `ProjectedEmbeddingNetwork`: a trainable `feat_fc` Linear(D_s, D_t) before a new
    classifier Linear(D_t, K). Unlike ND, SRD or VkD (side-branch projectors), it stays in the deployed
    student. Adapting is idempotent, so `l2` and `lsh` together wrap the student once.

    `selective=True` (the official default `lshl2_s`) averages the term only over the samples the teacher
    classifies correctly, Σ_b m_b ℓ_b / max(Σ_b m_b, 1) with m_b = 1[argmax z_t,b = y_b]; it needs
    class-index targets. Applied to `l2` and `lsh` separately, their weighted sum is exactly the official
    per-sample formulation.
    """

    student_features = frozenset({"logits", "embedding"})
    teacher_features = frozenset({"logits", "embedding"})  # logits: the selective mask

    def __init__(self, selective: bool = True, force_projection: bool = False):
        super().__init__()
        self.selective, self.force_projection = selective, force_projection

    def adapt_student(
        self, student: nn.Module, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None
    ) -> nn.Module:
        if isinstance(student, ProjectedEmbeddingNetwork):  # the other LSHFM term adapted it already
            return student
        if teacher_probe is None or teacher_probe.embedding is None:
            raise ValueError("LSHFM needs the teacher's embedding to size the student projection")
        student_dim = student_probe.embedding.shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        if student_dim == teacher_dim and not self.force_projection:
            return student
        num_classes = student_probe.logits.shape[1]
        return ProjectedEmbeddingNetwork(student, student_dim, teacher_dim, num_classes)

    def _embeddings_and_mask(self, student: NetworkOutput, teacher: NetworkOutput, targets: torch.Tensor):
        student_emb, teacher_emb = student.embedding, teacher.embedding.detach()
        if student_emb.shape != teacher_emb.shape:
            raise ValueError(
                f"LSHFM: student embedding {tuple(student_emb.shape)} vs teacher {tuple(teacher_emb.shape)}; "
                "the student must be adapted (adapt_student adds feat_fc) before training"
            )
        mask = None
        if self.selective:
            # The selective mask compares the teacher's prediction with the label (or use selective=false).
            require_class_targets(targets, "LSHFM (selective)")
            mask = teacher.logits.argmax(dim=1) == targets
        return student_emb, teacher_emb, mask


class L2Mimicking(_FeatureMimicking):
    """Wang, Ge & Wu, "Distilling Knowledge by Mimicking Features" (TPAMI 2021), Sec. 3.2, the L2 loss on
    the penultimate feature; official code DoctorKey/LSHFM.singleclassification (`distiller_zoo/L2.py`,
    `distiller_zoo/LSH_S.py`, `train_student.py`).

    Term `l2` = MSE_mean(f_s, f_t) over B×D_t, f_s the student's (projected) pooled vector, f_t the
    teacher's. Alone (conf/method/l2.yaml, LSHFM's "L2" baseline, `--distill l2`) it is CE + 6 · L2.
    """

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        student_emb, teacher_emb, mask = self._embeddings_and_mask(student, teacher, targets)
        per_sample = F.mse_loss(student_emb, teacher_emb, reduction="none").mean(dim=1)
        return _masked_mean(per_sample, mask)


class LSHMimicking(_FeatureMimicking):
    """Wang, Ge & Wu, "Distilling Knowledge by Mimicking Features" (TPAMI 2021), Sec. 3.3, the LSH loss;
    official code DoctorKey/LSHFM.singleclassification (`distiller_zoo/LSH.py`, `distiller_zoo/LSH_S.py`,
    `train_student.py`).

    With the frozen hash layer h(f) = W f + b, W ∈ R^{N×D_t}, b ∈ R^N, term `lsh` =
    BCEWithLogits_mean(h(f_s), 1[h(f_t) > 0]) over B×N (`losses.lsh_loss`). The official CIFAR-100 total
    is γ·CE + β·(L2 + LSH) with γ = 1, β = 6: conf/method/lshfm.yaml weights ce 1, l2 6, lsh 6.

    Hash layer (frozen buffers, never parameters): N = `num_hashes`, or 32·D_t when null (CIFAR default);
    W_ij ~ N(0, std²) drawn from a generator seeded with `hash_seed`; `std` null = the standard deviation
    of the teacher classifier's weight (CIFAR default; ImageNet uses 0.06 for R34). `bias`: `median`
    (CIFAR default) b = −median over the training split of W f_t per hash function, so each hyperplane
    splits the teacher's features in half; `mean` b = −mean of W f_t; `zero` b = 0 (ImageNet, detection).
    W and b are teacher statistics: computed once in an eval-mode teacher pass over the training loader
    (with training augmentation, as the official code does) and cached by the framework beside the teacher.

    Reported model: LSHFM's code scores the average of the weights of the last 10 epochs
    (`train_student.py`, `imagenet_lsh.py`): `report=weight_average average_epochs=10`, as the LSHFM
    recipe sets.
    """

    def __init__(
        self,
        selective: bool = True,
        num_hashes: int | None = None,
        std: float | None = None,
        bias: Literal["median", "mean", "zero"] = "median",
        hash_seed: int = 0,
        force_projection: bool = False,
    ):
        super().__init__(selective, force_projection)
        if bias not in BIAS_MODES:
            raise ValueError(f"LSHFM bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}")
        if num_hashes is not None and num_hashes < 1:
            raise ValueError(f"LSHFM num_hashes must be positive or null (32 * D_t), got {num_hashes}")
        if std is not None and std <= 0:
            raise ValueError(f"LSHFM std must be positive or null (teacher fc weight std), got {std}")
        self.num_hashes, self.std, self.bias, self.hash_seed = num_hashes, std, bias, hash_seed
        # Every value the statistics depend on besides the teacher and the data (both in the cache key).
        self.statistics_name = f"lsh_hash-{bias}-n{num_hashes or 'auto'}-std{std or 'fc'}-seed{hash_seed}"
        # Non-persistent, like ND's class centres: they are teacher statistics, not student weights. The
        # checkpoint stays the deployable student (32·D_t² floats would be 8 MB for D_t = 256, far more than
        # the digits student), and resuming needs no copy in it: the framework rebuilds the method through
        # `prepare_teacher_statistics`, which reloads the identical tensors from the cache (keyed by this
        # name, the teacher's sha256 and the data config), and W alone is reproducible from `hash_seed`.
        self.register_buffer("hash_weight", torch.empty(0), persistent=False)
        self.register_buffer("hash_bias", torch.empty(0), persistent=False)

    def compute_teacher_statistics(
        self, teacher: nn.Module, batches: Iterable[tuple[NetworkOutput, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        classifier_weight = getattr(teacher.get_classifier(), "weight", None)
        if self.std is None and not isinstance(classifier_weight, torch.Tensor):
            raise UserError(
                f"LSHFM: the teacher {type(teacher).__name__} has no classifier weight to take the hash "
                "std from; set method.objectives.lsh.std"
            )
        std = self.std if self.std is not None else classifier_weight.detach().float().std().item()
        embeddings = []
        for output, _ in batches:
            embeddings.append(output.embedding.float())
            if self.bias == "zero":
                break  # one batch tells D_t; the bias needs no pass
        embeddings = torch.cat(embeddings)
        teacher_dim = embeddings.shape[1]

        num_hashes = self.num_hashes or 32 * teacher_dim
        generator = torch.Generator().manual_seed(self.hash_seed)
        weight = (torch.randn(num_hashes, teacher_dim, generator=generator) * std).to(embeddings.device)
        if self.bias == "zero":
            bias = weight.new_zeros(num_hashes)
        elif self.bias == "mean":
            bias = -(embeddings.mean(dim=0) @ weight.T)
        else:
            # chunks of hash functions: never hold all samples × N hash values at once
            chunks = [(embeddings @ rows.T).median(dim=0).values for rows in weight.split(1024)]
            bias = -torch.cat(chunks)
        return {"hash_weight": weight, "hash_bias": bias}

    def set_teacher_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        self.hash_weight = statistics["hash_weight"]
        self.hash_bias = statistics["hash_bias"]

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        if self.hash_weight.numel() == 0:
            raise RuntimeError("LSHFM: the hash layer is not set; call set_teacher_statistics first")
        student_emb, teacher_emb, mask = self._embeddings_and_mask(student, teacher, targets)
        per_sample = lsh_loss(student_emb, teacher_emb, self.hash_weight, self.hash_bias, reduction="none")
        return _masked_mean(per_sample, mask)
