"""DKD, DIST and ND: hand-computed values on tiny tensors, plus the invariants each paper relies on."""

import math

import pytest
import torch

from kd_experiments.losses import dist_loss, dkd_loss, kd_loss, nd_loss

LN = math.log

# ---------------------------------------------------------------------------------------------------------
# DKD


def test_dkd_loss_matches_hand_computation():
    # Row 1, target 0, T = 1:
    #   teacher ln[2, 1, 1] -> p = [1/2, 1/4, 1/4]; student ln[1, 3, 1] -> q = [1/5, 3/5, 1/5]
    #   binary:     b_t = [1/2, 1/2], b_s = [1/5, 4/5]
    #               TCKD = 1/2 ln(5/2) + 1/2 ln(5/8) = 1/2 ln(25/16) = ln(5/4)
    #   non-target: p_hat = [1/2, 1/2], q_hat = [3/4, 1/4]
    #               NCKD = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    # Row 2, target 2: identical logits, contributes 0.
    # alpha = 1, beta = 8: (ln(5/4) + 4 ln(4/3)) / 2 (batch mean)
    student = torch.tensor([[0.0, LN(3), 0.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[LN(2), 0.0, 0.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 2])
    expected = (LN(5 / 4) + 4 * LN(4 / 3)) / 2  # 0.686936
    loss = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Doubling the logits at T = 2 gives the same probabilities, so only the T^2 = 4 factor changes.
    loss_t2 = dkd_loss(2 * student, 2 * teacher, target, alpha=1.0, beta=8.0, temperature=2.0)
    assert loss_t2.item() == pytest.approx(4 * expected, abs=1e-5)


def test_dkd_loss_alpha_weights_tckd_and_beta_weights_nckd():
    # Same row 1 as above, alone: TCKD = ln(5/4), NCKD = 1/2 ln(4/3).
    student = torch.tensor([[0.0, LN(3), 0.0]])
    teacher = torch.tensor([[LN(2), 0.0, 0.0]])
    target = torch.tensor([0])
    tckd = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0, temperature=1.0)
    nckd = dkd_loss(student, teacher, target, alpha=0.0, beta=1.0, temperature=1.0)
    assert tckd.item() == pytest.approx(LN(5 / 4), abs=1e-6)
    assert nckd.item() == pytest.approx(0.5 * LN(4 / 3), abs=1e-6)


def test_dkd_decomposes_kd_as_in_the_paper():
    # KD = TCKD + (1 - p_t[y]) * NCKD per sample, so KD equals DKD with alpha = 1, beta = 1 - p_t[y].
    generator = torch.Generator().manual_seed(0)
    temperature = 4.0
    for _ in range(5):
        student = 3 * torch.randn(1, 10, generator=generator)
        teacher = 3 * torch.randn(1, 10, generator=generator)
        target = torch.randint(0, 10, (1,), generator=generator)
        teacher_target_prob = torch.softmax(teacher / temperature, dim=1)[0, target].item()
        decoupled = dkd_loss(
            student, teacher, target, alpha=1.0, beta=1.0 - teacher_target_prob, temperature=temperature
        )
        assert decoupled.item() == pytest.approx(kd_loss(student, teacher, temperature).item(), rel=1e-5)


def test_dkd_loss_is_zero_for_identical_logits():
    logits = torch.randn(8, 100)
    target = torch.randint(0, 100, (8,))
    loss = dkd_loss(logits, logits.clone(), target, alpha=1.0, beta=8.0, temperature=4.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_loss_stays_finite_for_a_confident_student():
    # Student [200, 0, 0], target 0: 1 - q_y = 2 e^-200 underflows to 0 in float32, so log(1 - q_y) taken
    # from probabilities would be -inf. In log space, log(1 - q_y) = ln 2 - 200 and log q_y ~ 0.
    # Teacher [0, 0, 0]: b_t = [1/3, 2/3]; TCKD = 1/3 ln(1/3) + 2/3 (ln(2/3) - ln 2 + 200) = 400/3 - ln 3.
    # The non-target distributions are both uniform, so NCKD = 0.
    student = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.zeros(1, 3)
    loss = dkd_loss(student, teacher, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    assert loss.item() == pytest.approx(400 / 3 - LN(3), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_dkd_loss_gradient_reaches_student_only():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    dkd_loss(student, teacher, torch.tensor([0, 3, 5, 9]), alpha=1.0, beta=8.0, temperature=4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dkd_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(
            torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), alpha=1.0, beta=1.0, temperature=0.0
        )


# ---------------------------------------------------------------------------------------------------------
# DIST


def test_dist_loss_matches_hand_computation():
    # T = 1. Teacher rows ln[1, 2, 1] -> [1/4, 1/2, 1/4] and ln[4, 3, 1] -> [1/2, 3/8, 1/8];
    #        student rows ln[1, 1, 2] -> [1/4, 1/4, 1/2] and ln[1, 2, 2] -> [1/5, 2/5, 2/5].
    # Inter-class (per row, centred on the row mean 1/3):
    #   row 1: t = [-1, 2, -1]/12, s = [-1, -1, 2]/12; r = (1 - 2 - 2) / 6 = -1/2
    #   row 2: t = [4, 1, -5]/24, s = [-2, 1, 1]/15; r = (-8 + 1 - 5) / sqrt(42 * 6) = -12 / sqrt(252)
    #   inter = 1 - (-1/2 - 12/sqrt(252)) / 2 = 1.627964
    # Intra-class (per column, over a batch of 2 the correlation is the sign of the product of the changes):
    #   class 0: t 1/4 -> 1/2 (up), s 1/4 -> 1/5 (down): -1
    #   class 1: t 1/2 -> 3/8 (down), s 1/4 -> 2/5 (up): -1
    #   class 2: t 1/4 -> 1/8 (down), s 1/2 -> 2/5 (down): +1
    #   intra = 1 - (-1/3) = 4/3
    # beta = 2, gamma = 1/2: 2 * 1.627964 + 0.5 * 4/3 = 3.922596
    teacher = torch.log(torch.tensor([[1.0, 2.0, 1.0], [4.0, 3.0, 1.0]]))
    student = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 2.0]]))
    inter = 1 - (-0.5 - 12 / math.sqrt(252)) / 2
    intra = 4 / 3
    loss = dist_loss(student, teacher, beta=2.0, gamma=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(2 * inter + 0.5 * intra, abs=1e-5)
    # Doubling the logits at T = 2 gives the same probabilities, so only the T^2 = 4 factor changes.
    loss_t2 = dist_loss(2 * student, 2 * teacher, beta=2.0, gamma=0.5, temperature=2.0)
    assert loss_t2.item() == pytest.approx(4 * (2 * inter + 0.5 * intra), abs=1e-4)


def test_dist_loss_is_zero_for_identical_logits():
    logits = 2 * torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    loss = dist_loss(logits, logits.clone(), beta=1.0, gamma=1.0, temperature=1.0)
    # Pearson is |a|^2 / (|a|^2 + eps), so "zero" holds up to eps relative to the centred norms.
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_dist_loss_is_invariant_to_a_per_row_logit_shift():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 8, 10, generator=generator)
    student_shift, teacher_shift = 5 * torch.randn(2, 8, 1, generator=generator)
    loss = dist_loss(student, teacher, beta=1.0, gamma=2.0, temperature=4.0)
    shifted = dist_loss(
        student + student_shift, teacher + teacher_shift, beta=1.0, gamma=2.0, temperature=4.0
    )
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-5)


def test_dist_loss_gradient_reaches_student_only():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dist_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), beta=1.0, gamma=1.0, temperature=-1.0)


# ---------------------------------------------------------------------------------------------------------
# ND

# Two classes in 2-D; the centres are deliberately not unit length: e_0 = [3, 4]/5, e_1 = [0, -1].
CENTERS = torch.tensor([[3.0, 4.0], [0.0, -2.0]])


def test_nd_loss_matches_hand_computation():
    # Sample 1, class 0: s = [2, 0], |s| = 2; t = [0, 5], |t| = 5. <s, e_0> = 6/5; 1 - (6/5)/5 = 0.76
    # Sample 2, class 1: s = [3, -4], |s| = 5; t = [1, 0], |t| = 1. <s, e_1> = 4; 1 - 4/5 = 0.2
    # mean = 0.48
    student = torch.tensor([[2.0, 0.0], [3.0, -4.0]])
    teacher = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    loss = nd_loss(student, teacher, torch.tensor([0, 1]), CENTERS)
    assert loss.item() == pytest.approx(0.48, abs=1e-6)


def test_nd_loss_is_zero_along_the_centre_with_the_larger_norm():
    # s = 10 e_y and |t| < 10: <s, e_y> / max(|s|, |t|) = 10 / 10.
    target = torch.tensor([0, 1, 1])
    student = 10 * torch.nn.functional.normalize(CENTERS[target], dim=1)
    teacher = torch.tensor([[3.0, 1.0], [0.5, 0.5], [-7.0, 0.0]])
    assert nd_loss(student, teacher, target, CENTERS).item() == pytest.approx(0.0, abs=1e-6)


def test_nd_loss_pushes_a_short_aligned_student_towards_the_teacher_norm():
    # s = 2 e_0 along the centre but |t| = 5 > |s|: 1 - 2/5 = 0.6, and the gradient points along e_0.
    student = (2 * torch.tensor([[0.6, 0.8]])).requires_grad_()
    teacher = torch.tensor([[5.0, 0.0]])
    loss = nd_loss(student, teacher, torch.tensor([0]), CENTERS)
    assert loss.item() == pytest.approx(0.6, abs=1e-6)
    loss.backward()
    # d/ds (1 - <s, e>/|t|) = -e / |t| = -[0.6, 0.8] / 5
    assert torch.allclose(student.grad, torch.tensor([[-0.12, -0.16]]), atol=1e-6)


def test_nd_loss_gradient_reaches_student_only():
    student = torch.randn(4, 2, requires_grad=True)
    teacher = torch.randn(4, 2, requires_grad=True)
    centers = CENTERS.clone().requires_grad_()
    nd_loss(student, teacher, torch.tensor([0, 1, 1, 0]), centers).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert centers.grad is None


def test_nd_loss_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match="shape"):
        nd_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.tensor([0, 1]), CENTERS)
    with pytest.raises(ValueError, match="class_centers"):
        nd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), CENTERS)
