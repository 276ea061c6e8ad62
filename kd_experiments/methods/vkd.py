"""VkD: an orthogonal projection of the student embedding onto the normalised teacher embedding."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from kd_experiments.losses import vkd_loss
from kd_experiments.methods.base import EMBEDDING_TAPS, DistillationMethod, check_tap
from kd_experiments.models.features import NetworkOutput


class HouseholderStiefel(nn.Module):
    """The parametrisation `torch.nn.utils.parametrizations.orthogonal` gives a non-square real weight (its
    default Householder map, with the trivialisation `base`): the same matrix, the same `right_inverse`
    and the same state-dict entries (`original`, `0.base`), so it loads torch's checkpoints and theirs load
    here. Only the product of the reflectors is computed otherwise: torch's `linalg.householder_product`
    takes 26 s (192 -> 3024) and 49 s (384 -> 3024) per backward pass on one CPU thread, which made VkD's
    ImageNet pairs untrainable on a CPU. Here it is the UT transform (Joffrain, Low, Quintana-Orti, van de
    Geijn & Van Zee, "Accumulating Householder transformations, revisited", ACM TOMS 2006, eq. 4):

        H_1 ... H_k = I - V S^-1 V^T,   S = triu(V^T V, 1) + diag(V^T V) / 2,

    V the n x k reflectors (unit diagonal, as LAPACK stores them below it), i.e. two matrix products and a
    triangular solve, in float64 whatever the autocast (the product must stay orthogonal)."""

    base: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("base", None)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        transposed = weight.shape[-2] < weight.shape[-1]
        tall = weight.mT if transposed else weight
        with torch.autocast(tall.device.type, enabled=False):
            # float64: in float32 the UT transform leaves P^T P - I at ~5e-5 after one optimizer step
            # (the Householder product of torch: ~2e-6); in float64, 1e-7 once cast back
            product = _householder_product(tall.double()).to(torch.float32)
            # torch's map: the diagonal of the unconstrained tensor (+-1) signs the columns, no gradient
            product = product * tall.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)
            product = self.base @ product
        return product.mT if transposed else product

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """As torch's: `base` becomes an n x n orthogonal matrix whose first k columns are the Q factor of
        the (tall) weight, the rest completed at random; the unconstrained tensor starts at -I."""
        tall = weight.mT if weight.shape[-2] < weight.shape[-1] else weight
        n, k = tall.shape
        completed = torch.cat([tall, torch.randn(n, n - k, dtype=tall.dtype, device=tall.device)], dim=-1)
        reflectors, tau = torch.geqrf(completed)
        base = torch.linalg.householder_product(reflectors, tau)  # no autograd here: fast
        self.base = base * reflectors.diagonal().sgn().unsqueeze(-2)
        start = torch.zeros_like(weight)
        start.diagonal().fill_(-1.0)
        return start


def orthogonal_linear(linear: nn.Linear) -> nn.Linear:
    """`parametrizations.orthogonal(linear)` with torch's default map: the matrix exponential for a square
    weight, Householder for a non-square one (computed by `HouseholderStiefel`)."""
    if linear.in_features == linear.out_features:
        return orthogonal(linear)
    parametrize.register_parametrization(linear, "weight", HouseholderStiefel(), unsafe=True)
    return linear


def _householder_product(tall: torch.Tensor) -> torch.Tensor:
    """`linalg.householder_product(A, tau)` for torch's Householder map: A = tall.tril(-1), tau = 2 / (1 +
    |A_i|^2), so tau_i = 2 / |v_i|^2 with v_i = A_i + e_i: the UT transform (see HouseholderStiefel)."""
    n, k = tall.shape
    identity = torch.eye(n, k, dtype=tall.dtype, device=tall.device)
    reflectors = tall.tril(diagonal=-1) + identity
    gram = reflectors.mT @ reflectors
    triangle = gram.triu(diagonal=1) + torch.diag(gram.diagonal() / 2)
    return identity - reflectors @ torch.linalg.solve_triangular(triangle, reflectors[:k].mT, upper=True)


class OrthogonalProjection(DistillationMethod):
    """Miles, Elezi & Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections" (CVPR
    2024), the representation term of the official classification code (roymiles/VkD `engine.py`,
    `train.py`):

        vkd = SmoothL1(P f_s, LN(f_t))   (`losses.vkd_loss`)

    with P a D_t x D_s matrix on the Stiefel manifold: orthonormal columns (P^T P = I) when D_t >= D_s,
    orthonormal rows (P P^T = I) otherwise (`torch.nn.utils.parametrizations.orthogonal`, as `train.py`;
    for a non-square P its map, computed by `HouseholderStiefel`).
    With `normalize_teacher=False` the target is the raw f_t (an ablation). The official total is L_ce +
    L_kl + L_rep, all weights 1: the method YAML adds the shared `ce` and a `kd` term (`HintonKD` at T = 1).

    `student_embedding` as in `SimpleRecipeDistillation` (`patch_mean` for a DeiT student, as VkD's DeiT
    code). `projector="linear"` replaces P by an unconstrained Linear without bias (the ablation of the
    orthogonality constraint); `projector="mlp"` by Linear -> BN -> ReLU -> Linear (hidden width
    max(D_s, D_t); this project's choice of an MLP projector for the ablation). The projector is a side
    branch, discarded after training.
    """

    teacher_features = frozenset({"embedding"})

    def __init__(
        self,
        projector: Literal["orthogonal", "linear", "mlp"] = "orthogonal",
        normalize_teacher: bool = True,
        student_embedding: str = "embedding",
    ):
        super().__init__()
        self.student_embedding = check_tap(student_embedding, EMBEDDING_TAPS, "student_embedding")
        self.student_features = frozenset({student_embedding})
        if projector not in ("orthogonal", "linear", "mlp"):
            raise ValueError(f"VkD projector must be 'orthogonal', 'linear' or 'mlp', got {projector!r}")
        self.projector_kind = projector
        self.normalize_teacher = normalize_teacher
        self.projector: nn.Module = nn.Identity()

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_dim = getattr(student_probe, self.student_embedding).shape[1]
        teacher_dim = teacher_probe.embedding.shape[1]
        if self.projector_kind == "mlp":  # the ablation's non-linear projector: Linear-BN-ReLU-Linear
            hidden = max(student_dim, teacher_dim)
            self.projector = nn.Sequential(
                nn.Linear(student_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, teacher_dim),
            )
            return
        linear = nn.Linear(student_dim, teacher_dim, bias=False)
        self.projector = linear if self.projector_kind == "linear" else orthogonal_linear(linear)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        projected = self.projector(getattr(student, self.student_embedding))
        if self.normalize_teacher:
            return vkd_loss(projected, teacher.embedding)
        return F.smooth_l1_loss(projected, teacher.embedding.detach(), beta=1.0)
