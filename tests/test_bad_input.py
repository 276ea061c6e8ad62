"""Every bad input: a non-zero exit, one clear line on stderr, no traceback, and outputs/ left intact."""

import hashlib

import pytest
import torch

from kd_experiments.models import create_model
from tests.conftest import QUICK, run_cli, run_main_in_process
from tests.test_data_real import write_image_tree


def snapshot(directory) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def bad_files(workdir):
    (workdir / "garbage.pt").write_bytes(b"this is not a checkpoint")
    torch.save([1, 2, 3], workdir / "a_list.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, workdir / "pickled_module.pt")
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), workdir / "resnet20.pt")
    (workdir / "truncated.pt").write_bytes((workdir / "resnet20.pt").read_bytes()[:1000])
    leave_earlier_outputs(workdir)
    return workdir


def leave_earlier_outputs(root) -> None:
    """Something earlier runs left behind in root/outputs, which no failed run may touch."""
    previous = root / "outputs/runs/2020-01-01/previous_run"
    previous.mkdir(parents=True)
    (previous / "summary.json").write_text('{"status": "completed"}')
    (root / "outputs/notes.txt").write_text("keep me")


CASES = {
    "missing checkpoint": (
        ["teacher.checkpoint=/no/such/teacher.pt"],
        "teacher checkpoint not found: /no/such",
    ),
    "unreadable checkpoint": (
        ["teacher.checkpoint=garbage.pt"],
        "could not read teacher checkpoint garbage.pt",
    ),
    "truncated checkpoint": (
        ["teacher.checkpoint=truncated.pt"],
        "truncated or not a torch.save file (PytorchStreamReader failed reading zip archive: failed finding "
        "central directory)",
    ),
    "pickled objects": (["teacher.checkpoint=pickled_module.pt"], "save model.state_dict() instead"),
    "not a state dict": (["teacher.checkpoint=a_list.pt"], "holds a list, not a state dict"),
    "wrong architecture": (
        ["teacher.checkpoint=resnet20.pt"],
        "does not fit convnet_wide: missing: stem.0.weight",
    ),
    "teacher classes": (
        ["teacher.num_classes=100"],
        "teacher.num_classes=100 but dataset digits has 10 classes",
    ),
    "student classes": (["student.num_classes=7"], "student.num_classes=7 but dataset digits has 10 classes"),
    "data not there": (["dataset.data_file=/no/such/digits.csv"], "not found at /no/such/digits.csv"),
    "zero batch": (["dataset.batch_size=0"], "dataset.batch_size must be a positive integer, got 0"),
    "negative batch": (["dataset.batch_size=-8"], "dataset.batch_size must be a positive integer, got -8"),
    "no teacher weights": (["teacher.train_if_missing=false"], "no weights for teacher convnet_wide"),
    "bad optimizer key": (["+optimizer.lrr=0.1"], "optimizer config is invalid"),
    "unknown model": (["student.arch=resnet9000"], "unknown model 'resnet9000'"),
    "zero temperature": (["method.objectives.kd.temperature=0"], "temperature must be positive, got 0"),
    "nan weight": (["method.weights.kd=nan"], "method.weights.kd must be a finite number, got nan"),
    "infinite weight": (["method.weights.kd=inf"], "method.weights.kd must be a finite number, got inf"),
    "weight without objective": (["+method.weights.nd=1.0"], "give exactly one weight per term"),
    "old objective key": (["+method.objective.temperature=2"], "method.objective is now method.objectives"),
    "second head on a CNN": (["method=deit"], "ConvNet has one head; use a two-headed DeiT student"),
    "epochs not a number": (
        ["trainer.max_epochs=abc"],
        "trainer.max_epochs must be an integer >= -1, got 'abc'",
    ),
    "negative seed": (["seed=-1"], "seed must be an integer from 0 to 2**32 - 1, got -1"),
    "zero validation interval": (
        ["trainer.check_val_every_n_epoch=0"],
        "trainer.check_val_every_n_epoch must be an integer >= 1, got 0",
    ),
    "teacher cache not writable": (
        ["paths.teacher_cache_dir=garbage.pt/teachers"],
        "paths.teacher_cache_dir=garbage.pt/teachers is not writable (Not a directory); point it at a "
        "writable directory",
    ),
    "exploding loss": (
        ["optimizer.lr=1e6"],
        "; the checkpoints of earlier epochs are kept): lower optimizer.lr, or check this term's weight",
    ),
    "ViT built for other images": (
        ["student.arch=deit_tiny_patch16_224", "+student.model_kwargs.img_size=224"],
        "the student (VisionTransformer) fails on one batch of digits images of shape (1, 8, 8)",
    ),
}


# One case runs the real `python -m kd_experiments`; the others call the same entry point in-process
# (tests/conftest.run_main_in_process), which skips a new interpreter's imports for each case.
IN_A_NEW_PROCESS = "missing checkpoint"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(bad_files, case, monkeypatch, capsys):
    overrides, message = CASES[case]
    before = snapshot(bad_files / "outputs")
    if case == IN_A_NEW_PROCESS:
        result = run_cli(*QUICK, *overrides, cwd=bad_files)
    else:
        result = run_main_in_process(
            *QUICK, *overrides, cwd=bad_files, monkeypatch=monkeypatch, capsys=capsys
        )
    assert_one_clear_line(result, message, bad_files / "outputs", before)


def assert_one_clear_line(result, message: str, outputs, before: dict) -> None:
    """Exit 2, one `error: ...` line holding `message`, no traceback, the earlier `outputs` untouched (the
    `before` snapshot), and the failed run's own summary.json saying so."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    after = snapshot(outputs)
    assert all(after.get(path) == digest for path, digest in before.items()), "an earlier output changed"
    # the failed run still leaves an honest record in its own new directory
    failed = [p for p in after if p.name == "summary.json" and p not in before]
    assert len(failed) == 1 and '"status": "failed"' in failed[0].read_text()


def keep_only(folder, *names: str) -> None:
    """Empty `folder` and put the non-image files `names` there instead."""
    for file in folder.iterdir():
        file.unlink()
    for name in names:
        (folder / name).write_bytes(b"\x00\x05\x16\x07 not an image")


def garbage(image) -> None:
    image.write_bytes(b"these bytes are no PNG")


def truncate(image) -> None:
    image.write_bytes(image.read_bytes()[:100])  # the header reads fine, the pixel data stops short


# How to spoil a tree of 2 classes x 4 PNGs, dataset.num_workers, and the message ({tree}: the tree's root).
# The garbage PNG sits behind a DataLoader worker; the truncated one is the first image, which the probe
# batch reads in-process before the teacher is built.
IMAGE_FOLDER_CASES = {
    "class folder of non-image files": (
        lambda tree: keep_only(tree / "val/dog", "notes.txt", ".DS_Store"),
        0,
        "class folder {tree}/val/dog has no images (it holds only .DS_Store, notes.txt; image files end in "
        ".jpg, .jpeg, .png,",
    ),
    "empty class folder": (
        lambda tree: keep_only(tree / "train/cat"),
        0,
        "class folder {tree}/train/cat has no images (image files end in .jpg,",
    ),
    "corrupt PNG behind a loader worker": (
        lambda tree: garbage(tree / "train/dog/3.png"),
        1,
        "cannot read image {tree}/train/dog/3.png (cannot identify image file); remove or replace it",
    ),
    "truncated PNG": (
        lambda tree: truncate(tree / "train/cat/0.png"),
        0,
        "cannot read image {tree}/train/cat/0.png (image file is truncated); remove or replace it",
    ),
}


@pytest.mark.parametrize("case", sorted(IMAGE_FOLDER_CASES))
def test_bad_image_folder_is_one_clear_line(tmp_path, case, monkeypatch, capsys):
    spoil, num_workers, message = IMAGE_FOLDER_CASES[case]
    tree = write_image_tree(tmp_path / "tree", classes=("cat", "dog"), per_class=4, size=8)
    for folder in (tree / "train/cat", tree / "train/dog"):  # not samples, so never an error
        (folder / "notes.txt").write_text("shot on a phone")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    spoil(tree)
    leave_earlier_outputs(tmp_path)
    before = snapshot(tmp_path / "outputs")
    result = run_main_in_process(
        *QUICK, "trainer.max_steps=2", "dataset=imagefolder", f"dataset.root={tree}",
        "dataset.image_size=16", "dataset.batch_size=4", f"dataset.num_workers={num_workers}",
        "teacher=resnet20", "teacher.weights=random", "student=resnet8",
        cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert_one_clear_line(result, message.format(tree=tree), tmp_path / "outputs", before)


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_that_cannot_be_written_is_one_line(bad_files, key, monkeypatch, capsys):
    before = snapshot(bad_files / "outputs")
    sweep = ["-m"] if key == "hydra.sweep.dir" else []
    result = run_main_in_process(
        *sweep, *QUICK, f"{key}=garbage.pt/run", cwd=bad_files, monkeypatch=monkeypatch, capsys=capsys
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {key}=garbage.pt/run is not writable (Not a directory); point it at a writable directory"
    ]
    assert snapshot(bad_files / "outputs") == before


def test_unknown_group_option_lists_the_options(bad_files):
    before = snapshot(bad_files / "outputs")
    result = run_cli("method=no_such_method", cwd=bad_files)
    assert result.returncode != 0
    assert "Could not find 'method/no_such_method'" in result.stderr
    assert "Available options in 'method'" in result.stderr and "kd" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(bad_files / "outputs") == before


def test_a_finished_run_directory_is_never_overwritten(bad_files):
    previous = bad_files / "outputs/runs/2020-01-01/previous_run"
    (previous / ".hydra").mkdir()
    (previous / ".hydra/config.yaml").write_text("seed: 0\n")
    (previous / "__main__.log").write_text("the earlier run's log\n")
    before = snapshot(previous)
    result = run_cli(*QUICK, "seed=5", f"hydra.run.dir={previous}", cwd=bad_files)
    assert result.returncode == 2
    assert f"{previous} holds a run with a different config (seed: 0 there, 5 now" in result.stderr
    assert snapshot(previous) == before  # not a byte changed, not a file added
