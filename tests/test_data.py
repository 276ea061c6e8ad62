import numpy as np
import pytest
import torch

from kd_experiments.data.digits import DigitsData
from kd_experiments.data.fake import FakeData
from kd_experiments.errors import UserError


def labels_of(dataset) -> np.ndarray:
    return dataset.tensors[1].numpy()


def test_digits_split_is_fixed_stratified_and_seed_independent():
    torch.manual_seed(123)
    first = DigitsData()
    first.setup()
    torch.manual_seed(999)
    np.random.seed(5)
    second = DigitsData()
    second.setup()
    assert len(first.train_set) + len(first.val_set) == 1797
    assert len(first.val_set) == 1438  # 80% of 1,797, rounded up by scikit-learn
    assert torch.equal(first.val_set.tensors[0], second.val_set.tensors[0])
    # stratified: every class's share in val is within one image of 80% of it
    all_labels = np.concatenate([labels_of(first.train_set), labels_of(first.val_set)])
    for cls in range(10):
        total = (all_labels == cls).sum()
        assert abs((labels_of(first.val_set) == cls).sum() - total * 0.8) <= 1


def test_digits_resize_and_channels_for_any_model():
    data = DigitsData(image_size=32, channels=3)
    data.setup()
    images, labels, _keys = next(iter(data.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
    assert data.train_set.max_shift == 4  # 1 pixel of the 8x8 original, scaled to 32x32
    # train split is standardised with its own statistics
    train_images = data.train_set.tensors[0]
    assert abs(train_images.mean().item()) < 1e-4 and abs(train_images.std().item() - 1) < 1e-3


def test_digits_from_a_csv_file(tmp_path):
    rows = np.zeros((50, 65))
    rows[:, 64] = np.arange(50) % 10
    rows[:, :64] = np.arange(50)[:, None] % 17
    path = tmp_path / "digits.csv"
    np.savetxt(path, rows, delimiter=",", fmt="%d")
    data = DigitsData(data_file=str(path))
    data.setup()
    assert (len(data.train_set), len(data.val_set)) == (10, 40)


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_batch_size_is_rejected(bad):
    with pytest.raises(UserError, match=f"dataset.batch_size must be a positive integer, got {bad}"):
        DigitsData(batch_size=bad)


def test_fake_data_shapes_and_keys():
    data = FakeData(batch_size=8, num_classes=100, image_size=24, channels=3, train_length=40, val_length=16)
    data.setup()
    images, labels, _keys = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and int(labels.max()) < 100
    assert len(data.train_set) == 40 and len(data.val_set) == 16
    assert len(data.train_dataloader()) == 5
