"""The teacher-output cache (`teacher.output_cache=true`) and the per-sample seeded augmentation it rests on:
a run that reads the teacher's outputs trains exactly as one that runs the teacher."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_experiments.data.digits import DigitsData
from kd_experiments.data.sampling import KeyedSampler, SeededSamples, sample_seed
from kd_experiments.output_cache import TeacherOutputCache
from tests.conftest import QUICK, refusal_line, run_main_in_process, run_summaries
from tests.test_data_real import write_image_tree

CACHE = ["teacher.output_cache=true", "teacher.output_cache_dtype=float32"]
BATCHES_PER_EPOCH = 6  # digits: 359 training images in batches of 64


def run(cwd, monkeypatch, capsys, *args):
    result = run_main_in_process(*QUICK, *args, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def trained(summary: dict) -> list:
    """What a run trained and scored, epoch by epoch: the train terms' means and the val top-1."""
    return [(epoch["train"], epoch["top1"]) for epoch in summary["history"]]


def cache_folder(summary: dict) -> Path:
    return Path(summary["teacher_outputs"]["cache"]["folder"])


# --------------------------------------------------------------------------------------- seeded samples


def test_a_sample_is_augmented_by_its_key_whatever_was_drawn_before():
    data = DigitsData(max_shift=2)
    data.setup()
    samples = SeededSamples(data.train_set, seed=3)
    first = samples[(4, 0, 17, 0, 9)][0]
    torch.rand(1000)  # the process's own stream moves on: the sample does not change
    assert torch.equal(samples[(4, 0, 17, 0, 99)][0], first)  # the position does not seed it
    # another epoch, copy, rank or seed shifts it otherwise (some of 4 draws differ for each)
    for key, seed in [
        ((5, 0, 17, 0, 9), 3),
        ((4, 0, 17, 1, 9), 3),
        ((4, 1, 17, 0, 9), 3),
        ((4, 0, 17, 0, 9), 4),
    ]:
        shifted = [SeededSamples(data.train_set, seed)[(key[0] + 10 * k, *key[1:])][0] for k in range(4)]
        assert any(not torch.equal(image, first) for image in shifted)
    state = torch.get_rng_state()
    samples[(0, 0, 1, 0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the generators are restored after each sample
    assert sample_seed(0, 1, 0, 2, 0) != sample_seed(0, 1, 0, 3, 0) != sample_seed(0, 2, 0, 2, 0)


def test_keyed_sampler_counts_copies_and_positions():
    sampler = KeyedSampler([5, 3, 5, 5], rank=1, num_replicas=2)
    sampler.set_epoch(7)
    assert list(sampler) == [(7, 1, 5, 0, 0), (7, 1, 3, 0, 1), (7, 1, 5, 1, 2), (7, 1, 5, 2, 3)]
    assert len(sampler) == 4


# -------------------------------------------------------------------------------------------- the cache


def test_a_cached_run_equals_an_uncached_one_and_dkd_reads_kds_cache(workdir, cachedir, monkeypatch, capsys):
    run(workdir, monkeypatch, capsys, cachedir)  # no cache: the teacher runs
    run(workdir, monkeypatch, capsys, cachedir, *CACHE)  # writes the cache
    run(workdir, monkeypatch, capsys, cachedir, *CACHE)  # reads it
    uncached, first, second = run_summaries(workdir)
    steps = 2 * BATCHES_PER_EPOCH
    assert uncached["teacher_outputs"] == {"cache": None, "computed_batches": steps, "read_batches": 0}
    assert (first["teacher_outputs"]["computed_batches"], first["teacher_outputs"]["read_batches"]) == (
        steps,
        0,
    )
    assert first["teacher_outputs"]["cache"]["stored_rows"] == 2 * 359
    assert (second["teacher_outputs"]["computed_batches"], second["teacher_outputs"]["read_batches"]) == (
        0,
        steps,
    )
    # float32 stores the outputs bit for bit: the three runs train and score exactly alike
    assert trained(first) == trained(uncached) == trained(second)
    folder = cache_folder(first)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0000-rank0of1", "epoch0001-rank0of1"]
    epoch = folder / "epoch0000-rank0of1"
    logits, keys = np.load(epoch / "logits.npy"), np.load(epoch / "keys.npy")
    assert logits.shape == (359, 10) and logits.dtype == np.float32
    assert sorted(keys[:, 0].tolist()) == list(range(359)) and set(keys[:, 1].tolist()) == {0}
    assert json.loads((epoch / "meta.json").read_text())["stored"] == 359

    run(
        workdir, monkeypatch, capsys, cachedir, *CACHE, "method=dkd"
    )  # another method of the same teacher and seed
    dkd = run_summaries(workdir)[-1]
    assert dkd["method"] == "dkd" and dkd["teacher_outputs"]["read_batches"] == steps
    # another seed augments otherwise: it has its own entry
    run(workdir, monkeypatch, capsys, cachedir, *CACHE, "seed=1")
    other_seed = run_summaries(workdir)[-1]
    assert other_seed["teacher_outputs"]["computed_batches"] == steps and cache_folder(other_seed) != folder


def test_a_truncated_cache_file_is_a_miss_not_a_crash(workdir, cachedir, monkeypatch, capsys):
    run(workdir, monkeypatch, capsys, cachedir, *CACHE)
    first = run_summaries(workdir)[0]
    logits = cache_folder(first) / "epoch0000-rank0of1/logits.npy"
    logits.write_bytes(logits.read_bytes()[:1000])  # a disk that filled up, a copy that was cut short
    result = run(workdir, monkeypatch, capsys, cachedir, *CACHE)
    second = run_summaries(workdir)[1]
    counts = second["teacher_outputs"]
    assert (counts["computed_batches"], counts["read_batches"]) == (BATCHES_PER_EPOCH, BATCHES_PER_EPOCH)
    assert "epoch0000-rank0of1 is unreadable" in result.stdout + result.stderr
    assert trained(second) == trained(first)
    # the epoch was written anew: the next run reads both
    run(workdir, monkeypatch, capsys, cachedir, *CACHE)
    assert run_summaries(workdir)[2]["teacher_outputs"]["read_batches"] == 2 * BATCHES_PER_EPOCH


def test_two_loader_workers_read_what_one_process_wrote(workdir, cachedir, monkeypatch, capsys):
    run(workdir, monkeypatch, capsys, cachedir, *CACHE)
    run(workdir, monkeypatch, capsys, cachedir, *CACHE, "dataset.num_workers=2")
    written, read = run_summaries(workdir)
    # each worker seeds every sample by its key: the same images, so every batch is found
    assert read["teacher_outputs"]["read_batches"] == 2 * BATCHES_PER_EPOCH
    assert trained(read) == trained(written)


def test_a_feature_map_method_refuses_the_cache_in_one_line(workdir, monkeypatch, capsys):
    io = {"cwd": workdir, "monkeypatch": monkeypatch, "capsys": capsys}
    line = refusal_line(*QUICK, "method=fitnet", "teacher.output_cache=true", **io)
    assert "fitnet reads the teacher's feature maps (stages)" in line and "teacher.output_cache=false" in line
    line = refusal_line(*QUICK, "teacher.output_cache=true", "teacher.output_cache_dtype=int8", **io)
    assert "output_cache_dtype must be float16 or float32" in line


def test_float16_storage_halves_the_rows_and_stays_close(workdir, cachedir, monkeypatch, capsys):
    run(workdir, monkeypatch, capsys, cachedir, "teacher.output_cache=true")  # float16, the default
    run(workdir, monkeypatch, capsys, cachedir, "teacher.output_cache=true")
    written, read = run_summaries(workdir)
    logits = np.load(cache_folder(written) / "epoch0000-rank0of1/logits.npy")
    assert logits.dtype == np.float16 and read["teacher_outputs"]["read_batches"] == 2 * BATCHES_PER_EPOCH
    assert read["student_top1"] == pytest.approx(written["student_top1"], abs=1.0)


def test_teacher_statistics_and_the_teacher_check_read_the_cache(workdir, cachedir, monkeypatch, capsys):
    nd = ["method=kd++", *CACHE, "teacher.reference_top1=50"]
    first = run(workdir, monkeypatch, capsys, cachedir, *nd)
    assert "Teacher check: logits of 0 of" in first.stdout + first.stderr
    statistics = list((workdir / "teachers/statistics").glob("*.pt"))
    assert len(statistics) == 1
    for path in statistics:  # a new statistic of the same teacher: its pass reads the stored outputs
        path.unlink()
    second = run(workdir, monkeypatch, capsys, cachedir, *nd)
    output = second.stdout + second.stderr
    # 359 training images in 6 batches of 64; 1,438 validation images in 23
    assert "teacher outputs of 6 of 6 batches read" in output
    assert "Teacher check: logits of 23 of 23 batches read" in output
    one, two = run_summaries(workdir)
    assert trained(one) == trained(two) and one["teacher_top1"] == two["teacher_top1"]


def test_mixup_on_an_image_folder_cached_equals_uncached(tmp_path, monkeypatch, capsys):
    write_image_tree(tmp_path / "tree", per_class=6)  # 18 training images: 4 batches of 4 (last dropped)
    common = [
        "dataset=imagefolder", f"dataset.root={tmp_path}/tree", "dataset.image_size=32",
        "dataset.batch_size=4", "dataset.num_workers=0",
        "dataset.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1}",
        "teacher=resnet20", "teacher.weights=random", "student=resnet8", "method=kd",
        f"paths.teacher_cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    run(tmp_path, monkeypatch, capsys, *common)
    run(tmp_path, monkeypatch, capsys, *common, *CACHE)
    run(tmp_path, monkeypatch, capsys, *common, *CACHE)
    uncached, first, second = run_summaries(tmp_path)
    assert (
        second["teacher_outputs"]["read_batches"] == 8 and second["teacher_outputs"]["computed_batches"] == 0
    )
    assert trained(first) == trained(uncached) == trained(second)


def test_the_cache_object_publishes_only_an_ended_epoch(tmp_path):
    from kd_experiments.models.features import NetworkOutput

    cache = TeacherOutputCache(tmp_path / "entry", frozenset({"logits"}), "float32")
    keys = torch.tensor([[0, 0, 7, 0, 0], [0, 0, 2, 0, 1]])
    cache.begin_epoch(0, rows=2)
    assert cache.read(keys) is None
    cache.write(keys, NetworkOutput(logits=torch.tensor([[1.0, 2.0], [3.0, 4.0]])))
    cache.discard()  # a failed fit: nothing published, no temporary folder left
    assert list((tmp_path / "entry").iterdir()) == []
    cache.begin_epoch(0, rows=2)
    cache.write(keys, NetworkOutput(logits=torch.tensor([[1.0, 2.0], [3.0, 4.0]])))
    cache.end_epoch()
    cache.begin_epoch(0, rows=2)
    stored = cache.read(keys[[1, 0]])  # by position, checked against the stored (index, copy)
    assert torch.equal(stored.logits, torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    assert cache.read(torch.tensor([[0, 0, 9, 0, 0]])) is None  # another sample in that row: a miss
    assert cache.read(torch.tensor([[0, 0, 7, 0, 5]])) is None  # beyond the epoch: a miss
