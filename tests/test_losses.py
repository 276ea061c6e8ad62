import math

import pytest
import torch

from kd_experiments.losses import kd_loss


def test_kd_loss_matches_hand_computation_at_t1():
    # p_t = softmax([ln 3, 0]) = [0.75, 0.25], q_s = [0.5, 0.5]
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.130812...
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(0.1308120, abs=1e-6)


def test_kd_loss_scales_with_t_squared_and_softens():
    # T = 2: p_t = [sqrt3, 1] / (sqrt3 + 1) = [0.633975, 0.366025]; KL = 0.0363408; times T^2 = 4 -> 0.145363
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(0.145363, abs=1e-5)


def test_kd_loss_is_batchmean_not_elementwise_mean():
    # Row 1 as above (0.130812), row 2 identical logits (0): the batch mean is 0.065406, whatever K is.
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0, -1e9], [1.0, 2.0, 3.0]])
    # With a third class of ~zero teacher mass: p_t = [0.75, 0.25, 0], q_s = [1/3]*3
    expected_row1 = 0.75 * math.log(0.75 * 3) + 0.25 * math.log(0.25 * 3)
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected_row1 / 2, abs=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 100)
    assert kd_loss(logits, logits.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 100), temperature=4.0).item() > 0


def test_kd_loss_gradient_reaches_student_only():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    kd_loss(student, teacher, temperature=4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
