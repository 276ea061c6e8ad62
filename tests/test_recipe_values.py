"""The paper recipes in conf/experiment/ hold the official numbers that /work/shared/methods.md lists (the
section is named in each test), and the ablation recipes sweep what they say. Composition only: nothing
trains here. A method is `method.objectives` (term -> objective), `method.weights` (term -> weight) and
`method.warmup` (term -> {epochs, epoch_base}); recipes override single keys and name no classes."""

import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler

import kd_experiments  # noqa: F401  (registers the kd.scaled_lr resolver)
from tests.conftest import CONF_DIR, REPO, compose_config, recipe_task

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml"))
ABLATIONS = [name for name in EXPERIMENTS if name.startswith("ablation_")]
# Not paper rows: the examples on embedded or generated data (the digits, the shapes).
EXAMPLES = ("digits_kd", "detection_shapes")
PAPER_RECIPES = [name for name in EXPERIMENTS if not name.startswith("ablation_") and name not in EXAMPLES]


def resolved(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def objective(cfg, term: str, cls: str):
    """The objective of loss term `term`, checked to be of class `cls`."""
    found = cfg.method.objectives[term]
    assert found._target_.rsplit(".", 1)[1] == cls, (term, found._target_)
    return found


def warmup(cfg, term: str) -> tuple[int, int] | None:
    """(epochs, epoch_base) of the term's warm-up, or None when the term is not warmed up."""
    schedule = (cfg.method.get("warmup") or {}).get(term)
    return None if schedule is None else (schedule.epochs, schedule.epoch_base)


def test_dkd_cifar100_resnet32x4_resnet8x4_is_mdistillers_config():
    # methods.md 0 and b: mdistiller configs/cifar100/dkd/res32x4_res8x4.yaml
    cfg = compose_config("experiment=dkd_cifar100_resnet32x4_resnet8x4")
    assert cfg.trainer.max_epochs == 240
    assert cfg.dataset.name == "cifar100" and cfg.dataset.batch_size == 64
    assert cfg.optimizer.opt == "momentum" and cfg.optimizer.momentum == 0.9  # no Nesterov
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.weight_decay == 5e-4
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    dkd = objective(cfg, "kd", "DecoupledKD")
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 8.0, 4.0)
    assert warmup(cfg, "kd") == (20, 1)  # mdistiller counts from 1
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0}
    assert cfg.teacher.reference_top1 == 79.42
    assert cfg.teacher.checkpoint.endswith("cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    assert cfg.report == "best" and cfg.paper.top1 == 76.32


@pytest.mark.parametrize(
    ("name", "lr", "beta"),
    [
        ("dkd_cifar100_resnet56_resnet20", 0.05, 2.0),
        ("dkd_cifar100_wrn_40_2_wrn_40_1", 0.05, 6.0),
        ("dkd_cifar100_ResNet50_MobileNetV2", 0.01, 8.0),
        ("dkd_cifar100_resnet32x4_ShuffleV1", 0.01, 8.0),
        ("dkd_cifar100_resnet32x4_ShuffleV2", 0.01, 8.0),
    ],
)
def test_dkd_cifar100_per_pair_beta_and_lightweight_lr(name, lr, beta):
    # methods.md b: beta 2 for res56 -> res20, 6 for wrn40-2 -> wrn40-1, 8 otherwise; LR 0.01 for
    # MV2/ShV1/ShV2
    cfg = compose_config(f"experiment={name}")
    assert cfg.optimizer.lr == lr and objective(cfg, "kd", "DecoupledKD").beta == beta


def test_kd_cifar100_is_mdistillers_kd():
    # methods.md a: T 4, CE 0.1 / KD 0.9 on the section-0 protocol
    cfg = compose_config("experiment=kd_cifar100_resnet32x4_resnet8x4")
    assert objective(cfg, "kd", "HintonKD").temperature == 4.0
    assert dict(cfg.method.weights) == {"ce": 0.1, "kd": 0.9} and warmup(cfg, "kd") is None
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size, cfg.optimizer.lr) == (240, 64, 0.05)
    assert cfg.paper.top1 == 73.33


@pytest.mark.parametrize(
    ("pair", "kd", "nd", "lr"),
    [
        ("resnet56_resnet20", 1.0, 2.0, 0.1),
        ("resnet32x4_resnet8x4", 3.5, 2.0, 0.1),
        ("wrn_40_2_wrn_40_1", 1.0, 1.5, 0.1),
        ("ResNet50_MobileNetV2", 3.0, 0.5, 0.02),
        ("resnet32x4_ShuffleV1", 2.5, 1.5, 0.02),
        ("resnet32x4_ShuffleV2", 4.0, 0.5, 0.02),
    ],
)
def test_nd_kd_plus_plus_cifar100_weights(pair, kd, nd, lr):
    # methods.md g: per-pair KD++ weights; Nesterov, wd 5e-4, batch 64 per GPU x 2 GPUs, T 4, KD warm-up 20
    # epochs counted from 0, ND not warmed up
    cfg = compose_config(f"experiment=nd-kd++_cifar100_{pair}")
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": kd, "nd": nd}
    assert cfg.optimizer.opt == "nesterov" and cfg.optimizer.lr == lr and cfg.optimizer.weight_decay == 5e-4
    assert cfg.dataset.batch_size * cfg.trainer.devices == 128
    assert objective(cfg, "kd", "HintonKD").temperature == 4.0 and warmup(cfg, "kd") == (20, 0)
    assert set(cfg.method.objectives) == {"kd", "nd"}
    nd_objective = objective(cfg, "nd", "NormDirection")
    assert "projector_init" not in nd_objective  # ND's CIFAR EmbTrans init, the method's default
    assert warmup(cfg, "nd") is None
    assert cfg.trainer.max_epochs == 240 and list(cfg.scheduler.milestones) == [150, 180, 210]


@pytest.mark.parametrize(
    ("pair", "alpha", "beta", "nd"),
    [
        ("resnet56_resnet20", 2.5, 4.0, 3.5),
        ("resnet32x4_resnet8x4", 2.0, 8.0, 0.5),
        ("wrn_40_2_wrn_40_1", 1.0, 6.0, 1.0),
        ("ResNet50_MobileNetV2", 0.5, 8.0, 1.0),
        ("resnet32x4_ShuffleV1", 0.5, 8.0, 4.0),
        ("resnet32x4_ShuffleV2", 0.5, 6.0, 0.5),
    ],
)
def test_nd_dkd_plus_plus_cifar100_weights(pair, alpha, beta, nd):
    cfg = compose_config(f"experiment=nd-dkd++_cifar100_{pair}")
    dkd = objective(cfg, "kd", "DecoupledKD")
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (alpha, beta, 4.0)
    assert warmup(cfg, "kd") == (20, 0) and warmup(cfg, "nd") is None
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "nd": nd}


@pytest.mark.parametrize(
    ("variant", "term", "table"),
    [
        ("dist++", "kd", [(2.0, 1.0), (1.5, 4.0), (2.5, 3.0), (7.0, 1.0), (2.5, 3.0), (3.0, 4.0)]),
        ("reviewkd++", "reviewkd", [(1.2, 1.0), (8.0, 1.0), (5.0, 4.0), (6.0, 2.0), (7.0, 1.0), (8.0, 1.5)]),
    ],
)
def test_nd_dist_and_reviewkd_plus_plus_cifar100_weights(variant, term, table):
    pairs = ["resnet56_resnet20", "resnet32x4_resnet8x4", "wrn_40_2_wrn_40_1", "ResNet50_MobileNetV2",
             "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2"]  # fmt: skip
    for pair, (kd, nd) in zip(pairs, table, strict=True):
        cfg = compose_config(f"experiment=nd-{variant}_cifar100_{pair}")
        assert dict(cfg.method.weights) == {"ce": 1.0, term: kd, "nd": nd}, pair
        assert warmup(cfg, term) == (20, 0) and warmup(cfg, "nd") is None, pair


def test_nd_imagenet_kd_plus_plus_resnet34_resnet18():
    # methods.md g: 100 epochs, batch 512, LR 0.2, Nesterov, wd 1e-4, steps 30/60/90; kd 2.5, nd 1.0, T 1,
    # KD warm-up 5 epochs
    cfg = compose_config("experiment=nd-kd++_imagenet_resnet34_resnet18")
    assert cfg.dataset.name == "imagenet" and cfg.dataset.batch_size * cfg.trainer.devices == 512
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("nesterov", 0.2, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90] and cfg.trainer.max_epochs == 100
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 2.5, "nd": 1.0}
    assert objective(cfg, "kd", "HintonKD").temperature == 1.0 and warmup(cfg, "kd") == (5, 0)
    assert objective(cfg, "nd", "NormDirection").projector_init == "imagenet" and warmup(cfg, "nd") is None
    assert cfg.paper.top1 == 71.98


def test_srd_imagenet_resnet34_resnet18():
    # methods.md e.1: res3418.yaml, 100 epochs, batch 256, SGD 0.1, wd 1e-4, [30, 60, 90]; CE 1 + KL 1 +
    # 2 * log sum |.|^4 with BatchNorm1d eps 1e-4
    cfg = compose_config("experiment=srd_imagenet_resnet34_resnet18")
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size) == (100, 256)
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("momentum", 0.1, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90]
    srd = objective(cfg, "srd", "SimpleRecipeDistillation")
    assert (srd.exponent, srd.eps, srd.distance, srd.student_embedding) == (4.0, 1e-4, "logsum", "embedding")
    kl = objective(cfg, "kd", "HintonKD")
    assert (kl.temperature, kl.student_logits) == (1.0, "logits")
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "srd": 2.0} and not cfg.method.get("warmup")
    assert cfg.teacher.pretrained == "tv_in1k" and cfg.paper.top1 == 71.87


def test_srd_deit_ti_scales_all_three_lrs_by_the_global_batch():
    # methods.md e.3: base LR 5e-4, warm-up LR 5e-7, min LR 5e-6, all x total batch / 512; 20 warm-up epochs,
    # 300 epochs, wd 0.05, grad clip 15, AMP; correlation form, eps 0, all weights 1
    cfg = compose_config("experiment=srd_imagenet_regnety_160_deit_ti_convstem")
    assert cfg.dataset.batch_size * cfg.trainer.devices == 512
    assert resolved(cfg, "optimizer.lr") == pytest.approx(5e-4)
    assert resolved(cfg, "scheduler.lr_min") == pytest.approx(5e-6)
    assert resolved(cfg, "scheduler.warmup_lr_init") == pytest.approx(5e-7)
    assert cfg.scheduler.warmup_t == 20 and resolved(cfg, "scheduler.t_initial") == 300
    assert cfg.scheduler.interval == "step"  # per-iteration cosine (Swin's lr_scheduler.py)
    assert cfg.trainer.gradient_clip_val == 15.0 and cfg.trainer.precision == "16-mixed"
    assert cfg.optimizer.opt == "adamw" and cfg.optimizer.weight_decay == 0.05
    srd = objective(cfg, "srd", "SimpleRecipeDistillation")
    assert (srd.distance, srd.eps, srd.student_embedding) == ("correlation", 1e-5, "patch_mean")
    kl = objective(cfg, "kd", "HintonKD")
    assert (kl.temperature, kl.student_logits) == (1.0, "distill_logits")  # the student's taps
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "srd": 1.0}
    assert cfg.dataset.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.dataset.re_prob == 0.25
    wider = compose_config("experiment=srd_imagenet_regnety_160_deit_ti_convstem", "trainer.devices=4")
    assert resolved(wider, "optimizer.lr") == pytest.approx(1e-3)


def test_vkd_deit_ti():
    # methods.md f.1: AdamW at a fixed 5e-4, wd 0.05, cosine without warm-up to 5e-6, 300 epochs, batch 512 on
    # 1 GPU, AMP, no clipping; Mixup 0.8 / CutMix 1.0 with smoothing 0.1; no RandAugment, no random erasing
    cfg = compose_config("experiment=vkd_imagenet_regnety_160_deit_ti_convstem")
    assert cfg.optimizer.opt == "adamw" and cfg.optimizer.lr == 5e-4 and cfg.optimizer.weight_decay == 0.05
    assert cfg.scheduler.warmup_t == 0 and cfg.scheduler.lr_min == 5e-6
    assert cfg.scheduler.interval == "step"  # per-iteration cosine
    assert resolved(cfg, "scheduler.t_initial") == 300 and cfg.trainer.max_epochs == 300
    assert (cfg.dataset.batch_size, cfg.trainer.devices) == (512, 1)
    assert cfg.trainer.precision == "16-mixed" and cfg.trainer.get("gradient_clip_val") is None
    mixup = cfg.dataset.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert (mixup.prob, mixup.switch_prob, mixup.mode) == (1.0, 0.5, "batch")
    assert cfg.dataset.re_prob == 0.0 and not cfg.dataset.auto_augment.startswith("rand")
    assert cfg.dataset.interpolation == "bicubic"
    vkd = objective(cfg, "vkd", "OrthogonalProjection")
    assert (vkd.projector, vkd.normalize_teacher, vkd.student_embedding) == ("orthogonal", True, "patch_mean")
    kl = objective(cfg, "kd", "HintonKD")
    assert (kl.temperature, kl.student_logits) == (1.0, "distill_logits")  # the student's taps
    assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "vkd": 1.0} and not cfg.method.get("warmup")
    assert cfg.teacher.arch == "regnety_160" and cfg.student.arch == "deit_ti_convstem"
    assert cfg.paper.top1 == 79.2  # the README's single-GPU batch-512 run, this recipe's layout


def test_lshfm_imagenet_resnet34_resnet18():
    # methods.md h: lshl2_s, gamma 1 / alpha 0 / beta 5, N 2048, std 0.06, bias 0; SGD 0.1, wd 1e-4, batch
    # 256, 100 epochs, x0.1 every 30; the reported model averages the weights of the last 10 epochs
    cfg = compose_config("experiment=lshfm_imagenet_resnet34_resnet18")
    assert cfg.report == "weight_average" and cfg.average_epochs == 10
    l2, lsh = objective(cfg, "l2", "L2Mimicking"), objective(cfg, "lsh", "LSHMimicking")
    assert (l2.selective, l2.force_projection) == (True, False)
    assert (lsh.selective, lsh.num_hashes, lsh.std, lsh.bias, lsh.hash_seed) == (True, 2048, 0.06, "zero", 0)
    assert lsh.force_projection is False
    assert dict(cfg.method.weights) == {"ce": 1.0, "l2": 5.0, "lsh": 5.0}
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.dataset.batch_size) == (0.1, 1e-4, 256)
    assert list(cfg.scheduler.milestones) == [30, 60, 90] and cfg.trainer.max_epochs == 100
    assert cfg.paper.top1 == 71.72


def test_deit_distilled_lr_is_scaled_to_the_global_batch_of_1024():
    # methods.md i: AdamW 5e-4 x global batch / 512, wd 0.05, 5 warm-up epochs, hard distillation 0.5 / 0.5
    for student, top1 in (("deit_ti", 74.5), ("deit_s", 81.2), ("deit_b", 83.4)):
        cfg = compose_config(f"experiment=deit_imagenet_regnety_160_{student}")
        batch = cfg.dataset.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
        assert batch == 1024 and resolved(cfg, "optimizer.lr") == pytest.approx(1e-3)
        token = objective(cfg, "distill", "DistillationToken")
        assert cfg.scheduler.warmup_t == 5 and (token.kind, token.temperature) == ("hard", 1.0)
        assert set(cfg.method.objectives) == {"distill"} and not cfg.method.get("warmup")
        assert dict(cfg.method.weights) == {"ce": 0.5, "distill": 0.5}
        assert cfg.student.model_kwargs.drop_path_rate == 0.1 and cfg.paper.top1 == top1
        # main.py defaults: repeated augmentation (3 repeats) and the model EMA, decay 0.99996
        assert cfg.dataset.repeated_augmentation == 3 and cfg.ema_decay == 0.99996 and cfg.report == "last"


def test_nd_deit_b_plus_plus_is_the_nd_deit_script():
    # methods.md g (DeiT-B++): AdamW betas 0.9 / 0.95, blr 1e-4 x global batch / 256, batch 2048 over 8 GPUs,
    # wd 0.3, 20 warm-up epochs, min LR 1e-6, drop path 0.1, RandAugment m9, random erasing 0.25, Mixup 0.8 /
    # CutMix 1.0, smoothing 0.1, 300 epochs; kd 0.5 (hard, warmed over 5 epochs), nd 1.5
    cfg = compose_config("experiment=nd-deit++_imagenet_regnety_160_deit_b")
    assert cfg.dataset.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 2048
    assert resolved(cfg, "optimizer.lr") == pytest.approx(8e-4)
    fewer = compose_config("experiment=nd-deit++_imagenet_regnety_160_deit_b", "trainer.devices=4")
    assert resolved(fewer, "optimizer.lr") == pytest.approx(4e-4)  # global batch 1024
    assert (cfg.optimizer.opt, cfg.optimizer.weight_decay) == ("adamw", 0.3)
    assert list(cfg.optimizer.betas) == [0.9, 0.95]
    assert cfg.trainer.max_epochs == 300 and cfg.trainer.precision == "32-true"  # no AMP in the ND code
    assert cfg.student.arch == "deit_base_distilled_patch16_224"
    assert cfg.student.model_kwargs.drop_path_rate == 0.1
    assert (cfg.teacher.arch, cfg.teacher.pretrained) == ("regnety_160", "deit_in1k")
    assert cfg.dataset.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.dataset.re_prob == 0.25
    assert cfg.dataset.interpolation == "bicubic" and cfg.dataset.crop_pct == 0.875
    mixup = cfg.dataset.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert (mixup.prob, mixup.switch_prob, mixup.mode) == (1.0, 0.5, "batch")
    # The ND code has no repeated augmentation and no model EMA.
    assert not cfg.dataset.get("repeated_augmentation") and not cfg.get("ema_decay")
    assert dict(cfg.method.weights) == {"ce": 1.0, "distill": 0.5, "nd": 1.5}
    token, nd = objective(cfg, "distill", "DistillationToken"), objective(cfg, "nd", "NormDirection")
    assert token.kind == "hard" and warmup(cfg, "distill") == (5, 0)
    assert (nd.student_embedding, nd.projector_init) == ("embedding", "imagenet")
    assert warmup(cfg, "nd") is None  # ND not warmed
    assert cfg.report == "best" and cfg.paper.top1 == 83.6


def test_nd_deit_b_plus_plus_lr_follows_the_official_per_iteration_schedule():
    # ND ImageNet/DeiT/utils.py adjust_learning_rate at fractional epoch e: lr * e / 20 for e < 20, then
    # min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (e - 20) / (300 - 20))). The module converts epochs to
    # updates for `interval: step`; here with 10 updates per epoch.
    cfg = compose_config("experiment=nd-deit++_imagenet_regnety_160_deit_b")
    assert cfg.scheduler.interval == "step"
    assert cfg.scheduler.t_initial + cfg.scheduler.warmup_t == cfg.trainer.max_epochs
    options = OmegaConf.to_container(cfg.scheduler, resolve=True)
    for key in ("_target_", "_partial_", "interval", "t_in_epochs"):
        options.pop(key)
    updates = 10
    for key in ("t_initial", "warmup_t"):
        options[key] *= updates
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=resolved(cfg, "optimizer.lr"))
    scheduler = CosineLRScheduler(optimizer, t_in_epochs=False, **options)
    peak, floor = 8e-4, 1e-6
    for step in (0, 1, 55, 199, 200, 201, 1000, 2999):
        epoch = step / updates
        if epoch < 20:
            official = peak * epoch / 20
        else:
            official = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - 20) / 280))
        scheduler.step_update(num_updates=step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(official, rel=1e-9, abs=1e-12), step


def test_nd_reviewkd_plus_plus_resnet50_mobilenetv1():
    # methods.md g: kd 8.0, nd 4.0 (train_reviewkd.sh's table and the README; its other command says 6 / 1);
    # ReviewKD's MobileNet mid channels 256, pre-ReLU student stages; ND ImageNet settings, HCL warm-up 5
    # epochs from 0
    cfg = compose_config("experiment=nd-reviewkd++_imagenet_resnet50_mobilenetv1")
    assert dict(cfg.method.weights) == {"ce": 1.0, "reviewkd": 8.0, "nd": 4.0}
    review = objective(cfg, "reviewkd", "ReviewKD")
    assert (review.student_preact, review.teacher_preact, review.max_mid_channels) == (True, True, 256)
    assert warmup(cfg, "reviewkd") == (5, 0) and warmup(cfg, "nd") is None
    assert objective(cfg, "nd", "NormDirection").projector_init == "imagenet"
    assert cfg.dataset.batch_size * cfg.trainer.devices == 512
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("nesterov", 0.2, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90] and cfg.trainer.max_epochs == 100
    assert (cfg.teacher.arch, cfg.student.arch) == ("resnet50", "mobilenetv1_100")
    assert cfg.teacher.reference_top1 == 76.16
    assert cfg.report == "best" and cfg.paper.top1 == 72.96


# methods.md g, ImageNet weights: KD++ (kd, nd), DKD++ (alpha, beta, nd), ReviewKD++ (kd, nd)
LARGER_TEACHERS = {
    "resnet50": {"kd++": (4.0, 1.0), "dkd++": (0.6, 0.5, 2.0), "reviewkd++": (3.0, 2.0)},
    "resnet101": {"kd++": (3.5, 4.0), "dkd++": (0.8, 0.5, 1.0), "reviewkd++": (3.0, 1.0)},
    "resnet152": {"kd++": (4.0, 2.0), "dkd++": (1.0, 1.0, 1.0), "reviewkd++": (3.0, 1.0)},
}


@pytest.mark.parametrize("variant", ["kd++", "dkd++", "reviewkd++"])
@pytest.mark.parametrize("teacher", sorted(LARGER_TEACHERS))
def test_nd_larger_teacher_study_resnet18(teacher, variant):
    # methods.md g: the ND ImageNet settings (100 epochs, batch 512, Nesterov LR 0.2, wd 1e-4, steps 30/60/90,
    # warm-ups 5 epochs from 0) with the per-teacher weights; EmbTrans 512 -> 2048; the results are a figure
    # only
    cfg = compose_config(f"experiment=nd-{variant}_imagenet_{teacher}_resnet18")
    assert (cfg.teacher.arch, cfg.teacher.pretrained, cfg.student.arch) == (teacher, "tv_in1k", "resnet18")
    assert cfg.dataset.batch_size * cfg.trainer.devices == 512 and cfg.trainer.max_epochs == 100
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("nesterov", 0.2, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90]
    weights = LARGER_TEACHERS[teacher][variant]
    nd = objective(cfg, "nd", "NormDirection")
    assert nd.projector_init == "imagenet"
    if variant == "kd++":
        assert dict(cfg.method.weights) == {"ce": 1.0, "kd": weights[0], "nd": weights[1]}
        assert objective(cfg, "kd", "HintonKD").temperature == 1.0 and warmup(cfg, "kd") == (5, 0)
        assert warmup(cfg, "nd") is None  # ND not warmed in ImageNet/train_kd.py
    elif variant == "dkd++":
        assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "nd": weights[2]}
        dkd = objective(cfg, "kd", "DecoupledKD")
        assert (dkd.alpha, dkd.beta, dkd.temperature) == (weights[0], weights[1], 1.0)
        assert warmup(cfg, "kd") == (5, 0)
        assert warmup(cfg, "nd") == (5, 0)  # ImageNet DKD++ warms ND too
    else:
        assert dict(cfg.method.weights) == {"ce": 1.0, "reviewkd": weights[0], "nd": weights[1]}
        review = objective(cfg, "reviewkd", "ReviewKD")
        assert (review.student_preact, review.teacher_preact, review.max_mid_channels) == (True, True, 512)
        assert warmup(cfg, "reviewkd") == (5, 0) and warmup(cfg, "nd") is None
    assert cfg.report == "best" and cfg.paper.top1 is None and "figure only" in cfg.paper.source


@pytest.mark.parametrize("name", [n for n in PAPER_RECIPES if recipe_task(n) == "classification"])
def test_every_paper_recipe_names_its_number_source_and_protocol(name):
    cfg = compose_config(f"experiment={name}")
    assert cfg.paper.source and (isinstance(cfg.paper.top1, float) or "figure only" in cfg.paper.source)
    assert cfg.report in ("best", "last", "weight_average")
    assert cfg.dataset.name in ("cifar100", "imagenet")
    if cfg.dataset.name == "cifar100":
        assert cfg.teacher.checkpoint.endswith(
            f"cifar_teachers/{cfg.teacher.arch}_vanilla/ckpt_epoch_240.pth"
        )
        assert cfg.teacher.reference_top1 is not None
    else:
        assert cfg.teacher.pretrained is not None and cfg.teacher.reference_top1 is not None
    resolved(cfg, "optimizer.lr")  # the LR resolves (kd.scaled_lr where used)


# ---------------------------------------------------------------- ablations

SWEEPS = {
    "ablation_kd_temperature_digits": {"method.objectives.kd.temperature": ["1.0", "2.0", "4.0", "8.0"]},
    "ablation_kd_weight_digits": {"method.weights.kd": ["0.0", "0.45", "0.9", "1.8"]},
    "ablation_kd_temperature": {"method.objectives.kd.temperature": ["1.0", "2.0", "4.0", "8.0"]},
    "ablation_nd_weight": {"method.weights.nd": ["0.0", "0.5", "1.0", "2.0", "4.0", "8.0"]},
    "ablation_srd_distance": {
        "method.objectives.srd.exponent": ["2.0", "4.0", "6.0"],
        "method.objectives.srd.distance": ["logsum", "correlation"],
    },
    "ablation_vkd_projector": {
        "method.objectives.vkd.projector": ["orthogonal", "linear", "mlp"],
        "method.objectives.vkd.normalize_teacher": ["true", "false"],
    },
}
BASES = {
    "ablation_kd_temperature_digits": "digits_kd",
    "ablation_kd_weight_digits": "digits_kd",
    "ablation_kd_temperature": "kd_cifar100_resnet32x4_resnet8x4",
    "ablation_nd_weight": "nd-kd++_cifar100_resnet32x4_resnet8x4",
    "ablation_srd_distance": "srd_imagenet_resnet34_resnet18",
    "ablation_vkd_projector": "vkd_imagenet_regnety_160_deit_ti_convstem",
}


def test_every_ablation_is_checked():
    assert sorted(SWEEPS) == ABLATIONS


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_sweeps_the_stated_parameters_and_every_job_composes(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = {
        key: [v.strip() for v in value.split(",")] for key, value in hydra_cfg.hydra.sweeper.params.items()
    }
    assert params == SWEEPS[name]

    # Without -m the ablation is its base recipe.
    base = OmegaConf.to_container(compose_config(f"experiment={BASES[name]}"), resolve=False)
    assert OmegaConf.to_container(compose_config(f"experiment={name}"), resolve=False) == base

    # Each job of the multirun (the basic sweeper's cartesian product) composes with its value set.
    keys = list(params)
    for values in itertools.product(*(params[key] for key in keys)):
        overrides = [f"{key}={value}" for key, value in zip(keys, values, strict=True)]
        cfg = compose_config(f"experiment={name}", *overrides)
        for key, value in zip(keys, values, strict=True):
            assert str(OmegaConf.select(cfg, key)).lower() == value.lower()


# ND README: the ViT teachers' top-1 under ND's "ResNet-type evaluation" (ImageNet mean / std, as the ND code
# feeds them); the teachers' own (mean = std = 0.5) top-1 is their conf/teacher value
ND_VIT_TEACHERS = {"vit_s": (74.64, 81.4), "vit_b": (78.00, 84.5)}


@pytest.mark.parametrize("variant", ["kd++", "dkd++"])
@pytest.mark.parametrize("teacher", sorted(ND_VIT_TEACHERS))
def test_nd_vit_teachers_see_the_images_as_nd_feeds_them(teacher, variant):
    # ND ImageNet/Dataset/ImageNet.py normalises every image with ImageNet's mean / std and the ViT scripts
    # feed it to the augreg teacher as is: no re-normalisation (input_mean / input_std null), ND's top-1
    cfg = compose_config(f"experiment=nd-{variant}_imagenet_{teacher}_resnet18")
    assert list(cfg.dataset.mean) == [0.485, 0.456, 0.406] and list(cfg.dataset.std) == [0.229, 0.224, 0.225]
    assert cfg.teacher.input_mean is None and cfg.teacher.input_std is None
    assert cfg.teacher.reference_top1 == ND_VIT_TEACHERS[teacher][0]
    assert cfg.teacher.pretrained == "augreg_in21k_ft_in1k"


@pytest.mark.parametrize("teacher", sorted(ND_VIT_TEACHERS))
def test_nd_vit_teachers_own_normalisation_is_one_override_away(teacher):
    # the option the recipes' comment names: the augreg weights' own mean = std = 0.5 and their own top-1
    own = ND_VIT_TEACHERS[teacher][1]
    cfg = compose_config(
        f"experiment=nd-kd++_imagenet_{teacher}_resnet18",
        "teacher.input_mean=[0.5,0.5,0.5]",
        "teacher.input_std=[0.5,0.5,0.5]",
        f"teacher.reference_top1={own}",
    )
    assert list(cfg.teacher.input_mean) == [0.5] * 3 and list(cfg.teacher.input_std) == [0.5] * 3
    assert cfg.teacher.reference_top1 == own
    assert list(cfg.dataset.mean) == [0.485, 0.456, 0.406]  # the data and the student keep ImageNet's
    # ... and the teacher configs themselves keep 0.5 / 0.5 as their default
    plain = compose_config(f"teacher={teacher}", "dataset=imagenet")
    assert list(plain.teacher.input_mean) == [0.5] * 3 and list(plain.teacher.input_std) == [0.5] * 3
    assert plain.teacher.reference_top1 == own
    recipe = (REPO / f"conf/experiment/nd-kd++_imagenet_{teacher}_resnet18.yaml").read_text()
    assert (
        f"teacher.input_mean=[0.5,0.5,0.5] teacher.input_std=[0.5,0.5,0.5] teacher.reference_top1={own}"
        in recipe
    )


def test_reviewkd_resnet50_mobilenetv1_follows_the_code_behind_its_number():
    # methods.md c: weight 8, pre-activation student stages; ABF mid channels 256 as in the original
    # ReviewKD ImageNet code (mdistiller's MAX_MID_CHANNEL 256, which its code ignores)
    cfg = compose_config("experiment=reviewkd_imagenet_resnet50_mobilenetv1")
    review = objective(cfg, "reviewkd", "ReviewKD")
    assert (review.student_preact, review.teacher_preact, review.max_mid_channels) == (True, True, 256)
    assert warmup(cfg, "reviewkd") == (1, 1)  # mdistiller WARMUP_EPOCHS 1, counted from 1: no warm-up
    assert dict(cfg.method.weights) == {"ce": 1.0, "reviewkd": 8.0} and cfg.paper.top1 == 72.56
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.dataset.batch_size) == (0.1, 1e-4, 256)
    assert list(cfg.scheduler.milestones) == [30, 60, 90] and cfg.trainer.max_epochs == 100


# ---------------------------------------------------------------- fidelity to the official code


@pytest.mark.parametrize(
    ("student", "top1", "headline"),
    [("deit_ti_convstem", 79.2, 78.3), ("deit_s_convstem", 82.9, 82.3)],
)
def test_vkd_paper_number_is_the_one_of_its_single_gpu_layout(student, top1, headline):
    # VkD README: one GPU with batch 512 (this recipe's layout) gave 79.2 (DeiT-Ti) / 82.9 (DeiT-S);
    # 78.3 / 82.3 are the headline (multi-GPU) numbers, named in the source
    cfg = compose_config(f"experiment=vkd_imagenet_regnety_160_{student}")
    assert (cfg.dataset.batch_size, cfg.trainer.devices, cfg.trainer.num_nodes) == (512, 1, 1)
    assert cfg.paper.top1 == top1
    assert "single GPU" in cfg.paper.source and str(headline) in cfg.paper.source


# ND ImageNet/ViT/train.sh: KD++ (kd, nd) from its header comment; DKD++ (alpha, beta, nd) from its command
ND_VIT_WEIGHTS = {
    "kd++": {"vit_s": (1.5, 1.0), "vit_b": (2.0, 1.0)},
    "dkd++": {"vit_s": (1.4, 0.5, 2.0), "vit_b": (1.4, 0.5, 2.0)},
}


@pytest.mark.parametrize("variant", sorted(ND_VIT_WEIGHTS))
@pytest.mark.parametrize("teacher", sorted(ND_VIT_TEACHERS))
def test_nd_vit_resnet18_weights_and_settings(teacher, variant):
    # ND ImageNet/ViT/train_kd.py / train_dkd.py defaults and train.sh: 100 epochs, batch 512, Nesterov LR
    # 0.2, wd 1e-4, x0.1 at 30/60/90, T 1, warm-up min(1, epoch / 5) from epoch 0 (DKD++: on the ND term too)
    cfg = compose_config(f"experiment=nd-{variant}_imagenet_{teacher}_resnet18")
    assert cfg.dataset.batch_size * cfg.trainer.devices == 512 and cfg.trainer.max_epochs == 100
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("nesterov", 0.2, 1e-4)
    assert list(cfg.scheduler.milestones) == [30, 60, 90]
    assert objective(cfg, "nd", "NormDirection").projector_init == "imagenet"
    weights = ND_VIT_WEIGHTS[variant][teacher]
    if variant == "kd++":
        assert dict(cfg.method.weights) == {"ce": 1.0, "kd": weights[0], "nd": weights[1]}
        assert objective(cfg, "kd", "HintonKD").temperature == 1.0
        assert warmup(cfg, "kd") == (5, 0) and warmup(cfg, "nd") is None
    else:
        dkd = objective(cfg, "kd", "DecoupledKD")
        assert (dkd.alpha, dkd.beta, dkd.temperature) == (weights[0], weights[1], 1.0)
        assert dict(cfg.method.weights) == {"ce": 1.0, "kd": 1.0, "nd": weights[2]}
        assert warmup(cfg, "kd") == (5, 0) and warmup(cfg, "nd") == (5, 0)


def test_nd_dkd_plus_plus_vit_s_notes_the_train_sh_conflict():
    # train.sh's header comment gives ViT-S alpha 1.0, beta 1.0 (nd 2.0); its command runs --teacher vits with
    # 1.4 / 0.5, which the recipe keeps: the Choice note gives both
    text = (REPO / "conf/experiment/nd-dkd++_imagenet_vit_s_resnet18.yaml").read_text()
    assert "Choice:" in text and "1.0*alpha + 1.0*beta + 2.0*nd" in text
    assert "method.objectives.kd.alpha=1.0 method.objectives.kd.beta=1.0" in text


@pytest.mark.parametrize("teacher", sorted(ND_VIT_TEACHERS))
def test_nd_vit_student_classifier_init(teacher):
    # ImageNet/ViT/train_kd.py wraps the student in EmbTrans, whose init loop re-draws the ResNet-18 fc with
    # weight and bias ~ N(0, 0.01); train_dkd.py does not wrap it for a ViT teacher
    kd = compose_config(f"experiment=nd-kd++_imagenet_{teacher}_resnet18")
    assert dict(kd.student.classifier_init) == {"weight_std": 0.01, "bias_std": 0.01}
    dkd = compose_config(f"experiment=nd-dkd++_imagenet_{teacher}_resnet18")
    assert dkd.student.classifier_init is None
    for variant in ("kd++", "dkd++"):
        text = (REPO / f"conf/experiment/nd-{variant}_imagenet_{teacher}_resnet18.yaml").read_text()
        assert "--norm_loss_factor" in text and "--nd_loss_factor" in text  # the shipped commands' flag
        assert "./ckpt/vitb/center_emb_train.json" in text  # the class centres' path


# ND's CIFAR student classifiers (weight_std, bias_std): CIFAR/Models/resnet_cifar.py (N(0, 0.01) weight and
# bias), CIFAR/Models/mobilenetv2_cifar.py (N(0, 0.01) weight, zero bias), CIFAR/DIST++/models/wrn_cifar.py
# (default weight, zero bias), ShuffleNets (default weight; the EmbTrans wrapper zeroes the bias). ReviewKD++
# builds every student inside its ReviewKD wrapper (CIFAR/ReviewKD++/models/reviewkd.py), which zeroes every
# Linear bias, the ResNets' too.
ND_CIFAR_CLASSIFIER_INIT = {
    "resnet56_resnet20": (0.01, 0.01),
    "resnet32x4_resnet8x4": (0.01, 0.01),
    "ResNet50_MobileNetV2": (0.01, 0.0),
    "wrn_40_2_wrn_40_1": (None, 0.0),
    "resnet32x4_ShuffleV1": (None, 0.0),
    "resnet32x4_ShuffleV2": (None, 0.0),
}


@pytest.mark.parametrize("variant", ["kd++", "dkd++", "dist++", "reviewkd++"])
@pytest.mark.parametrize("pair", sorted(ND_CIFAR_CLASSIFIER_INIT))
def test_nd_cifar100_student_classifier_init(pair, variant):
    weight_std, bias_std = ND_CIFAR_CLASSIFIER_INIT[pair]
    if variant == "reviewkd++":
        bias_std = 0.0
    cfg = compose_config(f"experiment=nd-{variant}_cifar100_{pair}")
    assert dict(cfg.student.classifier_init) == {"weight_std": weight_std, "bias_std": bias_std}
    text = (REPO / f"conf/experiment/nd-{variant}_cifar100_{pair}.yaml").read_text()
    student_comment = text.split("classifier_init:")[0].rsplit("student:", 1)[1]
    assert "CIFAR/" in student_comment and "ND's student init" in student_comment  # names ND's file


REVIEWKD_CIFAR100 = [name for name in EXPERIMENTS if name.startswith("reviewkd_cifar100_")]


def test_every_reviewkd_cifar100_recipe_is_checked():
    assert len(REVIEWKD_CIFAR100) == 6


@pytest.mark.parametrize("name", REVIEWKD_CIFAR100)
def test_reviewkd_cifar100_follows_the_original_train_py(name):
    # dvlab-research/ReviewKD CIFAR-100/train.py: lr_schedule at the end of each 0-based epoch lowers the LR
    # after epochs 150 / 180 / 210 (first epochs at the new LR: 151 / 181 / 211), and the teacher is never put
    # in eval mode (the framework keeps it frozen in eval mode: a Difference note says so)
    cfg = compose_config(f"experiment={name}")
    assert list(cfg.scheduler.milestones) == [151, 181, 211] and cfg.scheduler.gamma == 0.1
    assert (cfg.dataset.batch_size, cfg.optimizer.opt, cfg.trainer.max_epochs) == (128, "nesterov", 240)
    assert warmup(cfg, "reviewkd") == (20, 0)  # the original repo counts epochs from 0
    header = (REPO / f"conf/experiment/{name}.yaml").read_text().split("defaults:")[0]
    difference = header[header.index("# Difference: dvlab-research/ReviewKD CIFAR-100/train.py") :]
    assert "eval mode" in difference and "[151, 181, 211]" in difference


@pytest.mark.parametrize("pair", sorted(ND_CIFAR_CLASSIFIER_INIT))
def test_nd_reviewkd_plus_plus_cifar100_keeps_nds_lr_timing(pair):
    # ND's CIFAR/ReviewKD++/train_reviewkd.py lowers the LR at the start of epochs 150 / 180 / 210
    cfg = compose_config(f"experiment=nd-reviewkd++_cifar100_{pair}")
    assert list(cfg.scheduler.milestones) == [150, 180, 210]


# ---------------------------------------------------------------- the shape of every recipe's method


def _targets(node, path="method") -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}._target_"] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{path}.{key}")
        return found
    if isinstance(node, list):
        return [hit for index, value in enumerate(node) for hit in _targets(value, f"{path}[{index}]")]
    return []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipes_name_no_classes_under_method(name):
    # a recipe overrides single keys of its method YAML; the classes live in conf/method/ only
    method = OmegaConf.load(REPO / f"conf/experiment/{name}.yaml").get("method")
    method = OmegaConf.to_container(method) if method is not None else None
    assert _targets(method) == []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipe_methods_have_the_mapping_shape(name):
    # no leftover keys of the old shape (method.objective, warm-up arguments) merge in silently
    cfg = compose_config(f"experiment={name}")
    assert set(cfg.method) <= {"task", "name", "objectives", "weights", "warmup"}
    for term, found in cfg.method.objectives.items():
        assert found._target_.startswith("kd_experiments.methods."), term
        assert not {"warmup_epochs", "warmup_epoch_base", "kd_logits"} & set(found), term
    assert set(cfg.method.objectives) <= set(cfg.method.weights)
    assert set(cfg.method.get("warmup") or {}) <= set(cfg.method.weights)
