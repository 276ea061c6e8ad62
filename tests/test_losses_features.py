import math

import pytest
import torch
import torch.nn.functional as F

from kd_experiments.losses import feature_mse, hcl_loss, lsh_loss, srd_loss, vkd_loss

# ---------------------------------------------------------------------------------------------- feature_mse


def test_feature_mse_by_hand_is_the_element_mean():
    # B=2, D=2: squared errors 1, 4, 9, 16 -> mean 30 / 4 = 7.5
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.zeros(2, 2)
    assert feature_mse(student, teacher).item() == pytest.approx(7.5)


def test_feature_mse_is_zero_for_equal_inputs():
    features = torch.randn(3, 4, 5, 5)
    assert feature_mse(features, features.clone()).item() == 0.0


def test_feature_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        feature_mse(torch.zeros(2, 3), torch.zeros(2, 4))


# -------------------------------------------------------------------------------------------------- hcl_loss


def test_hcl_one_4x4_level_by_hand():
    # B=1, C=1, H=W=4, teacher 0, student 2 on the first two diagonal cells:
    #   full resolution: (2^2 + 2^2) / 16                     = 0.5
    #   pool 4: skipped (4 >= H)
    #   pool 2 (weight 1/2): top-left cell mean 4/4 = 1, others 0 -> (1^2) / 4 = 0.25
    #   pool 1 (weight 1/4): global mean 4/16 = 0.25              -> 0.0625
    #   (0.5 + 0.5 * 0.25 + 0.25 * 0.0625) / (1 + 0.5 + 0.25) = 0.640625 / 1.75 = 0.366071...
    student = torch.zeros(1, 1, 4, 4)
    student[0, 0, 0, 0] = student[0, 0, 1, 1] = 2.0
    teacher = torch.zeros(1, 1, 4, 4)
    assert hcl_loss([student], [teacher]).item() == pytest.approx(0.640625 / 1.75)


def test_hcl_sums_levels_and_a_1x1_level_is_plain_mse():
    # Level 1, 2x2 with a single 2: full (2^2)/4 = 1; pools 4 and 2 skipped; pool 1 (weight 1/2): mean 0.5
    #   -> 0.25; level loss (1 + 0.5 * 0.25) / 1.5 = 0.75.
    # Level 2, 1x1 (C=2): no pooling, plain MSE ((1^2) + (3^2)) / 2 = 5.
    # Sum (not mean) over levels: 5.75.
    student_2x2 = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    student_1x1 = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    loss = hcl_loss([student_2x2, student_1x1], [torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 1, 1)])
    assert loss.item() == pytest.approx(5.75)


def test_hcl_constant_offset_costs_its_square_at_every_resolution():
    # An offset c survives every average pooling, so each level costs c^2 whatever its pyramid weights.
    teacher = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)]
    student = [t + 0.5 for t in teacher]
    assert hcl_loss(student, teacher).item() == pytest.approx(3 * 0.25, rel=1e-5)


def test_hcl_rejects_level_count_mismatch():
    with pytest.raises(ValueError, match="levels"):
        hcl_loss([torch.zeros(1, 1, 2, 2)], [])


# -------------------------------------------------------------------------------------------------- srd_loss


def test_srd_two_samples_one_dim_by_hand():
    # B=2, D=1, eps = 1e-4. bn([a, b]) = [-1, 1] * ((b - a)/2) / sqrt(((b - a)/2)^2 + eps):
    #   student [0, 2]: mean 1, biased var 1 -> [-1, 1] / sqrt(1.0001)
    #   teacher [3, 1]: mean 2, biased var 1 -> [1, -1] / sqrt(1.0001)
    #   differences [-2, 2] / sqrt(1.0001); |.|^4 = 16 / 1.0001^2 each
    #   log(32 / 1.0001^2) = log 32 - 2 log 1.0001 = 3.4655359...
    student = torch.tensor([[0.0], [2.0]])
    teacher = torch.tensor([[3.0], [1.0]])
    expected = math.log(32.0) - 2 * math.log(1.0001)
    assert srd_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_srd_is_log_of_sum_over_all_elements_with_the_given_exponent():
    student = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, -2.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 1.0]])

    def standardise(x):
        return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-4)

    differences = (standardise(student) - standardise(teacher)).abs()
    assert srd_loss(student, teacher).item() == pytest.approx(differences.pow(4).sum().log().item(), rel=1e-6)
    assert srd_loss(student, teacher, exponent=2.0).item() == pytest.approx(
        differences.pow(2).sum().log().item(), rel=1e-6
    )


def test_srd_ignores_per_dimension_affine_changes_of_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(16, 8)
    teacher = 5 * torch.randn(16, 8)
    scale = torch.rand(8) * 3 + 0.5
    shift = torch.randn(8) * 10
    assert srd_loss(student, teacher * scale + shift).item() == pytest.approx(
        srd_loss(student, teacher).item(), abs=1e-4
    )


def test_srd_needs_a_batch():
    with pytest.raises(ValueError, match="B >= 2"):
        srd_loss(torch.zeros(1, 4), torch.zeros(1, 4))


# -------------------------------------------------------------------------------------------------- vkd_loss


def test_vkd_by_hand_uses_both_smooth_l1_branches():
    # B=1, D=2. layer_norm([0, 2]): mean 1, biased var 1 -> [-k, k] with k = 1/sqrt(1 + 1e-5).
    # Student [-3, 0.5]: differences -3 + k = -2.000005 (linear: |d| - 0.5 = 1.500005)
    #                    and 0.5 - k = -0.499995 (quadratic: 0.5 d^2 = 0.1249975); mean 0.8125012...
    k = 1 / math.sqrt(1 + 1e-5)
    expected = ((3 - k - 0.5) + 0.5 * (0.5 - k) ** 2) / 2
    loss = vkd_loss(torch.tensor([[-3.0, 0.5]]), torch.tensor([[0.0, 2.0]]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_vkd_is_zero_when_the_student_is_the_normalised_teacher():
    teacher = torch.randn(4, 16) * 3 + 2
    assert vkd_loss(F.layer_norm(teacher, (16,)), teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_vkd_ignores_per_sample_affine_changes_of_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(4, 16)
    teacher = torch.randn(4, 16)
    scale = torch.tensor([[0.5], [2.0], [3.0], [10.0]])
    shift = torch.tensor([[-4.0], [0.0], [1.0], [7.0]])
    assert vkd_loss(student, teacher * scale + shift).item() == pytest.approx(
        vkd_loss(student, teacher).item(), abs=1e-5
    )


# -------------------------------------------------------------------------------------------------- lsh_loss


def test_lsh_one_bit_hash_by_hand():
    # N=1 hash, D=2: h(f) = f1 - f2 + 0.5.
    #   sample 1: student [1, 1] -> 0.5;  teacher [0, 1] -> -0.5 -> target 0: BCE = log(1 + e^0.5) = 0.974077
    #   sample 2: student [0, 2] -> -1.5; teacher [2, 0] -> 2.5 -> target 1: BCE = log(1 + e^1.5) = 1.701413
    #   mean over B x N = 2 bits: 1.337745
    student = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    weight = torch.tensor([[1.0, -1.0]])
    bias = torch.tensor([0.5])
    expected = (math.log1p(math.exp(0.5)) + math.log1p(math.exp(1.5))) / 2
    assert lsh_loss(student, teacher, weight, bias).item() == pytest.approx(expected, abs=1e-6)


def test_lsh_hash_layer_stays_frozen_even_if_it_requires_grad():
    student = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(32, 8, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    lsh_loss(student, torch.randn(4, 8), weight, bias).backward()
    assert weight.grad is None
    assert bias.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- all of them


def _call(name, student, teacher):
    if name == "feature_mse":
        return feature_mse(student, teacher)
    if name == "hcl_loss":
        return hcl_loss([student.view(2, 2, 2, 2)], [teacher.view(2, 2, 2, 2)])
    if name == "srd_loss":
        return srd_loss(student, teacher)
    if name == "vkd_loss":
        return vkd_loss(student, teacher)
    return lsh_loss(student, teacher, torch.randn(16, 8), torch.randn(16))


@pytest.mark.parametrize("name", ["feature_mse", "hcl_loss", "srd_loss", "vkd_loss", "lsh_loss"])
def test_gradient_reaches_the_student_only(name):
    torch.manual_seed(0)
    student = torch.randn(2, 8, requires_grad=True)
    teacher = torch.randn(2, 8, requires_grad=True)
    loss = _call(name, student, teacher)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
