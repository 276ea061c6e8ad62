"""The teacher statistics of a detection method (ND's RoI class centres, `methods/detection_nd.py`): one
pass of the teacher detector over the training split, cached beside the teacher as a classification run's
are (`teachers.prepare_teacher_statistics`: the same cache folder and key, keyed by the teacher's weights
sha256, the data config and the statistic's name, plus here the teacher's resize and RoI sampling settings,
which decide the statistic but are not in its weights; global rank zero computes, other ranks wait for its
file).

Which RoIs and images: the `# Choice:` above `teacher_roi_batches`.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection import FasterRCNN

from kd_experiments.data.sampling import STATISTICS_SEED
from kd_experiments.detection.features import DetectorOutput, student_pass
from kd_experiments.files import atomic_torch_save
from kd_experiments.teachers import (
    Teacher,
    _read_cached_statistics,
    _statistics_path,
    on_rank_zero_or_wait,
    progress,
)

log = logging.getLogger(__name__)


def prepare_detection_statistics(
    method: nn.Module, teacher: Teacher, dataset_cfg: DictConfig, datamodule, cache_dir: str
) -> None:
    """Give every objective of `method` that declares `statistics_name` its teacher statistics: read from
    the cache when this teacher, data config, statistic and sampling were seen before, otherwise computed in
    one pass over the training split (`teacher_roi_batches`) and cached."""
    for objective in method.modules():
        if getattr(objective, "statistics_name", None) is None:
            continue
        extra = {"teacher_pass": pass_settings(teacher.network)}
        path = _statistics_path(objective.statistics_name, teacher, dataset_cfg, cache_dir, extra)
        what = f"teacher statistics {objective.statistics_name}"
        make = partial(_cached_or_computed, objective, teacher, datamodule, path)
        objective.set_teacher_statistics(on_rank_zero_or_wait(path, what, make))


def pass_settings(network: FasterRCNN) -> dict:
    """What decides the teacher's RoIs and their features besides its weights: the resize and
    normalisation, the anchors and the RPN's training proposal selection, the RoI matcher and sampler,
    and the RoI pooling."""
    transform, rpn, heads = network.transform, network.rpn, network.roi_heads
    sampler, matcher, pool = heads.fg_bg_sampler, heads.proposal_matcher, heads.box_roi_pool
    return {
        "resize": [list(transform.min_size), transform.max_size, transform.size_divisible],
        "fixed_size": transform.fixed_size,
        "normalise": [list(transform.image_mean), list(transform.image_std)],
        "anchors": [rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios],
        "proposals": [rpn._pre_nms_top_n["training"], rpn._post_nms_top_n["training"]],
        "proposal_filter": [rpn.nms_thresh, rpn.score_thresh, rpn.min_size],
        "sampling": [sampler.batch_size_per_image, sampler.positive_fraction],
        "matching": [matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches],
        "pooling": [list(pool.featmap_names), list(pool.output_size), pool.sampling_ratio],
    }


def _cached_or_computed(objective, teacher: Teacher, datamodule, path: Path) -> dict:
    statistics = _read_cached_statistics(path)
    if statistics is not None:
        log.info(f"Teacher statistics {objective.statistics_name}: reusing {path}")
        return statistics
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    network = teacher.network.to(device)
    counts = {"images": 0, "rois": 0}
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            torch.manual_seed(STATISTICS_SEED)
            batches = teacher_roi_batches(network, datamodule, device, counts)
            statistics = objective.compute_teacher_statistics(network, batches)
    finally:
        network.cpu()
    statistics = {name: value.cpu() for name, value in statistics.items()}
    atomic_torch_save(statistics, path)
    log.info(
        f"Teacher statistics {objective.statistics_name}: computed on {counts['rois']} RoIs of "
        f"{counts['images']} training images in {time.perf_counter() - started:.2f}s on {device}, cached at "
        f"{path}"
    )
    return statistics


# Choice: the teacher's own RoIs, sampled as in training, on unaugmented images, before training. ND
# (WangYZ1608/Knowledge-Distillation-via-ND `Detection/model/rcnn.py` `emb_fea_distribution`) averages the
# teacher's box-head embeddings per label over the RoIs the *student* sampled during a training run (30000
# iterations, then written to JSON for the next run). Before training there is no trained student, and a
# fresh student's RPN proposes noise, so here the teacher proposes: its RPN with its training proposal
# counts (`rpn_*_top_n_train`), the ground truth appended and the RoIs sampled against it by its own
# `roi_heads.select_training_samples` (`box_batch_size_per_image`, positive fraction, IoU thresholds as
# configured), which is the same sampler the student uses, so the label mix (background included) is that
# of training. The teacher stays in eval mode (no BatchNorm update; its transform resizes to its last
# `min_size`, no multi-scale pick) but for the RPN module, whose training mode only selects those counts.
# The images are the training split's without the flip (`DetectionData.plain_train_dataloader`), one pass,
# with the sampler's random draws seeded (`STATISTICS_SEED`), so the centres are the teacher's and the
# data's alone, the same for every run seed, and the run's own random stream is left as it was. The
# teacher sees its own resize here, the student's resized batch in training: the same when both
# detectors resize alike, as in ND's pairs.
def teacher_roi_batches(
    network: FasterRCNN, datamodule, device: torch.device, counts: dict | None = None
) -> Iterator[tuple[DetectorOutput, torch.Tensor]]:
    """(the teacher's `roi_embedding`, the RoIs' labels: 0 = background, 1..K) per batch of one pass over
    the unaugmented training split, on the teacher's own RoIs sampled as in training (the choice above).
    The pass is torchvision's training forward, `features.student_pass`, run on the teacher."""
    counts = counts if counts is not None else {"images": 0, "rois": 0}
    needs = frozenset({"roi_embedding"})
    for images, targets in progress(datamodule.plain_train_dataloader(), "Teacher RoI statistics"):
        images = [image.to(device) for image in images]
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        with torch.no_grad(), _sampling_mode(network):
            output = student_pass(network, images, targets, needs).output
        counts["images"] += len(images)
        counts["rois"] += len(output.roi_labels)
        yield DetectorOutput(roi_embedding=output.roi_embedding), output.roi_labels


@contextmanager
def _sampling_mode(network: FasterRCNN):
    """The network in eval mode but for its RPN, whose training mode keeps the training proposal counts
    (and wants the targets, for its losses, which are left unused); any BatchNorm in it stays in eval."""
    was_training = network.training
    network.eval()
    network.rpn.train()
    for module in network.rpn.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        yield
    finally:
        network.train(was_training)
