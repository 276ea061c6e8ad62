"""The LSHFM VOC detection recipes (conf/experiment/lshfm_voc_fasterrcnn_*.yaml): each trains 2 steps on a
generated VOC devkit with narrow detectors and nothing downloaded, and holds the values of the official code,
DoctorKey/LSHFM.detection (each test names the files its values come from; methods.md h)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.scheduler import MultiStepLRScheduler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from kd_experiments.detection.features import DetectorOutput
from kd_experiments.detection.models import create_detector
from kd_experiments.module import DistillationModule
from kd_experiments.recipes import markdown_table
from kd_experiments.train import train
from tests.conftest import compose_config
from tests.detection_fixtures import write_voc_tree

# The README's Faster R-CNN table: recipe -> the row's mAP@.5.
RECIPES = {
    "lshfm_voc_fasterrcnn_resnet101_resnet50_l2": 83.0,
    "lshfm_voc_fasterrcnn_resnet101_resnet50_lsh": 82.6,
    "lshfm_voc_fasterrcnn_resnet101_resnet50_lshl2": 83.0,
    "lshfm_voc_fasterrcnn_vgg16fpn_vgg11fpn_l2": 76.8,
    "lshfm_voc_fasterrcnn_vgg16fpn_vgg11fpn_lsh": 76.7,
    "lshfm_voc_fasterrcnn_vgg16fpn_vgg11fpn_lshl2": 77.2,
}
# pair -> (teacher, student, teacher mAP@.5, student baseline mAP@.5, the teacher file LSHFM released).
PAIRS = {
    "resnet101_resnet50": (
        "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet50_fpn", 83.6, 82.0, "voc0712_fasterrcnn_r101_83.6.ckpt"
    ),
    "vgg16fpn_vgg11fpn": (
        "fasterrcnn_vgg16_fpn", "fasterrcnn_vgg11_fpn", 79.0, 75.1, "voc0712_fasterrcnn_vgg16fpn_79.0.ckpt"
    ),
}  # fmt: skip
VARIANTS = ("l2", "lsh", "lshl2")
# VOC2007 trainval + VOC2012 trainval (voc_utils.get_voc0712: "train: 16551"), over 4 processes in batches
# of 2: DistributedSampler pads to ceil(16551 / 4) = 4138 images per process, 2069 updates per epoch.
TRAIN_IMAGES, PROCESSES, BATCH = 16551, 4, 2
UPDATES_PER_EPOCH = math.ceil(math.ceil(TRAIN_IMAGES / PROCESSES) / BATCH)
# Sizes that train in seconds on CPU: 64-pixel images, narrow FPN and box head, few proposals and samples.
SMALL = {
    "min_size": 64, "max_size": 64, "fpn_channels": 16, "representation_size": 32,
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20, "rpn_batch_size_per_image": 16, "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
}  # fmt: skip


def pair_of(name: str) -> str:
    return next(pair for pair in PAIRS if pair in name)


@pytest.fixture(scope="module")
def voc_devkit(tmp_path_factory) -> Path:
    """A VOCdevkit holding VOC2007/ and VOC2012/ (3 trainval images and 2 test images each)."""
    return write_voc_tree(tmp_path_factory.mktemp("voc") / "VOCdevkit", years=(2007, 2012))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_two_steps_on_a_generated_voc_devkit(name, voc_devkit, tmp_path):
    roles = ("teacher", "student")
    small = [f"++{role}.model_kwargs.{key}={value}" for role in roles for key, value in SMALL.items()]
    cfg = compose_config(
        f"experiment={name}", f"dataset.root={voc_devkit}", "dataset.num_workers=0",
        # 07+12 trainval here is 6 images: batches of 3 make the 2 steps one whole epoch, which validates.
        "dataset.batch_size=3", "logger=none", "trainer.max_steps=2", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.strategy=auto", "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false", "++trainer.enable_checkpointing=false",
        "teacher.checkpoint=null", "teacher.weights=random", "student.model_kwargs.backbone_weights=null",
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *small,
    )  # fmt: skip
    result = train(cfg)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["paper"]["map50"] == RECIPES[name] and summary["dataset"] == "voc"
    assert summary["val_images"] == 2  # VOC2007 test
    assert summary["report_map"] == "map50" and result == summary["student_map_reported"]
    assert summary["student_map_reported"] == summary["student_map50"]
    assert summary["gap_to_paper"] == round(summary["student_map50"] - RECIPES[name], 2)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_training_protocol_is_train_py_and_the_scripts(name):
    # experiments/voc0712_fasterrcnn_*.sh: 4 GPUs, --epochs 24 --lr-steps 18 22 --lr 0.01 --lr-warmup 1000;
    # src/train.py: -b 2 per GPU, SGD momentum 0.9, wd 1e-4, --lr-gamma 0.1, test loader batch 1
    cfg = compose_config(f"experiment={name}")
    assert (cfg.trainer.max_epochs, cfg.trainer.devices, cfg.trainer.strategy) == (24, 4, "ddp")
    assert (cfg.dataset.batch_size, cfg.dataset.eval_batch_size) == (BATCH, 1)
    optimizer = cfg.optimizer
    assert (optimizer.opt, optimizer.lr, optimizer.momentum) == ("momentum", 0.01, 0.9)
    assert optimizer.weight_decay == 1e-4
    assert optimizer.filter_bias_and_bn is False  # weight decay on every parameter, as torch.optim.SGD
    scheduler = cfg.scheduler
    assert scheduler._target_ == "timm.scheduler.MultiStepLRScheduler" and scheduler.interval == "step"
    assert list(scheduler.decay_t) == [18, 22] and scheduler.decay_rate == 0.1
    assert scheduler.warmup_prefix is False and scheduler.warmup_lr_init == pytest.approx(optimizer.lr / 1000)
    assert round(scheduler.warmup_t * UPDATES_PER_EPOCH) == 1000  # the warm-up in updates
    # voc_utils.get_voc0712: train on 07+12 trainval without difficult objects, test on 07 test without them
    dataset = cfg.dataset
    assert dataset.name == "voc" and dataset.hflip == 0.5
    assert OmegaConf.to_container(dataset.train_sets) == [[2007, "trainval"], [2012, "trainval"]]
    assert OmegaConf.to_container(dataset.val_sets) == [[2007, "test"]]
    assert dataset.train_with_difficult is False and dataset.val_difficult == "drop"
    assert (cfg.report, cfg.report_map, cfg.optimized_metric) == ("last", "map50", "student_map_reported")


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_the_lr_of_every_update_is_lshfms(pair):
    """engine.py warms up over the first 1000 iterations from lr / 1000 (utils.warmup_lr_scheduler);
    train.py's MultiStepLR lowers the LR x0.1 after epochs 18 and 22. The recipe's timm schedule, converted
    to updates as the module converts it for 2069 updates per epoch, gives every update the same LR but the
    last update of epochs 18 and 22 (timm applies a milestone one update early; a Difference note says so)."""
    cfg = compose_config(f"experiment=lshfm_voc_fasterrcnn_{pair}_l2")
    settings = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = settings.pop("interval")
    factory = instantiate(settings)
    module = SimpleNamespace(
        scheduler_factory=factory, scheduler_interval=interval, updates_per_epoch=lambda: UPDATES_PER_EPOCH
    )
    arguments = DistillationModule._scheduler_arguments(module)
    assert arguments["warmup_t"] == 1000
    assert arguments["decay_t"] == [18 * UPDATES_PER_EPOCH, 22 * UPDATES_PER_EPOCH]
    lr = cfg.optimizer.lr
    scheduler = factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), **arguments)
    assert isinstance(scheduler, MultiStepLRScheduler)

    def lshfm(update: int) -> float:  # update counted from 0, as engine.py's iterations
        epoch = update // UPDATES_PER_EPOCH
        factor = 0.1 ** sum(epoch >= milestone for milestone in (18, 22))
        if epoch == 0 and update < 1000:
            alpha = update / 1000
            factor *= 1 / 1000 * (1 - alpha) + alpha
        return lr * factor

    # The module steps the schedule with the number of updates done, so update u runs at the LR of t = u.
    differing = [
        update
        for update in range(24 * UPDATES_PER_EPOCH)
        if not math.isclose(scheduler._get_lr(update)[0], lshfm(update), rel_tol=1e-9)
    ]
    assert differing == [18 * UPDATES_PER_EPOCH - 1, 22 * UPDATES_PER_EPOCH - 1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_detectors_are_fasterrcnn_kds(name):
    # src/model/faster_rcnn_KD.py fasterrcnn_r50_with_r101 / fasterrcnn_vgg11fpn_with_vgg16fpn and
    # src/model/faster_rcnn.py: --min-size 480 ... 800, max 1333, rpn_pre_nms_top_n 4000 / 2000, FPN 256,
    # TwoMLPHead 1024, default anchors; the student's backbone from torchvision's ImageNet weights, 3 stages
    # trainable; the teacher from LSHFM's released file
    cfg = compose_config(f"experiment={name}")
    teacher, student, _, _, teacher_file = PAIRS[pair_of(name)]
    assert (cfg.teacher.arch, cfg.student.arch) == (teacher, student)
    assert cfg.teacher.checkpoint.endswith(f"/lshfm_detection/{teacher_file}")
    assert cfg.teacher.train_if_missing is False and cfg.teacher.weights is None
    for role in ("teacher", "student"):
        kwargs = cfg[role].model_kwargs
        assert list(kwargs.min_size) == list(range(480, 801, 32)) and kwargs.max_size == 1333
        assert (kwargs.fpn_channels, kwargs.representation_size) == (256, 1024)
        assert list(kwargs.anchor_sizes) == [32, 64, 128, 256, 512]
        assert list(kwargs.aspect_ratios) == [0.5, 1.0, 2.0]
        assert (kwargs.rpn_pre_nms_top_n_train, kwargs.rpn_pre_nms_top_n_test) == (4000, 2000)
        assert (kwargs.rpn_post_nms_top_n_train, kwargs.rpn_post_nms_top_n_test) == (2000, 1000)
        # resnet_fpn_backbone's FrozenBatchNorm2d; VGG has no normalisation layers
        assert kwargs.get("norm") == ("frozen" if "resnet" in name else None)
        assert "box_batch_size_per_image" not in kwargs  # FasterRCNN's defaults, as LSHFM's
    assert cfg.student.model_kwargs.backbone_weights == "IMAGENET1K_V1"
    assert cfg.student.model_kwargs.trainable_layers == 3
    assert "backbone_weights" not in cfg.teacher.model_kwargs  # the checkpoint holds every weight


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_method_is_the_scripts_distill_option(name):
    # the scripts' --distill l2 | lsh | lshl2 --beta 7 --bias 0; src/train.py --hash-num / --std default None:
    # 4 x feature_dim hashes and the std of the teacher's cls_score weight (faster_rcnn_KD.py)
    cfg = compose_config(f"experiment={name}")
    variant = name.rsplit("_", 1)[1]
    assert cfg.method.name == f"detection_{variant}"
    terms = {"l2": {"l2"}, "lsh": {"lsh"}, "lshl2": {"l2", "lsh"}}[variant]
    assert dict(cfg.method.weights) == {"detection": 1.0} | {term: 7.0 for term in terms}
    if "lsh" in terms:
        lsh = cfg.method.objectives.lsh
        assert (lsh.num_hashes, lsh.std, lsh.hash_seed) == (None, None, 0)
        objective = instantiate(lsh)
        features = DetectorOutput(roi_embedding=torch.zeros(2, 1024))
        objective.setup(features, features)
        assert objective.hash_weight.shape == (4096, 1024) and not objective.hash_bias.any()


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_the_three_recipes_of_a_pair_differ_only_in_method_and_number(pair):
    configs = {}
    for variant in VARIANTS:
        name = f"lshfm_voc_fasterrcnn_{pair}_{variant}"
        cfg = OmegaConf.to_container(compose_config(f"experiment={name}"))
        configs[variant] = cfg
        assert cfg.pop("method")["name"] == f"detection_{variant}"
        paper = cfg.pop("paper")
        _, _, teacher_map, student_map, _ = PAIRS[pair]
        assert paper["dataset"] == "voc" and paper["map50"] == RECIPES[name]
        assert (paper["teacher_map50"], paper["student_map50"]) == (teacher_map, student_map)
        assert variant.upper() in paper["source"] and "LSHFM.detection README" in paper["source"]
    assert configs["l2"] == configs["lsh"] == configs["lshl2"]


def test_teacher_state_dict_layouts_are_lshfms():
    """LSHFM's released teachers are state dicts of its FasterRCNN (src/model/faster_rcnn.py, torchvision's
    modules): the ResNet-101 teacher over torchvision's resnet_fpn_backbone; the VGG16-FPN teacher over
    src/model/vgg_fpn.py, five stages `layer1` ... `layer5`, each `nn.Sequential(features[a:b])` with the
    bounds of its `cfgs` ('vgg16': [5, 10, 17, 24]) and each ending with its max-pool, the FPN on stages 2-5.
    (The FPN and RPN-head keys differ by torchvision version, not by layout: 0.8.2's `inner_blocks.0.weight`
    is today's `inner_blocks.0.0.weight`.)"""
    small = {"fpn_channels": 16, "representation_size": 32}
    ours = create_detector("fasterrcnn_resnet101_fpn", 20, norm="frozen", **small).state_dict()
    backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=0)
    reference = FasterRCNN(backbone, num_classes=21)  # LSHFM's VOC num_classes, the background included
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    assert set(ours) == set(shapes)
    assert not any(key.endswith("num_batches_tracked") for key in ours)  # FrozenBatchNorm2d throughout

    vgg = create_detector("fasterrcnn_vgg16_fpn", 20, **small).eval()
    bounds = [0, 5, 10, 17, 24, 31]
    features = torchvision.models.vgg16().features
    expected = {
        f"backbone.body.layer{stage}.0.{index}.{part}"
        for stage in range(1, 6)
        for index, layer in enumerate(features)
        if isinstance(layer, torch.nn.Conv2d) and bounds[stage - 1] <= index < bounds[stage]
        for part in ("weight", "bias")
    }
    assert {key for key in vgg.state_dict() if key.startswith("backbone.body.")} == expected
    with torch.no_grad():
        maps = vgg.backbone(torch.zeros(1, 3, 128, 128))
    # strides 4 ... 64: each stage's map after its max-pool
    assert {name: tuple(m.shape[-2:]) for name, m in maps.items()} == {
        "0": (32, 32), "1": (16, 16), "2": (8, 8), "3": (4, 4), "pool": (2, 2),
    }  # fmt: skip


def test_recipe_table_shows_the_detection_rows_map50():
    table = markdown_table()
    assert "| recipe | paper number | command |" in table
    assert "| `lshfm_voc_fasterrcnn_resnet101_resnet50_l2` | mAP@.5 83.00 |" in table
    assert "| `lshfm_voc_fasterrcnn_vgg16fpn_vgg11fpn_lshl2` | mAP@.5 77.20 |" in table
    assert "| `lshfm_imagenet_resnet34_resnet18` | top-1 71.72 |" in table
