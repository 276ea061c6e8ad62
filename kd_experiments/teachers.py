"""The frozen teacher of a run (`Teacher`: network, input normalisation, identity, cache key) and where its
weights come from: a checkpoint file, a timm pretrained tag, an explicit random init (benchmarks only), or
a CE-trained teacher cached under `outputs/teachers/` and reused. The training itself is the run layer's
(`build_teacher(train_with_ce=...)`): this module sits below the LightningModule and imports none of it.

When every rank runs the whole script (srun with one task per GPU, torchrun, multi-node), only global rank
zero trains the teacher and computes teacher statistics; the other ranks wait for its cache files (up to
`KD_CACHE_WAIT_S` seconds, default 24 h) and load them, so that all ranks distil from the same teacher."""

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.progress import track
from torch import nn

from kd_experiments.data.base import ClassificationData, Renormalize
from kd_experiments.data.sampling import STATISTICS_EPOCH, STATISTICS_SEED, VALIDATION_EPOCH, validation_keys
from kd_experiments.distributed import local_device
from kd_experiments.errors import UserError
from kd_experiments.files import atomic_torch_save, atomic_write_text, exclusive_lock
from kd_experiments.models import create_model
from kd_experiments.models.features import NetworkOutput, extract_features
from kd_experiments.output_cache import TeacherOutputCache, cache_folder

log = logging.getLogger(__name__)

# Bump when the cached file layout or the training code changes meaning. 2: training batches come from
# per-sample seeded augmentation (data/sampling.py), so a teacher trained before differs.
CACHE_FORMAT = 2
# Keys of the data config that do not change what a teacher learns.
DATA_KEYS_IGNORED_BY_CACHE = {
    "num_workers", "eval_batch_size", "download", "how_to_get", "pin_memory", "normalize_on_device"
}  # fmt: skip
CACHE_WAIT_ENV = "KD_CACHE_WAIT_S"  # how long a rank > 0 waits for rank zero's cache files
CACHE_WAIT_DEFAULT_S = 24 * 3600  # rank zero may be training a teacher, which can take hours
CACHE_POLL_S = 2.0
T = TypeVar("T")
# Trains a network with cross-entropy on the data module, with the recipe and seed; returns its val top-1.
TrainWithCE = Callable[[nn.Module, ClassificationData, DictConfig, int], float]


@dataclass
class Teacher:
    """A run's teacher: the network (frozen here: eval mode, no gradients), the map from the data's
    normalisation to its own (`input`; None when it takes the data as it is), and its `identity` (arch,
    source, sha256 of the weights' content, ...) that checkpoints and summary.json record."""

    network: nn.Module
    input: nn.Module | None = None
    identity: dict = field(default_factory=dict)

    def __post_init__(self):
        self.network.eval().requires_grad_(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """`images` as normalised for the data set, in the teacher's own normalisation."""
        return self.input(images) if self.input is not None else images

    @property
    def cache_key(self) -> str:
        """What its cached statistics are keyed by: the weights' content and the input normalisation (a
        teacher shown re-normalised images yields other statistics)."""
        payload = {"sha256": self.identity["sha256"], "arch": self.identity["arch"]}
        if self.input is not None:
            payload["input"] = [buffer.flatten().tolist() for buffer in (self.input.scale, self.input.shift)]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def create_network(role: str, model_cfg: DictConfig, image_size: int | None, pretrained=False) -> nn.Module:
    """The `teacher` or `student` network of `model_cfg` (`arch`, `num_classes`, `in_chans`, `model_kwargs`),
    built for the data's `image_size` (a ViT is fitted to it, see `models.create_model`); any failure to
    build it is one line naming the model."""
    arch = model_cfg.arch
    try:
        return create_model(
            arch,
            num_classes=model_cfg.num_classes,
            pretrained=pretrained,
            in_chans=model_cfg.in_chans,
            image_size=image_size,
            **model_kwargs(model_cfg),
        )
    except UserError:
        raise
    except Exception as error:  # a hub download or a timm kwarg failing: say which model and why
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" (pretrained={pretrained!r})" if pretrained else ""
        raise UserError(f"could not build {role} {arch}{where}: {first_line}") from None


def teacher_weight_source(teacher_cfg: DictConfig) -> str:
    """Which of `teacher.checkpoint`, `teacher.pretrained`, `teacher.weights=random` or on-the-fly
    training gives the teacher's weights; one line when the config names none or several."""
    sources = {
        "teacher.checkpoint": teacher_cfg.get("checkpoint"),
        "teacher.pretrained": teacher_cfg.get("pretrained"),
        "teacher.weights": teacher_cfg.get("weights"),
    }
    given = [key for key, value in sources.items() if value is not None]
    if len(given) > 1:
        raise UserError(f"teacher weights come from one place; got {' and '.join(given)}: keep one of them")
    weights = sources["teacher.weights"]
    if weights is not None and weights != "random":
        raise UserError(f"teacher.weights accepts only 'random' (benchmarks), got {weights!r}")
    if given:
        return given[0]
    if teacher_cfg.get("train_if_missing"):
        return "train"
    raise UserError(
        f"no weights for teacher {teacher_cfg.arch}: set teacher.checkpoint=PATH, teacher.pretrained=TAG, "
        "teacher.train_if_missing=true (train with CE and cache), or teacher.weights=random"
    )


def build_teacher(
    teacher_cfg: DictConfig,
    dataset_cfg: DictConfig,
    datamodule: ClassificationData | None,
    cache_dir: str,
    network: nn.Module | None = None,
    train_with_ce: TrainWithCE | None = None,
) -> Teacher:
    """The run's teacher, weights loaded and frozen, with its input normalisation (`teacher.input_mean` /
    `input_std`) and identity (arch, source, sha256 of the weights' content, and for a
    `teacher.checkpoint` file_sha256 of that file: the cache's own files are identified by their content
    alone, so they are not read twice).

    `network` is the teacher architecture already built (and probed) with random weights; the weights are
    loaded into it, except timm's pretrained ones, for which timm builds the network anew. A teacher
    trained on the fly is trained by `train_with_ce` (the run layer's) and cached."""
    source = teacher_weight_source(teacher_cfg)
    if source == "teacher.pretrained" or network is None:
        pretrained = teacher_cfg.pretrained if source == "teacher.pretrained" else False
        image_size = datamodule.image_size if datamodule is not None else None  # None: the model's own
        network = create_network("teacher", teacher_cfg, image_size, pretrained)
    identity = {"arch": teacher_cfg.arch, "num_classes": teacher_cfg.num_classes}
    if source == "train":
        identity |= _cached_or_trained(
            network, teacher_cfg, dataset_cfg, datamodule, Path(cache_dir), train_with_ce
        )
    else:
        identity |= _load_given_weights(network, teacher_cfg, source)
    # The weights' content, not the file's bytes (a zip whose member names vary from one save to the next):
    # the statistics cache is keyed on it.
    identity["sha256"] = state_dict_sha256(network.state_dict())
    normalisation = teacher_input(teacher_cfg, datamodule) if datamodule is not None else None
    return Teacher(network, normalisation, identity)


def _load_given_weights(network: nn.Module, teacher_cfg: DictConfig, source: str) -> dict:
    """Weights from `teacher.checkpoint`, `teacher.pretrained` (timm loaded them) or `weights=random`."""
    if source == "teacher.checkpoint":
        path = Path(teacher_cfg.checkpoint).expanduser()
        load_weights(network, read_state_dict(path), teacher_cfg.arch, str(path))
        return {"source": "checkpoint", "path": str(path.resolve()), "file_sha256": file_sha256(path)}
    if source == "teacher.pretrained":
        return {"source": f"timm:{'default' if teacher_cfg.pretrained is True else teacher_cfg.pretrained}"}
    log.warning(
        "TEACHER WEIGHTS ARE RANDOM (teacher.weights=random): distillation results are meaningless; "
        "use this only for benchmarks"
    )
    return {"source": "random"}


def teacher_input(teacher_cfg: DictConfig, datamodule: ClassificationData) -> Renormalize | None:
    """The map from the data's normalisation to the teacher's own (`teacher.input_mean` /
    `teacher.input_std`), or None when the teacher takes the data as it is."""
    mean, std = teacher_cfg.get("input_mean"), teacher_cfg.get("input_std")
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UserError("set both teacher.input_mean and teacher.input_std, or neither")
    if datamodule.normalization is None:
        raise UserError(
            f"teacher.input_mean/input_std re-normalise the images for the teacher, but dataset "
            f"{datamodule.name} does not declare its own normalisation; drop them for this data set"
        )
    target = (tuple(mean), tuple(std))
    if any(len(values) != datamodule.channels for values in target):
        raise UserError(
            f"teacher.input_mean and input_std need {datamodule.channels} values (one per channel); "
            f"got {list(mean)} and {list(std)}"
        )
    if target == tuple(map(tuple, datamodule.normalization)):
        return None
    return Renormalize(datamodule.normalization, target)


def model_kwargs(model_cfg: DictConfig) -> dict:
    """Extra keyword arguments for create_model from a teacher/student config (`model_kwargs`)."""
    extra = model_cfg.get("model_kwargs")
    return {} if extra is None else OmegaConf.to_container(extra, resolve=True)


def read_state_dict(path: Path, role: str = "teacher") -> dict[str, torch.Tensor]:
    """Read a state dict from a plain state_dict file, a Lightning checkpoint (our own: the student's
    weights) or an mdistiller/RepDistiller file ({'model': state_dict}). Always `weights_only=True`.
    `role` names the config key in the messages (`teacher.checkpoint`, `student.checkpoint`)."""
    if not path.is_file():
        raise UserError(f"{role} checkpoint not found: {path}; set {role}.checkpoint to an existing file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"could not read {role} checkpoint {path}: {_describe_load_error(error)}") from None
    state_dict = content
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        state_dict = content["state_dict"]
        student_keys = {k[len("student.") :]: v for k, v in state_dict.items() if k.startswith("student.")}
        state_dict = student_keys or state_dict
    elif isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        state_dict = content["model"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise UserError(
            f"{role} checkpoint {path} holds a {type(content).__name__}, not a state dict of tensors; "
            "pass a state_dict file, a Lightning .ckpt, or an mdistiller {'model': state_dict} file"
        )
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _describe_load_error(error: Exception) -> str:
    """torch.load's weights_only errors run to a dozen lines; keep the part that says what is wrong."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
        if "Unsupported global" in detail:
            name = detail.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in detail else "a Python object"
            return f"it stores pickled objects ({name}), not only tensors; save model.state_dict() instead"
        return f"not a readable PyTorch checkpoint ({detail.split('. ')[0].rstrip('.')})"
    first_sentence = text.split(". ")[0].rstrip(".")  # torch's later sentences are advice, not the fault
    return f"not a readable PyTorch checkpoint, truncated or not a torch.save file ({first_sentence})"


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, where: str, role: str = "teacher"
) -> None:
    """Load every weight; on any mismatch stop with one line listing the mismatched keys.

    The keys are matched by the model's own `load_state_dict`, after its version hooks: a file saved by an
    older torchvision (a Faster R-CNN's `fpn.inner_blocks.0.weight`, today `fpn.inner_blocks.0.0.weight`,
    as LSHFM's released detectors) loads as torchvision itself loads it. Shapes are checked first, on the
    keys both sides name, so a wrong architecture is reported before anything is copied."""
    expected = model.state_dict()
    wrong_shape = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    # With a shape already wrong the file is another architecture: name its keys as they are.
    missing = [k for k in expected if k not in state_dict] if wrong_shape else []
    unexpected = [k for k in state_dict if k not in expected] if wrong_shape else []
    if not wrong_shape:
        try:
            result = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as error:  # a renamed key whose shape differs
            wrong_shape = [" ".join(str(error).split())[:300]]
        else:
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape (file vs model)", wrong_shape),
        ):
            if keys:
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(f"{role} checkpoint {where} does not fit {arch}: {'; '.join(parts)}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Content hash of the tensors (names + raw bytes), independent of how they were serialised."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(
            state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def teacher_cache_key(teacher_cfg: DictConfig, dataset_cfg: DictConfig) -> str:
    """Hash of everything that decides what a CE-trained teacher learns: arch, data, recipe, seed."""
    dataset = OmegaConf.to_container(dataset_cfg, resolve=True)
    payload = {
        "format": CACHE_FORMAT,
        "arch": teacher_cfg.arch,
        "num_classes": teacher_cfg.num_classes,
        "in_chans": teacher_cfg.in_chans,
        "model_kwargs": model_kwargs(teacher_cfg),
        "dataset": {k: v for k, v in dataset.items() if k not in DATA_KEYS_IGNORED_BY_CACHE},
        "recipe": OmegaConf.to_container(teacher_cfg.recipe, resolve=True),
        "seed": teacher_cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_lock(entry: Path, what: str):
    """An exclusive lock beside a cache entry (`<entry>.lock`), held while it is read or made. Also the first
    write into the cache directory, so a directory that is not writable is reported before any work."""
    unwritable = (
        f"the cache directory {entry.parent} is not writable ({{reason}}); set paths.teacher_cache_dir to a "
        "writable directory"
    )
    return exclusive_lock(Path(str(entry) + ".lock"), f"another run that is making {what}", unwritable)


def _read_cached_teacher(model: nn.Module, arch: str, weights_path: Path, meta_path: Path) -> dict | None:
    """Load a cached teacher into `model` and return its metadata; None when there is no entry, or when the
    entry is unreadable (a truncated file after a crash or a full disk), which is then retrained over."""
    if not (weights_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        load_weights(model, read_state_dict(weights_path), arch, str(weights_path))
    except (UserError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        log.warning(f"Teacher {arch}: the cache entry {weights_path} is unreadable ({error}); training anew")
        return None
    return meta


def _cached_or_trained(
    model: nn.Module,
    teacher_cfg: DictConfig,
    dataset_cfg: DictConfig,
    datamodule: ClassificationData,
    cache_dir: Path,
    train_with_ce: TrainWithCE | None,
) -> dict:
    key = teacher_cache_key(teacher_cfg, dataset_cfg)
    weights_path = cache_dir / f"{teacher_cfg.arch}-{datamodule.name}-{key}.pt"
    meta_path = weights_path.with_suffix(".json")  # written after the weights: both present = complete
    # Rank zero trains, the others load its file: ranks training their own copies would repeat the work
    # and, training not being bit-reproducible across devices, could distil from different teachers.
    if not _is_rank_zero():
        wait_for_files([weights_path, meta_path], f"the CE-trained teacher {teacher_cfg.arch}")
        return _trained_or_cached(model, teacher_cfg, datamodule, weights_path, meta_path, key, train_with_ce)
    # Two runs needing one teacher (a parallel sweep, two shells): one trains, the other waits and reads it.
    with cache_lock(weights_path, f"the teacher {teacher_cfg.arch}"):
        return _trained_or_cached(model, teacher_cfg, datamodule, weights_path, meta_path, key, train_with_ce)


def _trained_or_cached(
    model: nn.Module,
    teacher_cfg: DictConfig,
    datamodule: ClassificationData,
    weights_path: Path,
    meta_path: Path,
    key: str,
    train_with_ce: TrainWithCE | None,
) -> dict:
    meta = _read_cached_teacher(model, teacher_cfg.arch, weights_path, meta_path)
    if meta is not None:
        log.info(f"Teacher {teacher_cfg.arch}: reusing cached weights {weights_path}")
        return {
            "source": "cache",
            "path": str(weights_path.resolve()),
            "trained_top1": meta.get("val_top1"),
            "train_s": meta.get("train_s"),
        }

    recipe = teacher_cfg.recipe
    log.info(
        f"Teacher {teacher_cfg.arch}: no cached weights for this data/recipe/seed; training it with "
        f"{getattr(train_with_ce, 'objective_name', 'CE')} for "
        f"{recipe.max_epochs} epochs, then caching it at {weights_path}"
    )
    started = time.perf_counter()
    if train_with_ce is None:
        raise ValueError("build_teacher needs train_with_ce to train a teacher on the fly")
    model.train()  # the probe left it in eval mode, and Lightning keeps each submodule's mode
    val_top1 = train_with_ce(model, datamodule, recipe, teacher_cfg.seed)
    model.cpu()
    train_s = time.perf_counter() - started
    atomic_torch_save(model.state_dict(), weights_path)
    meta = {"arch": teacher_cfg.arch, "key": key, "val_top1": val_top1, "train_s": round(train_s, 2)}
    meta |= {"recipe": OmegaConf.to_container(recipe, resolve=True), "seed": teacher_cfg.seed}
    atomic_write_text(json.dumps(meta, indent=2), meta_path)
    score = getattr(train_with_ce, "score_name", "top-1")  # a detector's trainer reports its mAP
    log.info(f"Teacher {teacher_cfg.arch}: val {score} {val_top1:.2f}% after {train_s:.1f}s; cached")
    return {
        "source": "trained",
        "path": str(weights_path.resolve()),
        "trained_top1": val_top1,
        "train_s": round(train_s, 2),
    }


def prepare_teacher_statistics(
    method: nn.Module,
    teacher: Teacher,
    dataset_cfg: DictConfig,
    datamodule: ClassificationData,
    cache_dir: str,
    output_cache_dtype: str | None = None,
) -> None:
    """Give every objective that declares `statistics_name` its teacher statistics (ND's class centres,
    LSHFM's hash bias): from the cache when this teacher (its cache key), data config and statistic were
    seen before, otherwise computed in one eval-mode pass over the training split and cached. A cache entry
    of another teacher or data set can never match, since both are in the key. Only global rank zero
    computes; other ranks wait for its file (see `wait_for_files`). With `output_cache_dtype` (the run's
    teacher.output_cache is on) the pass's teacher outputs go through the teacher-output cache too, so a
    second statistic of the same teacher reads them instead of running it."""
    for objective in method.modules():
        if getattr(objective, "statistics_name", None) is None:
            continue
        path = _statistics_path(objective.statistics_name, teacher, dataset_cfg, cache_dir)
        what = f"teacher statistics {objective.statistics_name}"
        output_cache = None
        if output_cache_dtype is not None:
            features = objective.statistics_features
            folder = cache_folder(
                cache_dir, teacher.cache_key, teacher.network, dataset_cfg, features,
                seed=STATISTICS_SEED, precision="32-true", dtype=output_cache_dtype,
            )  # fmt: skip
            output_cache = TeacherOutputCache(folder, features, output_cache_dtype)
        arguments = (objective, teacher, datamodule, path, output_cache)
        statistics = on_rank_zero_or_wait(path, what, partial(_statistics_cached_or_computed, *arguments))
        objective.set_teacher_statistics(statistics)


def on_rank_zero_or_wait(path: Path, what: str, cached_or_computed: Callable[[], T]) -> T:
    """`cached_or_computed()` (which reads the cache entry `path`, or makes and writes it) under the cache's
    rank rule: global rank zero runs it holding the entry's lock, so two runs needing one entry make it
    once; any other rank first waits for rank zero's file (`wait_for_files`), so that it only reads."""
    if not _is_rank_zero():
        wait_for_files([path], what)
        return cached_or_computed()
    with cache_lock(path, what):
        return cached_or_computed()


def _statistics_cached_or_computed(objective, teacher: Teacher, datamodule, path: Path, output_cache) -> dict:
    statistics = _read_cached_statistics(path)
    if statistics is not None:
        log.info(f"Teacher statistics {objective.statistics_name}: reusing {path}")
        return statistics
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    network = teacher.network.to(device)
    counts = {"computed": 0, "read": 0}
    batches = statistics_batches(
        datamodule, teacher, objective.statistics_features, device, output_cache, counts
    )
    with torch.no_grad():
        statistics = objective.compute_teacher_statistics(network, batches)
    batches.close()  # an objective that stopped early (LSHFM's zero bias) leaves the pass unpublished
    network.cpu()
    statistics = {name: value.cpu() for name, value in statistics.items()}
    atomic_torch_save(statistics, path)
    batches_read = f", teacher outputs of {counts['read']} of {sum(counts.values())} batches read"
    read = batches_read if output_cache is not None else ""
    log.info(
        f"Teacher statistics {objective.statistics_name}: computed in "
        f"{time.perf_counter() - started:.2f}s on {device}{read}, cached at {path}"
    )
    return statistics


def statistics_batches(
    datamodule: ClassificationData,
    teacher: Teacher,
    features: frozenset[str],
    device: torch.device,
    output_cache: TeacherOutputCache | None = None,
    counts: dict | None = None,
) -> Iterator[tuple[NetworkOutput, torch.Tensor]]:
    """(teacher `features`, labels) per batch of one plain pass over the training split (no repeats, no
    Mixup; seeded as the statistics pass, `STATISTICS_SEED`, so the statistics are the teacher's and the
    data's, the same for every run seed), in the teacher's normalisation and eval mode, with a progress
    bar. Outputs come from `output_cache` where it holds them; the pass is published to it only when it
    was read to the end."""
    counts = counts if counts is not None else {"computed": 0, "read": 0}
    loader = datamodule.statistics_dataloader(seed=STATISTICS_SEED)
    teacher.network.eval()
    if teacher.input is not None:
        teacher.input.to(device)
    if output_cache is not None:
        output_cache.begin_epoch(STATISTICS_EPOCH, len(loader.sampler))
    try:
        for images, labels, keys in progress(loader, "Teacher statistics"):
            output = output_cache.read(keys) if output_cache is not None else None
            if output is None:
                with torch.no_grad():
                    output = extract_features(teacher.network, teacher.prepare(images.to(device)), features)
                counts["computed"] += 1
                if output_cache is not None:
                    output_cache.write(keys, output)
            else:
                counts["read"] += 1
            yield output.to(device), labels.to(device)
        if output_cache is not None:
            output_cache.end_epoch()
    finally:
        if output_cache is not None:
            output_cache.discard()


def progress(iterable, description: str):
    """`iterable` with a rich progress bar on an interactive terminal (global rank zero only); plain
    otherwise, so that logs and tests get no bar."""
    if not (sys.stderr.isatty() and _is_rank_zero()):
        return iterable
    return track(iterable, description=description, transient=True, console=Console(stderr=True))


def _read_cached_statistics(path: Path) -> dict | None:
    """A cached statistic, or None when absent or unreadable (truncated): then it is computed anew."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a truncated zip in several exception types
        log.warning(f"Teacher statistics: the cache entry {path} is unreadable ({error}); computing it anew")
        return None


def _statistics_path(
    statistic: str, teacher: Teacher, dataset_cfg: DictConfig, cache_dir: str, extra: dict | None = None
) -> Path:
    """The cache file of one statistic: keyed by the teacher (its content and input normalisation) and the
    data config, so an entry of another teacher or data set never matches. `extra` (JSON values) keys what
    else decides the statistic and is not in the weights (a detector's resize and RoI sampling settings,
    `detection/statistics.py`); without it the key is what it always was."""
    dataset = OmegaConf.to_container(dataset_cfg, resolve=True)
    payload = {
        "format": CACHE_FORMAT,
        "statistic": statistic,
        "teacher": teacher.cache_key,
        "dataset": {k: v for k, v in dataset.items() if k not in DATA_KEYS_IGNORED_BY_CACHE},
    }
    if extra is not None:
        payload["extra"] = extra
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "statistics" / f"{statistic}-{teacher.identity['arch']}-{key}.pt"


def _is_rank_zero() -> bool:
    # Read at call time: Lightning sets rank_zero_only.rank at import from RANK / LOCAL_RANK / SLURM_PROCID /
    # JSM_NAMESPACE_RANK (0 when none is set), i.e. the global rank is known before trainer.fit. Nodes
    # started by hand for Lightning's multi-node mode set only NODE_RANK: their main processes are local
    # rank 0 but only node 0's is global rank 0.
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def wait_for_files(paths: list[Path], what: str, timeout_s: float | None = None) -> None:
    """Return once every path is a file: a rank > 0 waiting for rank zero to write `what` into the cache.
    Returns at once when they are there already. Rank zero writes each file atomically (temp file +
    os.replace), so a file that exists is complete. Waits up to `timeout_s`, by default the environment
    variable KD_CACHE_WAIT_S (seconds) or 24 h, then raises UserError."""
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    if timeout_s is None:
        setting = os.environ.get(CACHE_WAIT_ENV, str(CACHE_WAIT_DEFAULT_S))
        try:
            timeout_s = float(setting)
        except ValueError:
            raise UserError(f"{CACHE_WAIT_ENV}={setting!r} is not a number of seconds") from None
    node = os.environ.get("NODE_RANK")
    rank = f"{rank_zero_only.rank}" if node is None else f"{rank_zero_only.rank} of node {node}"
    log.info(f"Rank {rank}: waiting for rank 0 to write {what} ({', '.join(map(str, missing))})")
    deadline = time.monotonic() + timeout_s
    while missing:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            files = ", ".join(map(str, missing))
            raise UserError(
                f"rank {rank} waited {timeout_s:g}s for rank 0 to write {what} ({files}); "
                "paths.teacher_cache_dir must be on a filesystem every node shares, or fill the cache first "
                f"with a single-process run ({CACHE_WAIT_ENV} sets the wait in seconds)"
            )
        time.sleep(min(CACHE_POLL_S, remaining))
        missing = [path for path in missing if not path.is_file()]


def check_teacher_reference(
    teacher: Teacher,
    teacher_cfg: DictConfig,
    datamodule: ClassificationData,
    output_cache: TeacherOutputCache | None = None,
):
    """Score the teacher on the validation split before distilling when its published top-1 is known
    (`teacher.reference_top1`); warn loudly when it is more than `reference_tolerance` points below.
    Returns the measured top-1 (%), or None when there is no reference. Under DDP only global rank zero
    scores it, once, on its own device (`cuda:<LOCAL_RANK>`), and the other ranks return None: the module
    broadcasts rank zero's number when training starts (`DistillationModule.on_fit_start`)."""
    reference = teacher_cfg.get("reference_top1")
    if reference is None or not _is_rank_zero():
        return None
    device = local_device()
    if teacher.input is not None:
        teacher.input.to(device)
    counts = {"computed": 0, "read": 0}
    top1 = teacher_val_top1(teacher, datamodule, device, output_cache, counts)
    teacher.network.cpu()
    if output_cache is not None:
        read, total = counts["read"], sum(counts.values())
        log.info(f"Teacher check: logits of {read} of {total} batches read from {output_cache.folder}")
    tolerance = teacher_cfg.get("reference_tolerance", 2.0)
    if top1 < reference - tolerance:
        log.warning(
            f"TEACHER CHECK FAILED: {teacher_cfg.arch} scores {top1:.2f}% on {datamodule.name} val, "
            f"{reference - top1:.2f} points below its reference {reference:.2f}%: check teacher.checkpoint "
            "/ teacher.pretrained and the data set's normalisation before spending a full run on it"
        )
    else:
        log.info(f"Teacher check: {top1:.2f}% on {datamodule.name} val (reference {reference:.2f}%)")
    return top1


def teacher_val_top1(
    teacher: Teacher,
    datamodule: ClassificationData,
    device,
    output_cache: TeacherOutputCache | None = None,
    counts: dict | None = None,
) -> float:
    """The teacher's top-1 (%) over the whole validation split, with a progress bar; its logits read from
    `output_cache` (the validation pass: no augmentation, so one entry serves every seed) where it holds
    them, and stored there otherwise."""
    counts = counts if counts is not None else {"computed": 0, "read": 0}
    network = teacher.network.to(device).eval()
    loader = datamodule.whole_val_dataloader()
    if output_cache is not None:
        output_cache.begin_epoch(VALIDATION_EPOCH, len(loader.dataset))
    correct = total = 0
    try:
        for images, targets in progress(loader, "Teacher check"):
            keys = validation_keys(total, len(targets))
            output = output_cache.read(keys) if output_cache is not None else None
            counts["read" if output is not None else "computed"] += 1
            if output is None:
                with torch.no_grad():
                    output = NetworkOutput(logits=network(teacher.prepare(images.to(device))))
                if output_cache is not None:
                    output_cache.write(keys, output)
            correct += (output.logits.argmax(1).cpu() == targets).sum().item()
            total += len(targets)
        if output_cache is not None:
            output_cache.end_epoch()
    finally:
        if output_cache is not None:
            output_cache.discard()
    return 100.0 * correct / max(total, 1)
