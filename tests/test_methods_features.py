"""Feature-based objectives (FitNet, SRD, VkD): projectors sized in setup, outside the student and trained;
VkD's projector stays orthogonal. (Their YAMLs are checked with every method's in test_methods.py.)"""

import pytest
import torch

from kd_experiments.methods.fitnet import ConvRegressor, FitNet
from kd_experiments.methods.srd import SimpleRecipeDistillation
from kd_experiments.methods.vkd import OrthogonalProjection
from kd_experiments.models import create_model, extract_features
from kd_experiments.models.features import NetworkOutput

ALL_FEATURES = frozenset({"logits", "embedding", "stages"})


def probes(batch: int = 4) -> tuple[NetworkOutput, NetworkOutput, torch.Tensor]:
    """Student and teacher features of mismatched widths (embedding 16 vs 256, stage maps 8 vs 128
    channels), with the student side requiring grad as it would in training."""
    torch.manual_seed(0)
    images = torch.randn(batch, 1, 8, 8)
    student = create_model("convnet_narrow", 10, in_chans=1).eval()
    teacher = create_model("convnet_wide", 10, in_chans=1).eval()
    student_out = extract_features(student, images, ALL_FEATURES)
    with torch.no_grad():
        teacher_out = extract_features(teacher, images, ALL_FEATURES)
    return student_out, teacher_out, torch.randint(0, 10, (batch,))


def projector_of(method) -> torch.nn.Module:
    return method.regressor if isinstance(method, FitNet) else method.projector


METHODS = {
    "srd": lambda: SimpleRecipeDistillation(),
    "srd-correlation": lambda: SimpleRecipeDistillation(distance="correlation"),
    "vkd": lambda: OrthogonalProjection(),
    "vkd-linear-raw": lambda: OrthogonalProjection(projector="linear", normalize_teacher=False),
    "vkd-mlp": lambda: OrthogonalProjection(projector="mlp"),
    "fitnet": lambda: FitNet(),
    "fitnet-embedding": lambda: FitNet(target="embedding"),
}


@pytest.mark.parametrize("name", METHODS)
def test_term_is_a_finite_scalar_and_trains_the_projector(name):
    student_out, teacher_out, targets = probes()
    method = METHODS[name]()
    method.setup(student_out, teacher_out)
    value = method(student_out, teacher_out, targets)
    assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value)
    value.backward()
    projector_params = list(projector_of(method).parameters())
    assert projector_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector_params)


@pytest.mark.parametrize("name", ["srd", "vkd", "fitnet"])
def test_projector_is_a_method_submodule_not_a_student_one(name):
    student = create_model("convnet_narrow", 10, in_chans=1)
    teacher = create_model("convnet_wide", 10, in_chans=1).eval()
    images = torch.randn(2, 1, 8, 8)
    method = METHODS[name]()
    method.setup(
        extract_features(student.eval(), images, ALL_FEATURES),
        extract_features(teacher, images, ALL_FEATURES),
    )
    projector_params = {id(p) for p in projector_of(method).parameters()}
    assert projector_params and projector_params <= {id(p) for p in method.parameters()}
    assert not projector_params & {id(p) for p in student.parameters()}


def test_srd_projector_is_linear_with_bias_to_the_teacher_dim():
    student_out, teacher_out, _ = probes()
    method = SimpleRecipeDistillation()
    method.setup(student_out, teacher_out)
    assert isinstance(method.projector, torch.nn.Linear)
    assert (method.projector.in_features, method.projector.out_features) == (16, 256)
    assert method.projector.bias is not None and method.projector.bias.requires_grad


@pytest.mark.parametrize("dims", [(16, 256), (256, 16)])
def test_vkd_projector_stays_orthogonal_under_sgd(dims):
    student_dim, teacher_dim = dims
    torch.manual_seed(0)
    method = OrthogonalProjection()
    method.setup(
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, student_dim)),
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, teacher_dim)),
    )
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    for _ in range(100):
        student = NetworkOutput(torch.randn(8, 10), torch.randn(8, student_dim))
        teacher = NetworkOutput(torch.randn(8, 10), torch.randn(8, teacher_dim) * 3 + 1)
        optimizer.zero_grad()
        method(student, teacher, torch.randint(0, 10, (8,))).backward()
        optimizer.step()
    weight = method.projector.weight.detach()  # teacher_dim × student_dim
    assert weight.shape == (teacher_dim, student_dim)
    gram = weight.T @ weight if teacher_dim >= student_dim else weight @ weight.T
    torch.testing.assert_close(gram, torch.eye(min(dims)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims", [(16, 256), (256, 16)])
def test_vkd_projector_is_torchs_householder_parametrisation_computed_faster(dims):
    """HouseholderStiefel gives what `parametrizations.orthogonal` gives a non-square weight: the same
    state dict from the same seed, the same matrix and the same gradient (to float32 rounding)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import orthogonal

    from kd_experiments.methods.vkd import HouseholderStiefel

    student_dim, teacher_dim = dims
    torch.manual_seed(0)
    reference = orthogonal(torch.nn.Linear(student_dim, teacher_dim, bias=False))
    torch.manual_seed(0)
    method = OrthogonalProjection()
    method.setup(
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, student_dim)),
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, teacher_dim)),
    )
    ours = method.projector
    assert isinstance(ours.parametrizations.weight[0], HouseholderStiefel)
    expected_state = reference.state_dict()
    keys = ["parametrizations.weight.0.base", "parametrizations.weight.original"]
    assert sorted(ours.state_dict()) == sorted(expected_state) == keys
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    with torch.no_grad():  # away from the starting point, where every reflector is zero
        step = 0.05 * torch.randn(teacher_dim, student_dim, generator=torch.Generator().manual_seed(1))
        for module in (reference, ours):
            module.parametrizations.weight.original.add_(step)
    inputs, target = torch.randn(8, student_dim), torch.randn(8, teacher_dim)
    for module in (reference, ours):
        (module(inputs) - target).pow(2).sum().backward()
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-5, rtol=0)
    gradient = reference.parametrizations.weight.original.grad
    torch.testing.assert_close(ours.parametrizations.weight.original.grad, gradient, atol=1e-4, rtol=1e-5)
    assert gradient.abs().max() > 1.0  # a real gradient, not rounding noise
    square = OrthogonalProjection()  # a square weight keeps torch's own (matrix exponential) map
    square.setup(
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 8)),
        NetworkOutput(torch.zeros(2, 10), torch.zeros(2, 8)),
    )
    assert parametrize.is_parametrized(square.projector)
    assert not isinstance(square.projector.parametrizations.weight[0], HouseholderStiefel)


def test_fitnet_regressor_follows_mdistiller_convreg_shapes():
    cases = {  # student (C, H) -> teacher (C, H): expected conv
        ((8, 8), (32, 4)): (torch.nn.Conv2d, (3, 3), (2, 2)),
        ((8, 4), (32, 8)): (torch.nn.ConvTranspose2d, (4, 4), (2, 2)),
        ((8, 4), (32, 4)): (torch.nn.Conv2d, (1, 1), (1, 1)),
        ((8, 6), (32, 4)): (torch.nn.Conv2d, (3, 3), (1, 1)),
    }
    for ((s_c, s_h), (t_c, t_h)), (kind, kernel, stride) in cases.items():
        regressor = ConvRegressor(torch.Size((2, s_c, s_h, s_h)), torch.Size((2, t_c, t_h, t_h)))
        conv, norm, _ = regressor
        assert type(conv) is kind and conv.kernel_size == kernel and conv.stride == stride
        assert isinstance(norm, torch.nn.BatchNorm2d)
        assert regressor(torch.randn(2, s_c, s_h, s_h)).shape == (2, t_c, t_h, t_h)
    with pytest.raises(ValueError, match="hint_layer"):
        ConvRegressor(torch.Size((2, 8, 2, 2)), torch.Size((2, 32, 8, 8)))


def test_fitnet_reads_the_configured_features():
    assert FitNet().teacher_features == {"stages"}
    assert FitNet(target="embedding").teacher_features == {"embedding"}
    student_out, teacher_out, _ = probes()
    method = FitNet(hint_layer=2)
    method.setup(student_out, teacher_out)
    assert method.regressor(student_out.stages[2]).shape == teacher_out.stages[2].shape


@pytest.mark.parametrize("filter_bias_and_bn", [True, False])
def test_weight_decay_never_reaches_the_orthogonal_projector(filter_bias_and_bn):
    """torch's Householder map multiplies by X.diagonal().int(): decay on the unconstrained tensor turns
    its diagonal of ones into 0.99999 and the projector into zeros (it did, before the module exempted it)."""
    import functools

    from timm.optim import create_optimizer_v2

    from kd_experiments.methods.ce import CrossEntropy
    from kd_experiments.methods.compose import LossWeights, Objectives
    from kd_experiments.module import DistillationModule

    student_out, teacher_out, targets = probes()
    vkd = OrthogonalProjection()
    vkd.setup(student_out, teacher_out)
    factory = functools.partial(
        create_optimizer_v2, opt="adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=filter_bias_and_bn
    )
    module = DistillationModule(
        student=create_model("convnet_narrow", 10, in_chans=1),
        method=Objectives({"ce": CrossEntropy(), "vkd": vkd}),
        loss_weights=LossWeights({"ce": 1.0, "vkd": 1.0}),
        optimizer=factory,
        num_classes=10,
        teacher=create_model("convnet_wide", 10, in_chans=1),
    )
    optimizer = module.configure_optimizers()
    original = vkd.projector.parametrizations.weight.original
    (group,) = [g for g in optimizer.param_groups if any(p is original for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] > 0 for g in optimizer.param_groups)  # the student's weights still decay
    weight_before = vkd.projector.weight.detach().clone()
    vkd(student_out, teacher_out, targets).backward()
    optimizer.step()
    assert vkd.projector.weight.abs().sum() > 0 and torch.allclose(
        vkd.projector.weight.T @ vkd.projector.weight, torch.eye(16), atol=1e-5
    )
    assert not torch.equal(vkd.projector.weight, weight_before) or original.grad is not None
