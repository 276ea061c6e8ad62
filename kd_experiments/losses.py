"""The pure math of every distillation objective, in the style of torch.nn.functional.

Each function takes tensors and returns a scalar loss; no modules, no state. The method modules in
`kd_experiments.methods` tap features, own projectors and call these.
"""

from typing import Literal

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), the soft-target term.

    L_KD = T^2 * (1/B) * sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T)),
    the KL summed over classes and averaged over the batch ("batchmean"); T^2 keeps the gradient scale
    independent of T (paper, section 2). The teacher side carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _target_vs_rest_log_probs(scaled_logits: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """log [p_y, 1 - p_y] of softmax(scaled_logits), as a B x 2 tensor."""
    # a masked sum, not masked_select: the latter's output size depends on the data, a host sync on a GPU
    target_logit = scaled_logits.masked_fill(~is_target, 0.0).sum(dim=1)
    # logsumexp over the non-target logits gives log(1 - p_y) exactly; computing 1 - p_y from probabilities
    # rounds to 0 for a confident network and its log becomes -inf (the official code's log of summed
    # probabilities has this problem).
    rest_logit = scaled_logits.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    return F.log_softmax(torch.stack([target_logit, rest_logit], dim=1), dim=1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), DKD = alpha * TCKD + beta * NCKD.

    With p = softmax(z_t / T), q = softmax(z_s / T) and y the label of a sample:
      TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])   (target class vs. all the others, a binary KL)
      NCKD = KL(p_hat || q_hat)                     (softmax over the K - 1 non-target classes only)
      L_DKD = T^2 * (1/B) * sum_b (alpha * TCKD_b + beta * NCKD_b).
    The paper's reformulation KD = TCKD + (1 - p_y) * NCKD makes Hinton KD the special case alpha = 1,
    beta = 1 - p_y. Both KLs are summed over their classes and averaged over the batch, as in the official
    mdistiller code; the teacher side carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student_scaled = student_logits / temperature
    teacher_scaled = teacher_logits.detach() / temperature
    is_target = F.one_hot(target, num_classes=student_logits.shape[1]).bool()

    tckd = F.kl_div(
        _target_vs_rest_log_probs(student_scaled, is_target),
        _target_vs_rest_log_probs(teacher_scaled, is_target),
        reduction="batchmean",
        log_target=True,
    )
    # As in the official code, subtracting 1000 (after the division by T) removes the target class from the
    # softmax; -inf would do the same but turns the KL's 0 * (log 0 - log 0) into NaN.
    student_rest_log_probs = F.log_softmax(student_scaled - 1000.0 * is_target, dim=1)
    teacher_rest_log_probs = F.log_softmax(teacher_scaled - 1000.0 * is_target, dim=1)
    nckd = F.kl_div(student_rest_log_probs, teacher_rest_log_probs, reduction="batchmean", log_target=True)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _pearson_per_row(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b; eps is added to the product of the
    centred norms, as in the official DIST code, so a constant row correlates 0 instead of NaN."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    gamma: float,
    temperature: float,
) -> torch.Tensor:
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022).

    With P_s = softmax(z_s / T), P_t = softmax(z_t / T) (B x K) and rho the Pearson correlation:
      L_inter = 1 - (1/B) * sum_b rho(P_s[b, :], P_t[b, :])   (relation between classes, per sample)
      L_intra = 1 - (1/K) * sum_k rho(P_s[:, k], P_t[:, k])   (relation between samples, per class)
      L_DIST = T^2 * (beta * L_inter + gamma * L_intra).
    Only correlations are matched, so the loss is invariant to shifting or scaling the probabilities
    linearly. With a batch of one, every class column is constant and L_intra is the constant 1. The
    teacher side carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student_probs = F.softmax(student_logits / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, dim=1)
    inter_class = 1 - _pearson_per_row(student_probs, teacher_probs).mean()
    intra_class = 1 - _pearson_per_row(student_probs.t(), teacher_probs.t()).mean()
    return temperature**2 * (beta * inter_class + gamma * intra_class)


def nd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    target: torch.Tensor,
    class_centers: torch.Tensor,
) -> torch.Tensor:
    """Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
    (ICCV 2023, arXiv 2305.17007), the ND loss.

    L_ND = (1/B) * sum_b [1 - <s_b, e_{y_b}> / max(|s_b|, |t_b|)],  e_k = c_k / |c_k|,
    where s_b is the student embedding (already projected to the teacher's dimension D), t_b the teacher
    embedding of the same sample and c_k (class_centers, K x D) the mean teacher embedding of class k. If
    |s_b| >= |t_b| the term is the cosine distance to the class centre; otherwise it also rewards growing
    the projection of s_b onto e_{y_b} up to |t_b|. The weight lambda_ND is left to the caller. Only the
    student receives gradients: the teacher embedding enters through its norm alone, and the centres are
    fixed statistics.

    `target` is B class indices, or B x K soft targets (Mixup/CutMix, label smoothing): then the centre is
    mixed like the targets, e_b = normalise(sum_k y_bk c_k), as the ND DeiT++ code does.
    """
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"nd_loss: student and teacher embedding shapes differ: {tuple(student_emb.shape)} vs "
            f"{tuple(teacher_emb.shape)} (project the student embedding to the teacher's dimension)"
        )
    if class_centers.dim() != 2 or class_centers.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"nd_loss: class_centers must be K x {student_emb.shape[1]}, got {tuple(class_centers.shape)}"
        )
    if target.dim() == 2:  # soft targets: the same mixture of class centres
        centres = target.to(class_centers.dtype) @ class_centers.detach()
    else:
        centres = class_centers.detach()[target]
    centre_directions = F.normalize(centres, dim=1)
    projection = (student_emb * centre_directions).sum(dim=1)
    larger_norm = torch.maximum(student_emb.norm(dim=1), teacher_emb.detach().norm(dim=1))
    return (1 - projection / larger_norm).mean()


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), the hint loss L_HT (Sec. 2.2).

    L = mean over all elements of (r(F_s) - F_t)^2, where the caller has already applied the regressor r
    (or a projector) so both tensors share a shape. The paper writes half the summed squared error; the
    element mean is what mdistiller and LSHFM use, and their loss weights (100, 6) assume it. The teacher
    side carries no gradient.
    """
    _check_same_shape(student, teacher, "feature_mse")
    return F.mse_loss(student, teacher.detach())


def hcl_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021), the hierarchical context loss.

    The per-level distance (HCL, Sec. 3) is an MSE over a spatial pyramid of average poolings; as in the
    official code, per level of shape B×C×H×W:

        l = MSE(F_s, F_t) + sum_k w_k * MSE(avgpool_k(F_s), avgpool_k(F_t)),   k in (4, 2, 1) with k < H
        level loss = l / (1 + sum_k w_k),   w_k = 1/2, 1/4, 1/8 for the 1st, 2nd, 3rd pooled size used

    and L_HCL is the SUM of the level losses, not their mean. Pooled sizes not smaller than H are skipped, so
    a 1×1 level (the pooled penultimate vector) is a plain MSE. The teacher side carries no gradient.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"hcl_loss: {len(student_feats)} student levels but {len(teacher_feats)} teacher levels"
        )
    if not student_feats:
        raise ValueError("hcl_loss: no feature levels given")
    total = student_feats[0].new_zeros(())
    for student, teacher in zip(student_feats, teacher_feats, strict=True):
        _check_same_shape(student, teacher, "hcl_loss")
        teacher = teacher.detach()
        height = student.shape[2]
        level_loss = F.mse_loss(student, teacher)
        weight, weight_sum = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= height:
                continue
            weight /= 2.0
            pooled_student = F.adaptive_avg_pool2d(student, (size, size))
            pooled_teacher = F.adaptive_avg_pool2d(teacher, (size, size))
            level_loss = level_loss + weight * F.mse_loss(pooled_student, pooled_teacher)
            weight_sum += weight
        total = total + level_loss / weight_sum
    return total


def _batch_standardise(features: torch.Tensor, eps: float) -> torch.Tensor:
    # BatchNorm1d(affine=False) in training mode: batch statistics with the biased variance.
    mean = features.mean(dim=0, keepdim=True)
    variance = features.var(dim=0, unbiased=False, keepdim=True)
    return (features - mean) / torch.sqrt(variance + eps)


def srd_loss(
    projected_student: torch.Tensor, teacher_emb: torch.Tensor, exponent: float = 4.0, eps: float = 1e-4
) -> torch.Tensor:
    """Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI 2024).

    The representation loss of the official ImageNet code (final commit), with the paper's "soft maximum"
    distance:

        L = log( sum_{b,j} |bn(s)_bj - bn(t)_bj|^p ),   p = `exponent` (4)

    over the B×D batch, where bn standardises each dimension with its own batch mean and biased variance
    plus `eps` (BatchNorm1d(affine=False, eps=1e-4) in training mode, a separate one per side). The official
    loss weight of 2 belongs to the caller. The teacher side carries no gradient.

    Needs B >= 2 (batch statistics), and is -inf when the standardised features coincide exactly.
    """
    _check_same_shape(projected_student, teacher_emb, "srd_loss")
    if projected_student.dim() != 2 or projected_student.shape[0] < 2:
        raise ValueError(
            f"srd_loss: expects B×D embeddings with B >= 2 for batch statistics, "
            f"got {tuple(projected_student.shape)}"
        )
    student_normalised = _batch_standardise(projected_student, eps)
    teacher_normalised = _batch_standardise(teacher_emb.detach(), eps)
    return torch.log((student_normalised - teacher_normalised).abs().pow(exponent).sum())


def vkd_loss(projected_student: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Miles, Elezi & Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections" (CVPR 2024).

    The classification form of the representation loss, as in the official code:

        L = SmoothL1_{beta=1, mean}( s, LN(t) )

    where s is the (orthogonally) projected student embedding, left unnormalised, and LN standardises each
    teacher sample over its D features (layer_norm without affine, eps 1e-5): the paper's task-specific
    normalisation for classification. The teacher side carries no gradient.
    """
    _check_same_shape(projected_student, teacher_emb, "vkd_loss")
    teacher_normalised = F.layer_norm(teacher_emb.detach(), teacher_emb.shape[-1:])
    return F.smooth_l1_loss(projected_student, teacher_normalised, beta=1.0)


def batch_standardised_smooth_l1(projected_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Miles, Elezi & Deng, "VkD" (CVPR 2024), the detection form of the representation loss (roymiles/VkD
    `vidt/methods/vidt/criterion.py`), on tokens (N x C: one row per spatial position or RoI):

        L = SmoothL1_{beta=1, mean}( z(s), z(t) ),   z(x) = (x - mean_0(x)) / std_0(x),

    each channel standardised over the N tokens of the batch on both sides (the paper's task-specific
    normalisation for detection), std unbiased (torch's default, as the official code). The official code
    has no eps; here a constant channel's std is floored at 1e-6 so that it gives 0 instead of NaN. The
    teacher side carries no gradient.
    """
    _check_same_shape(projected_student, teacher, "batch_standardised_smooth_l1")

    def standardise(tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - tokens.mean(dim=0)) / tokens.std(dim=0).clamp_min(1e-6)

    return F.smooth_l1_loss(standardise(projected_student), standardise(teacher.detach()), beta=1.0)


def lsh_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    hash_weight: torch.Tensor,
    hash_bias: torch.Tensor,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Wang, Ge & Wu, "Distilling Knowledge by Mimicking Features" (TPAMI 2021), the LSH loss.

    With the hash layer h(f) = W f + b (W: N×D, b: N):

        L_LSH = BCEWithLogits_mean( h(s), 1[h(t) > 0] )   over the B×N hash bits

    so the student is pushed to the teacher's side of each random hyperplane, constraining mainly the
    feature's direction. The hash layer is frozen: neither W, b nor the teacher receive gradients, even if
    the caller's tensors require grad.

    `reduction="none"` returns the per-sample loss (the mean over the N bits, shape B), which the selective
    variant `lshl2_s` averages over the samples the teacher classifies correctly; its mean over B equals
    the default scalar.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"lsh_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    _check_same_shape(student_emb, teacher_emb, "lsh_loss")
    hash_weight, hash_bias = hash_weight.detach(), hash_bias.detach()
    student_logits = F.linear(student_emb, hash_weight, hash_bias)
    with torch.no_grad():
        teacher_bits = (F.linear(teacher_emb, hash_weight, hash_bias) > 0).to(student_logits.dtype)
    if reduction == "none":
        return F.binary_cross_entropy_with_logits(student_logits, teacher_bits, reduction="none").mean(dim=1)
    return F.binary_cross_entropy_with_logits(student_logits, teacher_bits)
