"""CIFAR-10 / CIFAR-100 from torchvision, with the CRD/mdistiller training transforms."""

import pickle
from pathlib import Path

import numpy as np
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.datasets.vision import VisionDataset

from kd_experiments.data.base import ClassificationData, fetch_once
from kd_experiments.errors import UserError

# Per-channel statistics used by the CRD/mdistiller lineage (CIFAR-100) and the usual CIFAR-10 ones.
STATISTICS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
TORCHVISION_CLASSES = {"cifar100": datasets.CIFAR100, "cifar10": datasets.CIFAR10}


# What a CIFAR batch may build when unpickled: numpy arrays (the images) and plain containers, which need no
# global at all (dicts, lists, strings, numbers). numpy 1 pickles name numpy.core, numpy 2 numpy._core.
SAFE_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _CifarUnpickler(pickle.Unpickler):
    """pickle, but a global other than numpy's array constructors is refused: a poisoned batch file (whose
    pickle would call os.system or the like) raises instead of running its payload."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise UserError(
                f"{self.path} is not a CIFAR batch: its pickle asks for {module}.{name}, and a CIFAR batch "
                "holds only arrays and lists; it was refused unread. Delete the folder and download again "
                "with dataset.download=true"
            )
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return _CifarUnpickler(handle, path).load()


def _local_copy(base: type) -> type:
    """The torchvision class, reading its batches with `read_cifar_pickle` (torchvision's own loader calls
    pickle.load, which runs whatever a poisoned file asks for) and trusting a local copy whose files exist:
    refusing a user's (or a test's) own copy in the same layout for its checksums would hide the real
    loader. `download=True` still verifies the md5 of the archive it fetches."""

    class LocalCIFAR(base):
        # md5 None: torchvision's check_integrity then only checks that each file exists.
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

        def __init__(self, root, train: bool = True, transform=None, download: bool = False):
            VisionDataset.__init__(self, root, transform=transform)
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise RuntimeError("Dataset not found or corrupted")
            folder = Path(self.root, self.base_folder)
            entries = [
                read_cifar_pickle(folder / name) for name, _ in (self.train_list if train else self.test_list)
            ]
            # N x 3072 rows in CHW order -> N x 32 x 32 x 3, as torchvision keeps them
            self.data = (
                np.vstack([entry["data"] for entry in entries]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            )
            label_key = "labels" if "labels" in entries[0] else "fine_labels"
            self.targets = [int(label) for entry in entries for label in entry[label_key]]
            self.classes = read_cifar_pickle(folder / self.meta["filename"])[self.meta["key"]]
            self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    LocalCIFAR.__name__ = base.__name__
    return LocalCIFAR


class CIFARData(ClassificationData):
    """CIFAR-100 (`variant="cifar100"`) or CIFAR-10 in torchvision's on-disk layout under `root`
    (`cifar-100-python/` or `cifar-10-batches-py/`).

    Training: random crop 32 with 4-pixel zero padding, horizontal flip, per-channel normalisation (the
    CRD/mdistiller recipe); validation = the test split, normalised only. `download=true` fetches the data
    on first use (torchvision's archive, md5-checked) in `prepare_data`, one process at a time: ranks started
    together wait on a lock in `root` while the first downloads (`fetch_once`); `setup` only reads.
    """

    supports_device_normalization = True

    def __init__(
        self,
        root: str,
        variant: str = "cifar100",
        download: bool = False,
        batch_size: int = 64,
        num_classes: int = 100,
        image_size: int = 32,
        channels: int = 3,
        num_workers: int = 4,
        padding: int = 4,
        **common,
    ):
        if variant not in TORCHVISION_CLASSES:
            raise UserError(f"dataset.variant must be cifar100 or cifar10, got {variant!r}")
        expected_classes = 100 if variant == "cifar100" else 10
        if num_classes != expected_classes:
            raise UserError(
                f"{variant} has {expected_classes} classes; set dataset.num_classes={expected_classes}"
            )
        if (image_size, channels) != (32, 3):
            raise UserError(f"{variant} images are 32x32 RGB; keep dataset.image_size=32 dataset.channels=3")
        common.setdefault("name", variant)
        super().__init__(batch_size, num_classes, image_size, channels, num_workers, **common)
        self.root, self.variant, self.download, self.padding = (
            Path(root).expanduser(),
            variant,
            download,
            padding,
        )
        mean, std = STATISTICS[variant]
        self.normalization = (tuple(mean), tuple(std))

    def _to_tensor(self) -> list:
        """ToTensor + Normalize, or uint8 tensors for the device to normalise (`normalize_on_device`)."""
        if self.normalize_on_device:
            return [transforms.PILToTensor()]
        return [transforms.ToTensor(), transforms.Normalize(*self.normalization)]

    def train_transform(self):
        crop_and_flip = [transforms.RandomCrop(32, padding=self.padding), transforms.RandomHorizontalFlip()]
        return transforms.Compose(crop_and_flip + self._to_tensor())

    def eval_transform(self):
        return transforms.Compose(self._to_tensor())

    def is_complete(self) -> bool:
        """Every batch file and the meta file of the variant are under `root` (what the loader reads)."""
        base = TORCHVISION_CLASSES[self.variant]
        folder = self.root / base.base_folder
        names = [name for name, _ in base.train_list + base.test_list] + [base.meta["filename"]]
        return all((folder / name).is_file() for name in names)

    def prepare_data(self) -> None:
        """With `download=true`, fetch and extract torchvision's archive into `root` unless the data is there;
        processes sharing `root` download it once (a file lock beside it)."""
        if not self.download:
            return
        base = TORCHVISION_CLASSES[self.variant]
        fetch_once(
            self.is_complete,
            lambda: download_and_extract_archive(
                base.url, str(self.root), filename=base.filename, md5=base.tgz_md5
            ),
            self.root / f".{base.base_folder}.download.lock",
            f"{self.variant} into {self.root}",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        dataset_class = _local_copy(TORCHVISION_CLASSES[self.variant])
        folder = self.root / dataset_class.base_folder
        if not self.download and not folder.is_dir():
            raise UserError(
                f"{self.variant} not found at {folder}; download it once with dataset.download=true (or put "
                f"torchvision's {dataset_class.base_folder}/ folder under dataset.root={self.root})"
            )
        try:
            # Read only: the download is prepare_data's (called before setup, one process at a time).
            self.train_set = dataset_class(
                self.root, train=True, download=False, transform=self.train_transform()
            )
            self.val_set = dataset_class(
                self.root, train=False, download=False, transform=self.eval_transform()
            )
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            raise UserError(
                f"{self.variant} at {folder} is incomplete ({error}); "
                "re-download it with dataset.download=true"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
            raise UserError(
                f"{self.variant} files under {folder} are not readable CIFAR batches "
                f"({type(error).__name__}: {error}); delete the folder and download again with "
                "dataset.download=true"
            ) from None
