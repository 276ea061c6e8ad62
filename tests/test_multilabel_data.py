"""The multi-label data (VOC 2007, COCO 2014 as LSHFM reads them), from tiny trees in the real layouts
(tests/detection_fixtures.py): the exact multi-hot targets with VOC's difficult handling, the transforms,
the batch format, the seeded augmentation with 0 and 2 workers, the configs, and bad input as one line."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision import transforms

from kd_experiments.data.base import ClassificationData, ShardedEvalSampler
from kd_experiments.data.sampling import KeyedSampler
from kd_experiments.detection.voc import VOC_CLASSES
from kd_experiments.errors import UserError
from kd_experiments.multilabel.data import (
    IGNORED,
    COCOMultiLabelData,
    MultiLabelData,
    VOCMultiLabelData,
)
from tests.conftest import compose_config
from tests.detection_fixtures import VOC_IMAGES, VocImage, VocObject, write_coco_tree, write_voc_tree

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# A test image with a class both difficult and not (present) and one only difficult (ignored).
MIXED = VocImage(
    "000006",
    ("test",),
    (
        VocObject("dog", (2, 2, 20, 20), difficult=True),
        VocObject("dog", (25, 5, 60, 40)),
        VocObject("cat", (5, 30, 20, 45), difficult=True),
    ),
)
VOC_FIXTURE = (*VOC_IMAGES, MIXED)


def multi_hot(**classes: float) -> list[float]:
    row = [0.0] * len(VOC_CLASSES)
    for name, value in classes.items():
        row[VOC_CLASSES.index(name)] = value
    return row


def targets_of(dataset) -> list[list[float]]:
    return [dataset[i][1].tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc_tree(tmp_path_factory.mktemp("voc") / "VOC2007", images=VOC_FIXTURE)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco_tree(tmp_path_factory.mktemp("coco") / "coco", splits=("train2014", "val2014"))


def voc(root, **options) -> VOCMultiLabelData:
    data = VOCMultiLabelData(root=str(root), **{"image_size": 32, "num_workers": 0, **options})
    data.setup("fit")
    return data


def coco(root, **options) -> COCOMultiLabelData:
    data = COCOMultiLabelData(
        root=str(root), **{"num_classes": 3, "image_size": 32, "num_workers": 0, **options}
    )
    data.setup("fit")
    return data


def test_voc_targets_count_difficult_only_as_positive_in_training_and_ignored_in_validation(voc_root):
    data = voc(voc_root)
    assert (data.task, data.name, data.num_classes, data.class_names) == (
        "multilabel", "voc_multilabel", 20, list(VOC_CLASSES),
    )  # fmt: skip
    assert data.normalization == IMAGENET and IGNORED == -1.0
    # trainval: 000001 (dog, difficult person), 000002 (car), 000003 (cat, dog).
    assert targets_of(data.train_set) == [
        multi_hot(dog=1, person=1),  # the difficult-only person is a positive in training (LSHFM)
        multi_hot(car=1),
        multi_hot(cat=1, dog=1),
    ]
    # test: 000004 (person, difficult bottle), 000005 (tvmonitor), 000006 (dog twice, one difficult; a
    # difficult cat).
    assert targets_of(data.val_set) == [
        multi_hot(person=1, bottle=-1),
        multi_hot(tvmonitor=1),
        multi_hot(dog=1, cat=-1),
    ]
    image, target = data.val_set[1]  # a 40 x 56 image, warped to the square
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.shape == (20,) and target.dtype == torch.float32
    assert str(data.train_set.paths[2]).endswith("VOC2007/JPEGImages/000003.jpg")
    assert data.train_set.targets.dtype == np.int8  # packed, one array for all images


def test_voc_devkit_trains_on_07_plus_12_when_asked(tmp_path):
    write_voc_tree(tmp_path / "VOCdevkit", years=(2007, 2012))
    data = voc(tmp_path, train_sets=[[2007, "trainval"], [2012, "trainval"]])
    assert (len(data.train_set), len(data.val_set)) == (6, 2)
    assert str(data.train_set.paths[3]).endswith("VOC2012/JPEGImages/000001.jpg")
    assert data.train_set[3][1].tolist() == multi_hot(dog=1, person=1)


def test_coco_targets_count_every_annotation_and_skip_unannotated_images(coco_root):
    data = coco(coco_root)
    # Categories 3, 7, 12 -> targets 0, 1, 2 (car, dog, zebra), named by the JSON.
    assert (data.name, data.class_names) == ("coco_multilabel", ["car", "dog", "zebra"])
    # Images in id order; 19 has no annotation. Image 7: a zebra and a dog whose box has no area (a label
    # all the same); 42: a car, a dog and a crowd zebra; 100: only a crowd car.
    expected = [[0, 1, 1], [1, 1, 1], [1, 0, 0]]
    for split in (data.train_set, data.val_set):
        assert targets_of(split) == expected
        assert [str(path).rsplit("/", 1)[1] for path in split.paths] == [
            "000000000007.jpg", "000000000042.jpg", "000000000100.jpg",
        ]  # fmt: skip
    assert str(data.val_set.paths[0]).endswith("val2014/000000000007.jpg")
    assert data.val_set[0][0].shape == (3, 32, 32)
    everything = coco(coco_root, keep_unannotated=True)
    assert targets_of(everything.val_set) == [[0, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0]]


def test_transforms_warp_flip_jitter_and_normalise(voc_root):
    path = voc_root / "JPEGImages" / "000005.jpg"
    warped = transforms.Resize((32, 32))(Image.open(path).convert("RGB"))
    expected = transforms.Normalize(*IMAGENET)(transforms.ToTensor()(warped))
    plain = voc(voc_root)
    assert torch.equal(plain.val_set[1][0], expected)
    # Without jitter, training is the evaluation image, flipped or not as hflip says.
    for hflip, image in ((0.0, expected), (1.0, expected.flip(-1))):
        data = voc(voc_root, hflip=hflip, color_jitter=None)
        data.train_set.paths = data.val_set.paths  # the same file through the training transform
        assert torch.equal(data.train_set[1][0], image)
    assert [type(step).__name__ for step in plain.train_transform().transforms] == [
        "Resize", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize",
    ]  # fmt: skip
    jitter = plain.train_transform().transforms[2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.7, 1.3), (0.7, 1.3), (0.7, 1.3), None,
    )  # fmt: skip
    bicubic = voc(voc_root, interpolation="bicubic").eval_transform().transforms[0]
    assert bicubic.interpolation == transforms.InterpolationMode.BICUBIC


def training_batches(data: ClassificationData, epoch: int) -> list:
    loader = data.train_dataloader()
    data.train_sampler.set_epoch(epoch)
    return list(loader)


def test_batches_and_seeded_augmentation_are_the_same_with_0_and_2_workers(voc_root):
    runs = []
    for workers in (0, 2):
        data = voc(voc_root, batch_size=2, eval_batch_size=2, num_workers=workers)
        data.augmentation_seed = 11
        torch.manual_seed(workers)  # the process's own stream must not matter
        runs.append((training_batches(data, epoch=1), list(data.whole_val_dataloader())))
    (train0, val0), (train2, val2) = runs
    assert [len(batch) for batch in train0] == [3, 3] and [len(batch) for batch in val0] == [2, 2]
    images, targets, keys = train0[0]
    assert images.shape == (2, 3, 32, 32) and targets.shape == (2, 20) and targets.dtype == torch.float32
    assert keys.dtype == torch.int64 and keys.shape == (2, 5) and keys[:, 0].tolist() == [1, 1]
    for index, target in zip(keys[:, 2].tolist(), targets, strict=True):
        assert torch.equal(target, data.train_set[index][1])
    for first, second in ((train0, train2), (val0, val2)):
        for batch0, batch2 in zip(first, second, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(batch0, batch2, strict=True))
    moved = data.transfer_batch_to_device(train0[0], torch.device("cpu"), 0)
    assert moved[2] is keys  # the keys stay on the CPU
    # Another seed jitters (and may flip) the same images differently.
    data.augmentation_seed = 12
    other = training_batches(data, epoch=1)
    assert not torch.equal(other[0][0], train0[0][0]) or not torch.equal(other[1][0], train0[1][0])


def test_device_normalisation_matches_the_loaders(voc_root):
    plain = voc(voc_root, eval_batch_size=3)
    raw = voc(voc_root, eval_batch_size=3, normalize_on_device=True)
    images, targets = next(iter(plain.whole_val_dataloader()))
    raw_images, raw_targets = next(iter(raw.whole_val_dataloader()))
    assert raw_images.dtype == torch.uint8 and torch.equal(raw_targets, targets)
    normalised = raw.on_after_batch_transfer([raw_images, raw_targets], 0)[0]
    assert torch.allclose(normalised, images, atol=1e-6)


def test_ddp_ranks_share_validation_without_repeats(coco_root):
    data = coco(coco_root, keep_unannotated=True, batch_size=1)
    seen = []
    for rank in range(3):
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, ShardedEvalSampler)
        seen += [row.tolist() for _images, targets in loader for row in targets]
        assert isinstance(data.train_dataloader().sampler, KeyedSampler)
    assert sorted(seen) == sorted(targets_of(data.val_set))


def test_every_yaml_key_is_a_constructor_argument_and_back(tmp_path):
    shared = set()
    for cls in (MultiLabelData, ClassificationData):
        shared |= set(inspect.signature(cls.__init__).parameters) - {"self", "common"}
    for dataset, cls in (("voc_multilabel", VOCMultiLabelData), ("coco_multilabel", COCOMultiLabelData)):
        config = compose_config(f"dataset={dataset}", f"paths.data_dir={tmp_path}").dataset
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "common"}
        assert set(config) - {"_target_"} == own | shared, dataset
        data = instantiate(config)
        assert isinstance(data, cls) and (data.name, data.task) == (dataset, "multilabel")
        assert (data.image_size, data.channels, data.hflip) == (448, 3, 0.5)
        assert data.color_jitter == (0.3, 0.3, 0.3, 0.0) and data.normalization == IMAGENET
    voc_data = instantiate(compose_config("dataset=voc_multilabel").dataset)
    assert (voc_data.num_classes, voc_data.batch_size, voc_data.eval_batch_size) == (20, 16, 64)
    assert voc_data.train_sets == [(2007, "trainval")] and voc_data.val_sets == [(2007, "test")]
    coco_data = instantiate(compose_config("dataset=coco_multilabel").dataset)
    assert (coco_data.num_classes, coco_data.batch_size, coco_data.eval_batch_size) == (80, 32, 32)
    assert (coco_data.train_split, coco_data.val_split, coco_data.keep_unannotated) == (
        "train2014", "val2014", False,
    )  # fmt: skip


def one_line(build) -> str:
    with pytest.raises(UserError) as error:
        build()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_what_and_how_to_fix(tmp_path, voc_root, coco_root):
    constructor = {
        "dataset.task of a multi-label data set must be multilabel, got 'detection'": dict(task="detection"),
        "multi-label images are RGB: keep dataset.channels=3, got 1": dict(channels=1),
        "Pascal VOC has 20 classes; set dataset.num_classes=20, got 21": dict(num_classes=21),
        "dataset.hflip is the probability of a horizontal flip, in [0, 1]; got 2": dict(hflip=2),
        "dataset.color_jitter must be null or [brightness, contrast, saturation, hue]": dict(
            color_jitter=[0.3, 0.3]
        ),
        "hue <= 0.5, e.g. [0.3, 0.3, 0.3, 0.0] (LSHFM); got [0, 0, 0, 0.7]": dict(
            color_jitter=[0, 0, 0, 0.7]
        ),
        "dataset.interpolation must be bilinear or bicubic, got 'lanczos'": dict(interpolation="lanczos"),
        "dataset.mean must be 3 numbers (R, G, B); got [0.5]": dict(mean=[0.5]),
        "dataset.std must be 3 numbers (R, G, B), each above 0; got [0.2, 0, 0.2]": dict(std=[0.2, 0, 0.2]),
        "dataset.image_size must be a positive integer, got 0": dict(image_size=0),
        "dataset.train_sets entries are [year, split] pairs": dict(train_sets=[[2007]]),
    }
    for expected, options in constructor.items():
        assert expected in one_line(lambda o=options: VOCMultiLabelData(root=str(voc_root), **o)), expected
    assert "dataset.num_classes must be a positive integer, got 0" in one_line(
        lambda: COCOMultiLabelData(root=str(coco_root), num_classes=0)
    )
    # The readers' own checks (detection/voc.py, coco.py) reach the multi-label modules unchanged.
    assert "VOC root (dataset.root) not found at" in one_line(lambda: voc(tmp_path / "nowhere"))
    assert "dataset.train_sets asks for VOC2012" in one_line(
        lambda: voc(write_voc_tree(tmp_path / "VOCdevkit", years=(2007,)), train_sets=[[2012, "trainval"]])
    )
    assert "COCO root (dataset.root) not found at" in one_line(lambda: coco(tmp_path / "nowhere"))
    message = one_line(lambda: coco(coco_root, num_classes=80))
    assert message.endswith("has 3 categories but dataset.num_classes=80; set dataset.num_classes=3")
    assert "instances_train2014.json has 3 categories" in message
    message = one_line(lambda: coco(coco_root, train_split="train2017"))
    assert f"COCO annotation file not found at {coco_root}/annotations/instances_train2017.json" in message
    empty = write_coco_tree(tmp_path / "empty", splits=("train2014", "val2014"), annotations=())
    assert "no image of" in one_line(lambda: coco(empty)) and "keep_unannotated=true" in one_line(
        lambda: coco(empty)
    )
    assert len(coco(empty, keep_unannotated=True).train_set) == 4  # all negatives, when asked for
    other = write_coco_tree(tmp_path / "other", splits=("train2014", "val2014"))
    (other / "annotations/instances_val2014.json").write_text(
        (other / "annotations/instances_val2014.json").read_text().replace('"zebra"', '"horse"')
    )
    assert "the categories of" in one_line(lambda: coco(other))
