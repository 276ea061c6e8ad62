"""The teacher-output cache (`teacher.output_cache=true`): the first run of a study stores the teacher outputs
that its method reads, for the exact inputs the teacher saw; a later run with the same key reads them instead
of running the teacher.

Why it is exact: every training sample is named by a key (epoch, rank, index, copy, position) and its
augmentation is drawn from generators seeded by the run seed and that key (`data/sampling.py`), so a run
with the same seed, data and transform config sees the same images whether or not the teacher runs.

Layout, under `paths.teacher_cache_dir/outputs/<key>/`, where <key> hashes the teacher (weights' content,
input normalisation), the data config (transforms and Mixup included), the seed, the precision and the
storage dtype; the number of processes is in each shard's name:

    epoch0000-rank0of1/keys.npy      rows x 2 int64: the (index, copy) stored in each row; -1 = not stored
    epoch0000-rank0of1/logits.npy    rows x K in float16 (teacher.output_cache_dtype) or float32
    epoch0000-rank0of1/meta.json     rows, dtypes, and how many rows were stored

One folder per epoch and rank (`statistics-rank0of1` for the teacher statistics' pass over the training
split, `validation-rank0of1` for the teacher check's over the validation split); a row is a sample's position
in the rank's epoch order, and the stored (index, copy) is checked on every read. Each rank writes and reads
its own shard. A folder is written under a temporary name and renamed when its epoch ends, so a killed run
leaves no half folder behind; a folder that does not load (a truncated file) is a miss: the teacher runs and
the folder is written anew. Files are memory-mapped: a read touches only the rows of its batch.

Per-image vectors only (logits, the pooled embedding, ViT tokens): a method that reads the teacher's feature
maps (FitNet, ReviewKD) is refused, since B x C x H x W per sample per epoch would not fit on a disk.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kd_experiments.data.sampling import STATISTICS_EPOCH, VALIDATION_EPOCH
from kd_experiments.errors import UserError
from kd_experiments.models.features import NetworkOutput, has_distill_head

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of a stored row changes
CACHEABLE_FEATURES = frozenset({"logits", "embedding", "class_token", "patch_mean", "distill_logits"})
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
# Data keys that do not change what the teacher sees: where the loader runs and how it batches evaluation.
DATA_KEYS_IGNORED = frozenset(
    {"num_workers", "pin_memory", "eval_batch_size", "download", "trains_teacher_by_default", "how_to_get"}
)
TORCH_DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def check_cacheable(teacher_features: frozenset[str], method_name: str) -> None:
    """One line when the method reads teacher features the cache does not store (feature maps)."""
    maps = sorted(teacher_features - CACHEABLE_FEATURES)
    if maps:
        raise UserError(
            f"teacher.output_cache stores per-image vectors (logits, embeddings, ViT tokens), but method "
            f"{method_name} reads the teacher's feature maps ({', '.join(maps)}), which it cannot store; set "
            "teacher.output_cache=false"
        )


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise UserError(
            f"teacher.output_cache_dtype must be float16 or float32, got {dtype!r} (float32 stores the "
            "outputs bit for bit; float16 takes half the disk)"
        )


def cache_folder(
    cache_dir: str | Path,
    teacher_key: str,
    teacher_network: torch.nn.Module,
    dataset_cfg: DictConfig,
    features: frozenset[str],
    seed: int,
    precision: str,
    dtype: str,
) -> Path:
    """The folder of one cache entry: everything that changes the stored outputs is in its key."""
    dataset = OmegaConf.to_container(dataset_cfg, resolve=True)
    data = {key: value for key, value in dataset.items() if key not in DATA_KEYS_IGNORED}
    if not data.get("mixup"):
        # The batch size only matters to Mixup, which mixes each sample with another one of its batch.
        data.pop("batch_size", None)
    payload = {
        "format": FORMAT,
        "teacher": teacher_key,
        "data": data,
        "seed": seed,
        "precision": str(precision),
        "dtype": dtype,
    }
    if has_distill_head(teacher_network):
        # A two-headed teacher's `logits` depend on whether `distill_logits` is read too (features.py).
        payload["features"] = sorted(features)
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "outputs" / key


class TeacherOutputCache:
    """Reads and writes one entry (`folder`) for the `features` of one rank's epochs.

    Per epoch: `begin_epoch(epoch, rows, rank, world_size)` opens the epoch's stored folder for reading
    when there is a complete one, and otherwise starts writing a new one; `read(keys)` returns the batch's
    outputs or None (a miss: the caller runs the teacher and hands its outputs to `write`); `end_epoch()`
    publishes what was written. `summary()` says where and how, for summary.json."""

    def __init__(self, folder: Path, features: frozenset[str], dtype: str):
        check_storage_dtype(dtype)
        self.folder = Path(folder).absolute()  # summary.json names it whatever the reader's directory
        self.features = frozenset(features)
        self.dtype = dtype
        self.rank, self.world_size = 0, 1  # set by begin_epoch: known once the DDP processes run
        self.stored_rows = 0
        self._reader: dict | None = None
        self._writer: dict | None = None

    def epoch_folder(self, epoch: int) -> Path:
        names = {STATISTICS_EPOCH: "statistics", VALIDATION_EPOCH: "validation"}
        name = names.get(epoch, f"epoch{epoch:04d}")
        return self.folder / f"{name}-rank{self.rank}of{self.world_size}"

    # -- one epoch ----------------------------------------------------------------------------------------

    def begin_epoch(self, epoch: int, rows: int, rank: int = 0, world_size: int = 1) -> None:
        self.end_epoch()  # an epoch that ended without end_epoch (a stopped fit) is published as it is
        self.rank, self.world_size = rank, world_size
        self._reader = self._open_for_reading(self.epoch_folder(epoch), rows)
        if self._reader is None:
            self._writer = {"epoch": epoch, "rows": rows, "arrays": {}, "keys": None, "folder": None}

    def _open_for_reading(self, folder: Path, rows: int) -> dict | None:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            stored_features = set(meta["dtypes"])
            if meta.get("format") != FORMAT or meta["rows"] != rows or not self.features <= stored_features:
                return None
            keys = np.load(folder / "keys.npy", mmap_mode="r")
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.features}
            if keys.shape != (rows, 2) or any(array.shape[0] != rows for array in arrays.values()):
                raise ValueError("a file holds fewer rows than meta.json says")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            log.warning(f"Teacher-output cache: {folder} is unreadable ({error}); running the teacher")
            return None
        return {"keys": keys, "arrays": arrays, "dtypes": meta["dtypes"]}

    def read(self, keys: torch.Tensor) -> NetworkOutput | None:
        """The stored outputs of a batch (keys: B x 5 on the CPU), as the teacher's dtypes; None when any
        of its samples is not stored (the whole batch then runs through the teacher)."""
        reader = self._reader
        if reader is None:
            return None
        positions = keys[:, 4].numpy()
        if positions.max(initial=-1) >= reader["keys"].shape[0]:
            return None
        if not np.array_equal(reader["keys"][positions], keys[:, 2:4].numpy()):
            return None  # another sample was stored in this row (or none): not this run's order
        values = {
            name: torch.from_numpy(array[positions]).to(TORCH_DTYPES[reader["dtypes"][name]])
            for name, array in reader["arrays"].items()
        }
        return NetworkOutput(**values) if "logits" in values else NetworkOutput(logits=None, **values)

    def write(self, keys: torch.Tensor, output: NetworkOutput) -> None:
        """Store a computed batch (when this epoch is being written)."""
        writer = self._writer
        if writer is None:
            return
        if writer["keys"] is None:
            folder = self.epoch_folder(writer["epoch"])
            folder.parent.mkdir(parents=True, exist_ok=True)
            temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            temporary.mkdir()
            writer["folder"], writer["temporary"] = folder, temporary
            writer["keys"] = np.lib.format.open_memmap(
                temporary / "keys.npy", mode="w+", dtype=np.int64, shape=(writer["rows"], 2)
            )
            writer["keys"][:] = -1
            writer["dtypes"] = {}
        positions = keys[:, 4].numpy()
        if positions.max(initial=-1) >= writer["rows"]:
            return
        for name in self.features:
            value = getattr(output, name).detach()
            array = writer["arrays"].get(name)
            if array is None:
                shape = (writer["rows"], *value.shape[1:])
                path, dtype = writer["temporary"] / f"{name}.npy", STORAGE_DTYPES[self.dtype]
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                writer["arrays"][name] = array
                writer["dtypes"][name] = str(value.dtype)
            array[positions] = value.float().cpu().numpy()
        writer["keys"][positions] = keys[:, 2:4].numpy()
        self.stored_rows += len(positions)

    def end_epoch(self) -> None:
        """Publish the epoch being written (flushed, then renamed into place); close a read epoch."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None or writer["keys"] is None:
            return
        for array in (writer["keys"], *writer["arrays"].values()):
            array.flush()
        stored = int((np.asarray(writer["keys"][:, 0]) >= 0).sum())
        meta = {"format": FORMAT, "rows": writer["rows"], "stored": stored, "dtypes": writer["dtypes"]}
        (writer["temporary"] / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        del writer["keys"], writer["arrays"]  # close the memory maps before the rename
        _replace_folder(writer["temporary"], writer["folder"])

    def discard(self) -> None:
        """Drop the epoch being written (the fit failed or was interrupted; a resumed run writes that epoch
        again). An epoch that ended early by `trainer.max_steps` is published; its unstored rows are
        misses."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None and writer.get("temporary") is not None:
            shutil.rmtree(writer["temporary"], ignore_errors=True)

    def summary(self) -> dict:
        return {
            "folder": str(self.folder),
            "dtype": self.dtype,
            "stored_rows": self.stored_rows,
        }


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`, replacing a folder there (an unreadable one, or one a concurrent run with
    the same key published first: both hold the same outputs)."""
    try:
        os.replace(source, target)
        return
    except OSError:  # target exists and is not empty
        pass
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(target, trash)
    try:
        os.replace(source, target)
    except OSError:
        shutil.rmtree(source, ignore_errors=True)  # a concurrent run published it in between: keep theirs
    shutil.rmtree(trash, ignore_errors=True)
