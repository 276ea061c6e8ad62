"""The real data loaders (CIFAR-10/100 from torchvision, ImageFolder/ImageNet with timm transforms and
Mixup), exercised on data the tests generate in the on-disk layouts the real data sets use."""

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kd_experiments.data.cifar import STATISTICS, CIFARData
from kd_experiments.data.digits import DigitsData
from kd_experiments.data.imagefolder import ImageFolderData
from kd_experiments.errors import UserError
from tests.conftest import run_cli, run_main_in_process


def write_cifar(root, variant: str, train: int = 40, test: int = 20):
    """A CIFAR archive in torchvision's extracted layout, with random uint8 images (N x 3072, CHW order)."""
    rng = np.random.default_rng(0)
    classes = 100 if variant == "cifar100" else 10

    def batch(n):
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, classes, n),
        }

    def dump(payload, path):
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)

    if variant == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, n in (("train", train), ("test", test)):
            data = batch(n)
            dump({"data": data["data"], "fine_labels": data["labels"].tolist()}, folder / name)
        dump({"fine_label_names": [f"class{i}" for i in range(100)]}, folder / "meta")
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = batch(train // 5 if name != "test_batch" else test)
            dump({"data": data["data"], "labels": data["labels"].tolist()}, folder / name)
        dump({"label_names": [f"class{i}" for i in range(10)]}, folder / "batches.meta")
    return folder


def test_cifar100_loader_reads_the_torchvision_layout_and_normalises(tmp_path):
    folder = write_cifar(tmp_path, "cifar100")
    data = CIFARData(root=str(tmp_path), variant="cifar100", batch_size=8, num_workers=0)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), data.num_classes) == (40, 20, 100)
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    with open(folder / "test", "rb") as handle:
        raw = pickle.load(handle)["data"][0].reshape(3, 32, 32).astype(np.float32) / 255
    mean, std = (torch.tensor(v)[:, None, None] for v in STATISTICS["cifar100"])
    torch.testing.assert_close(images[0], (torch.from_numpy(raw) - mean) / std)  # test split: normalise only
    # Training: 4-pixel padded random crop + flip, so a training view differs from the plain one.
    train_view = data.train_set[0][0]
    plain = (torch.from_numpy(data.train_set.data[0]).permute(2, 0, 1).float() / 255 - mean) / std
    assert train_view.shape == (3, 32, 32)
    assert any(not torch.allclose(data.train_set[0][0], plain) for _ in range(10))


def test_cifar10_layout_and_class_count_check(tmp_path):
    write_cifar(tmp_path, "cifar10")
    data = CIFARData(root=str(tmp_path), variant="cifar10", num_classes=10, batch_size=4, num_workers=0)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (40, 20)
    with pytest.raises(UserError, match="cifar10 has 10 classes; set dataset.num_classes=10"):
        CIFARData(root=str(tmp_path), variant="cifar10", num_classes=100)


def test_missing_cifar_is_one_line_naming_the_path_and_the_download_switch(tmp_path, monkeypatch, capsys):
    result = run_main_in_process(
        "dataset=cifar100",
        f"paths.data_dir={tmp_path}/nowhere",
        "logger=none",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path}/nowhere/cifar/cifar-100-python" in lines[0] and "dataset.download=true" in lines[0]


def test_a_zoo_pair_trains_on_the_cifar100_loader(tmp_path, monkeypatch, capsys):
    write_cifar(tmp_path / "data" / "cifar", "cifar100", train=64, test=16)
    result = run_main_in_process(
        "dataset=cifar100", "dataset.num_workers=0", "dataset.batch_size=32", "teacher=resnet20",
        "teacher.weights=random", "student=resnet8", "method=kd", "trainer.max_steps=2", "logger=none",
        cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"steps": 2' in next(tmp_path.glob("outputs/runs/*/*/summary.json")).read_text()


def write_image_tree(root, classes=("cat", "dog", "fox"), per_class=4, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_image_folder_counts_classes_and_uses_timm_transforms(tmp_path):
    write_image_tree(tmp_path)
    data = ImageFolderData(root=str(tmp_path), num_classes=None, image_size=32, batch_size=4, num_workers=0)
    data.setup("fit")
    assert data.num_classes == 3 and data.train_set.classes == ["cat", "dog", "fox"]
    images, labels, _keys = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    # eval: resize the short side to 32 / 0.875 = 36, centre-crop 32, ImageNet normalisation
    eval_names = [type(t).__name__ for t in data.val_set.transform.transforms]
    assert eval_names[:2] == ["Resize", "CenterCrop"] and data.val_set.transform.transforms[0].size == 36
    train_names = [type(t).__name__ for t in data.train_set.transform.transforms]
    assert train_names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in train_names
    with pytest.raises(UserError, match="has 3 class folders but dataset.num_classes=5"):
        ImageFolderData(root=str(tmp_path), num_classes=5, image_size=32).setup()


def test_non_image_and_hidden_files_are_not_samples(tmp_path):
    write_image_tree(tmp_path, per_class=2)
    cat = tmp_path / "train/cat"
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "._0.png").write_bytes(b"\x00\x05\x16\x07 a macOS resource fork")  # an image's name, no image
    data = ImageFolderData(root=str(tmp_path), image_size=32, batch_size=6, num_workers=0)
    data.setup("fit")
    assert [Path(path).name for path, _ in data.train_set.samples[:2]] == ["0.png", "1.png"]
    assert len(data.train_set) == 6 and next(iter(data.train_dataloader()))[0].shape == (6, 3, 32, 32)


def test_random_erasing_fills_with_per_pixel_noise_by_default(tmp_path):
    write_image_tree(tmp_path)
    data = ImageFolderData(root=str(tmp_path), image_size=32, re_prob=0.25, num_workers=0)
    data.setup("fit")
    erasing = next(t for t in data.train_set.transform.transforms if type(t).__name__ == "RandomErasing")
    assert (erasing.probability, erasing.per_pixel) == (0.25, True)  # DeiT's --remode pixel


def test_mixup_gives_soft_targets_only_in_training(tmp_path):
    write_image_tree(tmp_path)
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    data = ImageFolderData(root=str(tmp_path), image_size=32, batch_size=4, num_workers=0, mixup=mixup)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    data.trainer = SimpleNamespace(training=True)

    def mixed():
        copy = data.on_before_batch_transfer([batch[0].clone(), batch[1], batch[2]], 0)
        return data.on_after_batch_transfer(copy, 0)

    images, targets, keys = mixed()
    assert targets.shape == (4, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.max() < 1.0  # smoothed (and mixed)
    assert not torch.equal(images, batch[0]) and torch.equal(keys, batch[2])
    # the batch's Mixup / CutMix draws come from its keys: mixing it again gives the same images
    again_images, again_targets, _ = mixed()
    assert torch.equal(again_images, images) and torch.equal(again_targets, targets)
    data.trainer = SimpleNamespace(training=False)
    unchanged = data.on_after_batch_transfer(batch, 0)
    assert unchanged[1].dtype == torch.int64


def test_repeated_augmentation_draws_each_image_three_times_across_the_ranks(tmp_path):
    from torch.utils.data import DistributedSampler

    write_image_tree(tmp_path)  # 12 training images
    shards = []
    for rank in (0, 1):
        data = ImageFolderData(root=str(tmp_path), image_size=32, batch_size=4, num_workers=0,
                               repeated_augmentation=3)  # fmt: skip
        data.setup("fit")
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = data.train_dataloader()
        # a DistributedSampler to Lightning, which therefore does not shard it a second time
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 2
        loader.sampler.set_epoch(5)
        keys = list(loader.sampler)  # (epoch, rank, index, copy, position)
        assert [key[4] for key in keys] == list(range(len(keys))) and {key[:2] for key in keys} == {(5, rank)}
        shards.append([key[2] for key in keys])
    assert [len(shard) for shard in shards] == [6, 6]  # an epoch is as long as a plain one: 12 / 2 ranks
    drawn = shards[0] + shards[1]
    # 4 images, each drawn 3 times, and each of them seen by both ranks
    assert sorted(drawn.count(index) for index in set(drawn)) == [3, 3, 3, 3]
    assert set(shards[0]) == set(shards[1])
    # teacher statistics take one plain pass: every image once, in order
    assert [key[2] for key in data.statistics_dataloader().sampler] == list(range(12))
    with pytest.raises(UserError, match="repeated_augmentation must be 0"):
        ImageFolderData(root=str(tmp_path), image_size=32, repeated_augmentation=-1)


def test_mixed_targets_reach_the_losses_through_the_cli(tmp_path, monkeypatch, capsys):
    write_image_tree(tmp_path / "tree", per_class=6)
    common = [
        "dataset=imagefolder", f"dataset.root={tmp_path}/tree", "dataset.image_size=32",
        "dataset.batch_size=4", "dataset.num_workers=0",
        "dataset.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1}",
        "teacher=resnet20", "teacher.weights=random", "student=resnet8", "trainer.max_steps=2", "logger=none",
    ]  # fmt: skip
    ok = run_main_in_process(
        *common, "method=kd", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )  # soft-target CE + KD
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = next(tmp_path.glob("outputs/runs/*/*/summary.json")).read_text()
    assert '"steps": 2' in summary and '"dataset": "imagefolder"' in summary
    refused = run_main_in_process(*common, "method=dkd", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "DKD needs class-index targets" in refused.stderr and "dataset.mixup=null" in refused.stderr


def test_missing_imagenet_names_the_path_and_how_to_get_it(tmp_path, monkeypatch, capsys):
    result = run_main_in_process(
        "dataset=imagenet",
        f"paths.data_dir={tmp_path}",
        "logger=none",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}/imagenet/train" in result.stderr and "ILSVRC2012" in result.stderr


def test_soft_targets_give_soft_ce_and_mixed_nd_centres():
    import torch.nn.functional as F

    from kd_experiments.losses import nd_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.1, 0.9]])
    # F.cross_entropy with probabilities is timm's SoftTargetCrossEntropy: mean_b sum_k -y log softmax
    expected = (-(soft * torch.log_softmax(logits, 1)).sum(1)).mean()
    torch.testing.assert_close(F.cross_entropy(logits, soft), expected)
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    student = torch.tensor([[3.0, 1.0], [1.0, -2.0]])
    teacher = torch.ones(2, 2)
    mixed = F.normalize(soft @ centres, dim=1)
    by_hand = (1 - (student * mixed).sum(1) / torch.maximum(student.norm(dim=1), teacher.norm(dim=1))).mean()
    torch.testing.assert_close(nd_loss(student, teacher, soft, centres), by_hand)
    one_hot = F.one_hot(torch.tensor([0, 2]), 3).float()  # one-hot soft targets = the hard-label loss
    torch.testing.assert_close(
        nd_loss(student, teacher, one_hot, centres), nd_loss(student, teacher, torch.tensor([0, 2]), centres)
    )


def test_repeated_augmentation_and_ema_under_ddp(tmp_path):
    """Two CPU processes: Lightning keeps the repeated-augmentation sampler (it already shards by rank)
    instead of sharding it again, and the EMA of the student is scored at the end."""
    write_image_tree(tmp_path / "tree", per_class=10)  # 30 training images
    result = run_cli(  # a real process: Lightning starts rank 1 by running its command line again
        "dataset=imagefolder", f"dataset.root={tmp_path}/tree", "dataset.image_size=32",
        "dataset.batch_size=4", "dataset.num_workers=0", "dataset.repeated_augmentation=3",
        "teacher=resnet20", "teacher.weights=random", "student=resnet8", "trainer.max_epochs=1",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "ema_decay=0.9",
        "logger=none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("outputs/runs/*/*/summary.json")).read_text())
    # 30 images / 2 ranks = 15 per rank = 4 batches of 4; sharded a second time it would be 2 batches
    assert summary["steps"] == 4 and summary["student_top1_ema"] is not None


class _Payload:
    """Unpickling this calls Path.write_text(marker, "payload ran"): what a poisoned batch could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "payload ran")


def test_a_poisoned_cifar_batch_is_refused_in_one_line_and_never_runs(tmp_path):
    folder = write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "payload_ran.txt"
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, handle)
    data = CIFARData(root=str(tmp_path), variant="cifar10", num_classes=10, batch_size=4, num_workers=0)
    with pytest.raises(UserError) as refused:
        data.setup()
    message = str(refused.value)
    assert "data_batch_1 is not a CIFAR batch: its pickle asks for pathlib.Path.write_text" in message
    assert "\n" not in message and not marker.exists()


def test_cifar_batches_give_the_pixels_and_labels_they_hold(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", train=10, test=5)
    with open(folder / "data_batch_1", "rb") as handle:
        first = pickle.load(handle)
    data = CIFARData(root=str(tmp_path), variant="cifar10", num_classes=10, batch_size=4, num_workers=0)
    data.setup()
    assert data.train_set.data.shape == (10, 32, 32, 3) and len(data.val_set.targets) == 5
    # row 0 of data_batch_1 is channel-major: its first 1024 bytes are the red plane
    np.testing.assert_array_equal(data.train_set.data[0, :, :, 0].reshape(-1), first["data"][0, :1024])
    assert data.train_set.targets[:2] == first["labels"] and data.train_set.classes[3] == "class3"


def test_normalize_on_device_gives_the_floats_the_loader_would_have_made(tmp_path):
    write_cifar(tmp_path, "cifar100")
    on_cpu, on_device = (
        CIFARData(root=str(tmp_path), batch_size=8, num_workers=0, normalize_on_device=flag)
        for flag in (False, True)
    )
    for data in (on_cpu, on_device):
        data.setup("fit")
    for loader in ("train_dataloader", "val_dataloader"):
        floats = next(iter(getattr(on_cpu, loader)()))
        raw = next(iter(getattr(on_device, loader)()))
        assert raw[0].dtype == torch.uint8  # a quarter of the bytes cross to the device
        normalised = on_device.on_after_batch_transfer(raw, 0)
        # the same crop and flip (the same keys) and the same arithmetic: equal to the last bit
        assert torch.equal(normalised[0], floats[0]) and torch.equal(normalised[1], floats[1])
    with pytest.raises(UserError, match="normalize_on_device applies to data sets of image files"):
        DigitsData(normalize_on_device=True)


def test_random_erasing_moves_to_the_device_and_draws_from_the_batch_keys(tmp_path):
    write_image_tree(tmp_path)
    data = ImageFolderData(root=str(tmp_path), image_size=32, batch_size=4, num_workers=0, re_prob=1.0,
                           normalize_on_device=True)  # fmt: skip
    data.setup("fit")
    assert "RandomErasing" not in [type(t).__name__ for t in data.train_set.transform.transforms]
    batch = next(iter(data.train_dataloader()))
    assert batch[0].dtype == torch.uint8
    data.trainer = SimpleNamespace(training=True)

    def on_device():
        copy = data.on_before_batch_transfer([batch[0].clone(), batch[1], batch[2]], 0)
        return data.on_after_batch_transfer(copy, 0)[0]

    erased = on_device()
    plain = data.normalize(batch[0])
    assert erased.dtype == torch.float32 and not torch.equal(erased, plain)  # every image had a box erased
    assert torch.equal(on_device(), erased)  # the same keys, the same boxes and noise
