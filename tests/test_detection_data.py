"""The detection data: VOC and COCO read from tiny trees in their real layouts (tests/detection_fixtures.py),
the generated shapes, the seeded flip, the batch format, the loaders, and every bad input as one line."""

import inspect
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from kd_experiments.data.base import ShardedEvalSampler
from kd_experiments.data.sampling import KeyedSampler
from kd_experiments.detection import shapes
from kd_experiments.detection.coco import COCOData
from kd_experiments.detection.data import (
    DetectionData,
    RandomHorizontalFlip,
    collate_detection,
    flip_horizontally,
    make_target,
)
from kd_experiments.detection.shapes import GeneratedShapes, ShapesData
from kd_experiments.detection.voc import VOC_CLASSES, VOCData
from kd_experiments.errors import UserError
from tests.conftest import compose_config
from tests.detection_fixtures import VOC_IMAGES, write_coco_tree, write_voc_tree


def voc_label(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


def expected_voc(image_id: str, keep_difficult: bool) -> tuple[list, list, list]:
    """What the reader should return for a fixture image: VOC's 1-based xmin, ymin become 0-based edges."""
    image = next(image for image in VOC_IMAGES if image.image_id == image_id)
    objects = [obj for obj in image.objects if keep_difficult or not obj.difficult]
    boxes = [[x1 - 1, y1 - 1, x2, y2] for x1, y1, x2, y2 in (obj.box for obj in objects)]
    return boxes, [voc_label(obj.name) for obj in objects], [obj.difficult for obj in objects]


def assert_target(target: dict, boxes: list, labels: list, difficult: list, image_id: int) -> None:
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(boxes), 4)
    assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
    assert target["boxes"].tolist() == boxes
    assert target["labels"].tolist() == labels
    assert target["difficult"].tolist() == difficult
    assert int(target["image_id"]) == image_id


def test_voc_year_folder_reads_exact_boxes_labels_difficult_and_ids(tmp_path):
    root = write_voc_tree(tmp_path / "VOC2007")
    data = VOCData(root=str(root), hflip=0.0, num_workers=0)
    data.setup("fit")
    assert (data.task, data.name, data.num_classes, data.image_size) == ("detection", "voc", 20, None)
    assert data.class_names[:3] == ["aeroplane", "bicycle", "bird"] and data.class_names[-1] == "tvmonitor"
    # The default 07+12 sets on a year folder: its trainval once (3 images), its test (2).
    assert (len(data.train_set), len(data.val_set)) == (3, 2)
    for position, image_id in enumerate(("000001", "000002", "000003")):
        image, target = data.train_set[position]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert_target(target, *expected_voc(image_id, keep_difficult=False), image_id=position)
    # Training drops the difficult person of 000001; the whole-image car of 000002 spans 0..64 x 0..48.
    assert data.train_set[0][1]["labels"].tolist() == [voc_label("dog")]
    assert data.train_set[1][1]["boxes"].tolist() == [[0, 0, 64, 48]]
    # Validation keeps difficult objects, flagged.
    assert_target(data.val_set[0][1], *expected_voc("000004", keep_difficult=True), image_id=0)
    assert data.val_set[0][1]["difficult"].tolist() == [False, True]
    image, target = data.val_set[1]
    assert image.shape == (3, 56, 40)
    assert_target(target, *expected_voc("000005", keep_difficult=True), image_id=1)


def test_voc_devkit_reads_07_plus_12_and_can_train_with_difficult(tmp_path):
    write_voc_tree(tmp_path / "VOCdevkit", years=(2007, 2012))
    # The folder above VOCdevkit/ (torchvision's root) and the devkit itself both work.
    for root in (tmp_path, tmp_path / "VOCdevkit"):
        data = VOCData(root=str(root), hflip=0.0, train_with_difficult=True)
        data.setup()
        assert (len(data.train_set), len(data.val_set)) == (6, 2)
        assert [int(data.train_set[i][1]["image_id"]) for i in range(6)] == list(range(6))
        assert data.train_set[3][0].shape == (3, 48, 64)  # VOC2012's first image
        assert_target(data.train_set[3][1], *expected_voc("000001", keep_difficult=True), image_id=3)
        assert str(data.train_set.paths[3]).endswith("VOC2012/JPEGImages/000001.jpg")
        assert str(data.val_set.paths[0]).endswith("VOC2007/JPEGImages/000004.jpg")


def test_voc_sets_by_split_name_on_a_year_folder(tmp_path):
    root = write_voc_tree(tmp_path / "voc")
    data = VOCData(root=str(root), train_sets=["train"], val_sets=[[2012, "val"]])
    data.setup()
    assert (len(data.train_set), len(data.val_set)) == (2, 1)
    assert_target(data.val_set[0][1], *expected_voc("000002", keep_difficult=True), image_id=0)


def test_coco_maps_categories_converts_boxes_and_filters_training_images(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    data = COCOData(root=str(root), hflip=0.0, num_workers=0)
    data.setup("fit")
    # Categories 3, 7, 12 -> labels 1, 2, 3, named by the JSON.
    assert (data.name, data.num_classes, data.class_names) == ("coco", 3, ["car", "dog", "zebra"])
    # Training: images 7 and 42 (19 has no annotation, 100 only a crowd box), in id order, crowd dropped.
    assert len(data.train_set) == 2
    image, target = data.train_set[0]
    assert image.shape == (3, 40, 40)
    # Image 7: the zebra clamped to the image (3 + 40 > 40); the dog without width dropped.
    assert_target(target, [[2, 3, 32, 40]], [3], [False], image_id=7)
    image, target = data.train_set[1]
    assert image.shape == (3, 48, 64)
    assert_target(target, [[4, 5, 14, 25], [30.5, 8, 43, 17]], [1, 2], [False, False], image_id=42)
    # Validation: every image, crowd boxes flagged difficult.
    assert [int(data.val_set[i][1]["image_id"]) for i in range(4)] == [7, 19, 42, 100]
    assert_target(data.val_set[1][1], [], [], [], image_id=19)
    boxes = [[4, 5, 14, 25], [30.5, 8, 43, 17], [0, 0, 20, 20]]
    assert_target(data.val_set[2][1], boxes, [1, 2, 3], [False, False, True], image_id=42)
    assert_target(data.val_set[3][1], [[1, 1, 11, 11]], [1], [True], image_id=100)
    crowd = COCOData(root=str(root), train_with_crowd=True)
    crowd.setup()
    assert [int(crowd.train_set[i][1]["image_id"]) for i in range(3)] == [7, 42, 100]


def test_flip_mirrors_the_image_and_its_boxes_exactly():
    image = torch.zeros(3, 4, 10)
    image[:, 1:3, 1:4] = 1.0  # the object covers pixel columns 1..3, rows 1..2
    target = make_target([[1, 1, 4, 3]], [2], [False], 5)
    flipped, flipped_target = flip_horizontally(image, target)
    assert torch.equal(flipped, image.flip(-1))
    assert flipped_target["boxes"].tolist() == [[6, 1, 9, 3]]  # 10 - 4, 10 - 1
    assert bool((flipped[:, 1:3, 6:9] == 1).all()) and float(flipped.sum()) == float(image.sum())
    assert flipped_target["labels"].tolist() == [2] and int(flipped_target["image_id"]) == 5
    assert target["boxes"].tolist() == [[1, 1, 4, 3]]  # the input is left as it was
    empty = make_target([], [], [], 0)
    assert flip_horizontally(image, empty)[1]["boxes"].shape == (0, 4)
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"].tolist() == [[6, 1, 9, 3]]
    assert RandomHorizontalFlip(0.0)(image, target)[0] is image


def training_batches(data: DetectionData, epoch: int = 0) -> list:
    loader = data.train_dataloader()
    data.train_sampler.set_epoch(epoch)
    return list(loader)


def test_flips_follow_the_seed_and_the_key_not_the_process_state():
    data = ShapesData(batch_size=8, num_train=32, num_val=4)
    data.setup()
    plain = GeneratedShapes(32, 64, 4, data.generator_seed, shapes.SPLIT_STREAMS["train"])

    def flips(seed: int, epoch: int = 0) -> list[bool]:
        data.augmentation_seed = seed
        torch.manual_seed(seed * 7 + 1)  # the process's own stream must not matter
        result = []
        for images, targets, keys in training_batches(data, epoch):
            for image, target, key in zip(images, targets, keys, strict=True):
                reference_image, reference_target = plain[int(key[2])]
                mirrored_image, mirrored_target = flip_horizontally(reference_image, reference_target)
                flipped = torch.equal(image, mirrored_image)
                assert flipped or torch.equal(image, reference_image)
                expected = mirrored_target if flipped else reference_target
                assert torch.equal(target["boxes"], expected["boxes"])
                result.append((int(key[2]), flipped))
        return result

    first = flips(3)
    assert flips(3) == first
    assert 8 <= sum(flipped for _, flipped in first) <= 24
    assert flips(4) != first and flips(3, epoch=1) != first


def test_batches_are_lists_with_keys_in_training():
    samples = [(torch.zeros(3, 4, 5), make_target([[0, 0, 1, 1]], [1], [False], 0), torch.arange(5))] * 2
    images, targets, keys = collate_detection(samples)
    assert isinstance(images, list) and isinstance(targets, list) and keys.shape == (2, 5)
    assert len(collate_detection([sample[:2] for sample in samples])) == 2
    data = ShapesData(batch_size=4, eval_batch_size=3, num_train=10, num_val=7)
    data.setup()
    images, targets, keys = next(iter(data.train_dataloader()))
    assert len(images) == len(targets) == 4 and images[0].shape == (3, 64, 64)
    assert keys.dtype == torch.int64 and keys.shape == (4, 5)
    assert set(targets[0]) == {"boxes", "labels", "difficult", "image_id"}
    moved = data.transfer_batch_to_device((images, targets, keys), torch.device("cpu"), 0)
    assert len(moved) == 3 and moved[2] is keys  # the keys stay where they are
    batches = list(data.whole_val_dataloader())
    assert [len(batch) for batch in batches] == [2, 2, 2]  # validation batches carry no keys
    assert [len(batch[0]) for batch in batches] == [3, 3, 1]
    ids = [int(target["image_id"]) for batch in batches for target in batch[1]]
    assert ids == list(range(7))


def test_ddp_ranks_shard_training_and_validation():
    data = ShapesData(batch_size=2, num_train=10, num_val=5)
    data.setup()
    seen, train_indices = [], []
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, ShardedEvalSampler)
        seen += [int(target["image_id"]) for _images, targets in loader for target in targets]
        train_loader = data.train_dataloader()
        assert isinstance(train_loader.sampler, KeyedSampler) and train_loader.sampler.num_replicas == 2
        train_indices += [int(key[2]) for _images, _targets, keys in train_loader for key in keys]
    assert sorted(seen) == list(range(5))
    assert sorted(train_indices) == list(range(10))
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert len(data.whole_val_dataloader().dataset) == 5


def test_loaders_give_the_same_batches_with_0_and_2_workers(tmp_path):
    root = write_voc_tree(tmp_path / "voc")
    runs = []
    for workers in (0, 2):
        data = VOCData(root=str(root), batch_size=2, num_workers=workers)
        data.augmentation_seed = 11
        data.setup()
        runs.append((training_batches(data, epoch=1), list(data.val_dataloader())))
    (train0, val0), (train2, val2) = runs
    for first, second in ((train0, train2), (val0, val2)):
        assert len(first) == len(second) > 0
        for batch0, batch2 in zip(first, second, strict=True):
            for image0, image2 in zip(batch0[0], batch2[0], strict=True):
                assert torch.equal(image0, image2)
            for target0, target2 in zip(batch0[1], batch2[1], strict=True):
                assert all(torch.equal(target0[key], target2[key]) for key in target0)
    for batch0, batch2 in zip(train0, train2, strict=True):
        assert torch.equal(batch0[2], batch2[2])


def test_shapes_are_deterministic_fast_and_tight(monkeypatch):
    def split(data):
        return [data.val_set[i] for i in range(len(data.val_set))]

    torch.manual_seed(1)
    first = ShapesData(num_train=6, num_val=5)
    first.setup()
    torch.manual_seed(2)
    second = ShapesData(num_train=40, num_val=5, hflip=0.0)  # another num_train: the same val images
    second.augmentation_seed = 9
    second.setup()
    for (image1, target1), (image2, target2) in zip(split(first), split(second), strict=True):
        assert torch.equal(image1, image2) and all(torch.equal(target1[k], target2[k]) for k in target1)
    other = ShapesData(num_val=5, generator_seed=1)
    other.setup()
    assert not torch.equal(other.val_set[0][0], first.val_set[0][0])
    assert (first.num_classes, first.image_size) == (3, 64)
    assert first.class_names == ["circle", "square", "triangle"]

    started = time.perf_counter()
    images = [GeneratedShapes(400, 64, 4, 0, 0)[i] for i in range(400)]
    assert time.perf_counter() - started < 1.0
    counts = [len(target["labels"]) for _image, target in images]
    assert min(counts) == 1 and max(counts) == 4
    labels = torch.cat([target["labels"] for _image, target in images])
    assert set(labels.tolist()) == {1, 2, 3}
    sides = torch.cat([target["boxes"][:, 2:] - target["boxes"][:, :2] for _image, target in images])
    assert float(sides.min()) >= 64 / 10 - 2 and float(sides.max()) <= 64 / 4 + 1

    # Without the noise, objects (every channel >= 0.5) and background (<= 0.4) separate exactly: each box
    # touches its object on all four sides, and no object pixel lies outside the boxes.
    monkeypatch.setattr(shapes, "NOISE_AMPLITUDE", 0.0)
    for index in range(50):
        image, target = GeneratedShapes(50, 64, 4, 0, 0)[index]
        bright = (image >= 0.45).all(dim=0)
        covered = torch.zeros_like(bright)
        for x1, y1, x2, y2 in target["boxes"].int().tolist():
            region = bright[y1:y2, x1:x2]
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[y1:y2, x1:x2] = True
        assert not (bright & ~covered).any()


def test_every_yaml_key_is_a_constructor_argument_and_back(tmp_path):
    common = set(inspect.signature(DetectionData.__init__).parameters) - {"self"}
    for dataset, cls in (("voc", VOCData), ("coco", COCOData), ("shapes", ShapesData)):
        config = compose_config(f"dataset={dataset}", f"paths.data_dir={tmp_path}").dataset
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "common"}
        assert set(config) - {"_target_"} == own | common, dataset
        data = instantiate(config)
        assert isinstance(data, cls) and data.name == dataset and data.normalization is None
    voc = instantiate(compose_config("dataset=voc").dataset)
    assert (voc.num_classes, voc.channels, voc.task) == (20, 3, "detection")
    assert voc.train_sets == [(2007, "trainval"), (2012, "trainval")] and voc.val_sets == [(2007, "test")]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def voc_error(root: Path, **options) -> str:
    with pytest.raises(UserError) as error:
        VOCData(root=str(root), **options).setup()
    return one_line(error)


def test_bad_voc_input_is_one_line_naming_what_and_where(tmp_path):
    assert "VOC root (dataset.root) not found at" in voc_error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is neither a VOC year folder" in voc_error(tmp_path / "empty")
    year = write_voc_tree(tmp_path / "VOC2007")
    (year / "ImageSets/Main/trainval.txt").unlink()
    message = voc_error(year)
    assert f"VOC split file {year}/ImageSets/Main/trainval.txt not found" in message
    assert "holds splits: test, train, val" in message
    (year / "JPEGImages/000003.jpg").unlink()
    train = {"train_sets": ["train"]}
    assert f"VOC image {year}/JPEGImages/000003.jpg not found (listed in" in voc_error(year, **train)
    shutil.copy(year / "JPEGImages/000001.jpg", year / "JPEGImages/000003.jpg")
    (year / "Annotations/000001.xml").write_text("<annotation><object>")
    assert f"VOC annotation {year}/Annotations/000001.xml is not valid XML" in voc_error(year, **train)
    (year / "Annotations/000001.xml").write_text(
        "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin></bndbox></object></annotation>"
    )
    assert "object 1 has class 'unicorn', not one of the 20 VOC classes" in voc_error(year, **train)
    (year / "Annotations/000001.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object></annotation>"
    )
    assert "object 1 (dog) needs a bndbox with numeric xmin" in voc_error(year, **train)
    (year / "Annotations/000001.xml").unlink()
    assert f"VOC annotation {year}/Annotations/000001.xml not found" in voc_error(year, **train)
    shutil.rmtree(year / "JPEGImages")
    assert f"VOC year folder {year} has no JPEGImages/" in voc_error(year, **train)

    devkit = write_voc_tree(tmp_path / "VOCdevkit", years=(2007,))
    message = voc_error(devkit)
    assert "dataset.train_sets asks for VOC2012, which" in message and "(it holds VOC2007)" in message
    assert "names split 'train' without a year" in voc_error(devkit, train_sets=["train"])
    for bad in ("trainval", [[2007]], [["2007x", "train"]], []):
        with pytest.raises(UserError) as error:
            VOCData(root=str(devkit), train_sets=bad)
        assert "dataset.train_sets" in one_line(error) and "[year, split]" in str(error.value)


def coco_error(root: Path, **options) -> str:
    with pytest.raises(UserError) as error:
        COCOData(root=str(root), **options).setup()
    return one_line(error)


def rewrite_instances(root: Path, split: str, change) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_coco_input_is_one_line_naming_what_and_where(tmp_path):
    assert "COCO root (dataset.root) not found at" in coco_error(tmp_path / "nowhere")
    root = write_coco_tree(tmp_path / "coco")
    message = coco_error(root, train_split="train2014")
    assert f"COCO annotation file not found at {root}/annotations/instances_train2014.json" in message
    (root / "val2017/000000000019.jpg").unlink()
    assert f"COCO image {root}/val2017/000000000019.jpg not found (image 19 of" in coco_error(root)
    train_file = root / "annotations/instances_train2017.json"
    text = train_file.read_text()
    train_file.write_text(text[:-20])
    assert f"COCO annotation file {train_file} is not valid JSON (" in coco_error(root)
    train_file.write_text(json.dumps({"images": [], "annotations": []}))
    assert f"COCO annotation file {train_file} has no 'categories' list" in coco_error(root)
    changes = {
        "annotation 0 is of image 999": lambda d: d["annotations"][0].update(image_id=999),
        "annotation 0 has category 5, which is not in": lambda d: d["annotations"][0].update(category_id=5),
        "annotation 1 needs an image_id, a category_id and a bbox": lambda d: d["annotations"][1].update(
            bbox=[1]
        ),
        "image 2 needs an id, a file_name": lambda d: d["images"][2].pop("file_name"),
        "category 0 needs an id and a name": lambda d: d["categories"][0].pop("name"),
    }
    for expected, change in changes.items():
        train_file.write_text(text)
        rewrite_instances(root, "train2017", change)
        assert expected in coco_error(root), expected
    train_file.write_text(text)
    rewrite_instances(root, "val2017", lambda d: d["categories"].pop())
    assert "the categories of" in coco_error(root) and "differ from those of" in coco_error(root)
    rewrite_instances(root, "train2017", lambda d: d["annotations"].clear())
    assert "has a usable box" in coco_error(root)
    message = coco_error(root, num_classes=80)
    assert message.endswith("has 3 object classes but dataset.num_classes=80; set dataset.num_classes=3")


def test_bad_shapes_and_common_keys_are_one_line():
    cases = {
        "dataset.image_size must be an integer of at least 32": dict(image_size=16),
        "dataset.max_objects must be a positive integer, got 0": dict(max_objects=0),
        "dataset.num_train must be a positive integer": dict(num_train=2.5),
        "dataset.generator_seed must be an integer >= 0, got -1": dict(generator_seed=-1),
        "dataset.batch_size must be a positive integer, got 0": dict(batch_size=0),
        "dataset.eval_batch_size must be a positive integer, got 0": dict(eval_batch_size=0),
        "dataset.hflip is the probability of a horizontal flip": dict(hflip=2),
        "dataset.num_workers must be an integer >= 0": dict(num_workers=-1),
        "the shapes data set has 3 object classes but dataset.num_classes=4": dict(num_classes=4),
        "detection images are RGB: keep dataset.channels=3": dict(channels=1),
        "dataset.task of a detection data set must be detection, got 'image'": dict(task="image"),
    }
    for expected, options in cases.items():
        with pytest.raises(UserError) as error:
            ShapesData(**options)
        assert expected in one_line(error), expected
    with pytest.raises(UserError, match="Pascal VOC has 20 object classes but dataset.num_classes=21"):
        VOCData(root="unread", num_classes=21)


def test_an_image_that_does_not_decode_is_one_line(tmp_path):
    root = write_voc_tree(tmp_path / "voc")
    (root / "JPEGImages/000002.jpg").write_bytes(b"not a jpeg")
    data = VOCData(root=str(root), train_sets=["val"], num_workers=0)
    data.setup()
    with pytest.raises(UserError) as error:
        data.train_set[0]
    assert f"cannot read image {root}/JPEGImages/000002.jpg" in one_line(error)


def test_voc_val_difficult_drop_removes_difficult_objects_and_keeps_their_images(tmp_path):
    """`val_difficult: drop` is LSHFM's test protocol (its reader drops difficult objects from the test set
    too); `ignore`, the default, keeps them flagged for the metric, as the VOC devkit does. Training is
    unchanged either way."""
    root = write_voc_tree(tmp_path / "VOC2007")
    dropped = VOCData(root=str(root), hflip=0.0, num_workers=0, val_difficult="drop")
    dropped.setup("fit")
    assert len(dropped.val_set) == 2  # 000004 keeps its person, loses its difficult bottle; 000005 as it was
    assert_target(dropped.val_set[0][1], *expected_voc("000004", keep_difficult=False), image_id=0)
    assert dropped.val_set[0][1]["labels"].tolist() == [voc_label("person")]
    assert_target(dropped.val_set[1][1], *expected_voc("000005", keep_difficult=False), image_id=1)
    kept = VOCData(root=str(root), hflip=0.0, num_workers=0)
    kept.setup("fit")
    assert kept.val_difficult == "ignore"
    assert kept.val_set[0][1]["difficult"].tolist() == [False, True]
    for position in range(len(kept.train_set)):
        assert torch.equal(kept.train_set[position][1]["boxes"], dropped.train_set[position][1]["boxes"])
    assert instantiate(compose_config("dataset=voc").dataset).val_difficult == "ignore"
    with pytest.raises(UserError) as error:
        VOCData(root=str(root), val_difficult="keep")
    assert "dataset.val_difficult must be ignore or drop" in one_line(error)
