"""DDP in sweeps, exact: a DDP multirun leaves one sweep folder with one completed job per point, its child
ranks run that job only (kd_experiments.distributed), validation scores every image once over the ranks,
rank-zero-only work is done once, and data downloads happen once."""

import inspect
import json
import os
import sys
import tarfile
import threading
import time
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pytorch_lightning.strategies.launchers import subprocess_script
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DistributedSampler, SequentialSampler, TensorDataset

import kd_experiments.train  # installs the child command, as in a real run
from kd_experiments import distributed
from kd_experiments.data.base import ClassificationData, ShardedEvalSampler
from kd_experiments.data.cifar import CIFARData
from kd_experiments.data.digits import DigitsData
from kd_experiments.resume import start_in
from kd_experiments.teachers import Teacher, check_teacher_reference, teacher_cache_key
from tests.conftest import CONF_DIR, clean_env, compose_config, run_cli
from tests.test_data_real import write_cifar

DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "SLURM_PROCID",
)


def test_a_ddp_multirun_leaves_one_sweep_of_completed_exact_jobs(project_dir, workdir, cachedir):
    """`-m seed=0,0` on two CPU processes, with the teacher-output cache: one sweep folder, each job
    completed in its own folder (where its rank 1 ran too), every validation image scored once (1,438), the
    teacher's top-1 the one-process run's to the last bit, the EMA and averaged students scored (once, on
    rank 0), and no sync_dist warning. Job 0 stores the teacher's outputs, each rank its own shard; job 1,
    the same run again, reads them and trains exactly as job 0."""
    one_process = json.loads(next(project_dir.glob("outputs/runs/*/*/summary.json")).read_text())
    assert (one_process["val_images"], one_process["world_size"]) == (1438, 1)
    env = {k: v for k, v in clean_env(workdir).items() if k not in RANK_VARIABLES} | {"OMP_NUM_THREADS": "1"}
    result = run_cli(
        "-m", "seed=0,0", *DDP, "trainer.max_epochs=1", "logger=none", "++trainer.enable_model_summary=false",
        "++trainer.enable_progress_bar=false", "ema_decay=0.9", "report=weight_average", "average_epochs=1",
        cachedir, "teacher.output_cache=true", "teacher.output_cache_dtype=float32", cwd=workdir, env=env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    sweeps = list((workdir / "outputs/multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # a child re-running the sweep left a second one
    assert not (workdir / "outputs/runs").exists()
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    for job, summary in zip(jobs, summaries, strict=True):
        assert summary["status"] == "completed" and summary["output_dir"] == str(job)
        assert (summary["val_images"], summary["world_size"]) == (1438, 2)
        assert summary["teacher_top1"] == one_process["teacher_top1"]
        assert summary["student_top1_ema"] is not None and summary["student_top1_reported"] is not None
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's folder
    assert "sync_dist" not in output
    assert output.count("Initializing distributed: GLOBAL_RANK: 1") == 2  # one child per job, no more

    written, read = summaries
    folder = Path(written["teacher_outputs"]["cache"]["folder"])
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("epoch0000")) == [
        "epoch0000-rank0of2",
        "epoch0000-rank1of2",
    ]
    # 359 images over 2 ranks: 180 each (padded), in 3 batches of 64
    assert [np.load(folder / f"epoch0000-rank{r}of2/keys.npy").shape[0] for r in (0, 1)] == [180, 180]
    counts = [s["teacher_outputs"] for s in summaries]
    assert [(c["computed_batches"], c["read_batches"]) for c in counts] == [(3, 0), (0, 3)]
    trained = [[(epoch["train"], epoch["top1"]) for epoch in s["history"]] for s in summaries]
    assert trained[1] == trained[0] and read["student_top1_ema"] == written["student_top1_ema"]


def test_the_validation_shards_cover_every_image_once():
    dataset = TensorDataset(torch.arange(10))
    shards = [list(ShardedEvalSampler(dataset, 3, rank)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert [len(ShardedEvalSampler(dataset, 3, rank)) for rank in range(3)] == [4, 3, 3]
    assert sorted(i for s in shards for i in s) == list(range(10))
    # A DistributedSampler: Lightning keeps it rather than wrapping the loader in its own (padded) one.
    assert isinstance(ShardedEvalSampler(dataset, 3, 0), DistributedSampler)
    assert [len(ShardedEvalSampler(TensorDataset(torch.arange(2)), 3, r)) for r in range(3)] == [1, 1, 0]


def test_val_dataloader_shards_only_under_several_processes():
    data = DigitsData(batch_size=16)
    data.setup("fit")
    assert isinstance(data.val_dataloader().sampler, SequentialSampler)  # no trainer yet
    data.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert isinstance(data.val_dataloader().sampler, SequentialSampler)
    seen = []
    for rank in range(3):
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, ShardedEvalSampler) and loader.sampler.rank == rank
        seen += [len(targets) for _, targets in loader]
    assert sum(seen) == len(data.val_set) == 1438
    assert sum(len(t) for _, t in data.whole_val_dataloader()) == 1438  # rank 0's full pass


def test_the_child_command_is_the_job_alone():
    folder = "/out/multirun/2026-01-01/10-00-00/3_method=kd,seed=1"
    command = distributed.child_command(
        ["python", "-m", "kd_experiments"], ["method=kd", "seed=1"], folder, 1
    )
    assert command[:3] == ["python", "-m", "kd_experiments"]
    arguments = command[3:]
    assert "-m" not in arguments and "--multirun" not in arguments
    assert arguments[:2] == ["method=kd", "seed=1"]
    assert arguments[2:] == [
        "hydra.mode=RUN",
        f"hydra.run.dir='{folder}'",
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]


@pytest.mark.parametrize(
    "folder",
    [
        "/o/multirun/1_method=kd,seed=0",
        '/o u t/it\'s "q"/[a,b] {c:d}',
        "/o/${now:%H}/$HOME",
        "/o/back\\slash\\",
    ],
)
def test_hydra_reads_the_child_run_dir_back_exactly(folder):
    """Whatever the folder holds (the `=` and `,` of a job name, spaces, quotes, brackets, `${`), the child
    composes exactly it as hydra.run.dir, in run mode."""
    overrides = distributed.child_command([], ["seed=1"], folder, 1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.run.dir == folder and str(cfg.hydra.mode) == "RunMode.RUN" and cfg.seed == 1
    assert cfg.hydra.job.name == "train_ddp_process_1" and cfg.hydra.output_subdir is None


def test_the_child_command_comes_from_the_job_not_from_argv(monkeypatch):
    job = SimpleNamespace(
        overrides=SimpleNamespace(task=["seed=1", "trainer.strategy=ddp"]),
        runtime=SimpleNamespace(output_dir="/sweep/1_seed=1"),
    )
    monkeypatch.setattr(distributed.HydraConfig, "get", staticmethod(lambda: job))
    monkeypatch.setattr(distributed, "get_original_cwd", lambda: "/started/here")
    monkeypatch.setattr("sys.argv", ["kd_experiments", "-m", "seed=0,1", "trainer.strategy=ddp"])
    # started as `python -m kd_experiments` (under pytest-xdist, __main__ is execnet's, without a spec)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", ModuleSpec("kd_experiments", None))
    command, cwd = distributed.hydra_child_command(local_rank=1)
    assert cwd == "/started/here" and command[:3] == [sys.executable, "-m", "kd_experiments"]
    assert "seed=0,1" not in command and "-m" not in command[3:]
    assert command[-6:-4] == ["seed=1", "trainer.strategy=ddp"]
    assert "hydra.run.dir='/sweep/1_seed=1'" in command


def test_lightning_calls_the_command_builder_this_project_replaces():
    """A private Lightning name: when Lightning renames it or stops calling it, this fails (and a DDP sweep
    would re-run the whole sweep in each child again)."""
    assert subprocess_script._hydra_subprocess_cmd is distributed.hydra_child_command
    source = inspect.getsource(subprocess_script._SubprocessScriptLauncher._call_children_scripts)
    assert "_hydra_subprocess_cmd(local_rank)" in source


def test_a_job_ends_the_process_group_an_earlier_job_of_its_process_left(monkeypatch, tmp_path):
    """What Lightning's launcher leaves in its own process after a job (WORLD_SIZE goes at its teardown): the
    next job of a sweep removes it and the process group, so that it starts its own on a new port."""
    monkeypatch.setattr(distributed, "STARTED_WITH", frozenset())
    left = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NODE_RANK": "0", "LOCAL_RANK": "0"}
    for name, value in left.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert distributed.end_previous_job() == list(left)
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert not set(left) & set(os.environ)
    assert distributed.end_previous_job() == []  # nothing left: as a job of a fresh process
    monkeypatch.setenv("MASTER_PORT", "1")  # all Lightning's SLURM environment sets (ranks started by srun)
    assert distributed.end_previous_job() == [] and os.environ["MASTER_PORT"] == "1"
    monkeypatch.setattr(distributed, "STARTED_WITH", frozenset(left))  # started as a rank (torchrun, a child)
    for name, value in left.items():
        monkeypatch.setenv(name, value)
    assert distributed.end_previous_job() == [] and os.environ["LOCAL_RANK"] == "0"


def test_a_child_rank_neither_refuses_nor_writes_in_the_folder_rank_zero_started(monkeypatch, tmp_path):
    """Rank 1 starts in the job's folder after rank 0 saved its config there (and maybe a summary.json of a
    running run): it continues that run, from no checkpoint, and writes nothing (rank 0 writes)."""
    cfg = compose_config(*DDP)
    job = tmp_path / "0_seed=0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (job / "summary.json").write_text(json.dumps({"status": "running"}))
    before = {path: path.stat().st_mtime_ns for path in job.rglob("*")}
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    start = start_in(cfg, job, job / "summary.json")
    assert (start.finished, start.checkpoint, start.saved, start.continuing) == (None, None, None, True)
    kd_experiments.train._save_run_config(start.cfg, job, continuing=start.continuing)
    assert {path: path.stat().st_mtime_ns for path in job.rglob("*")} == before


def test_only_global_rank_zero_checks_the_teacher_over_the_whole_split(monkeypatch):
    data = DigitsData(batch_size=256)
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=2, global_rank=0)  # a shard would be half the split
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = compose_config("teacher.reference_top1=1.0").teacher
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert check_teacher_reference(Teacher(network), cfg, data) is None
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    images, labels = data.val_set.tensors  # all 1,438 validation images
    with torch.no_grad():
        whole_split = (network(images).argmax(1) == labels).sum().item() * 100 / 1438
    shard = (network(images[::2]).argmax(1) == labels[::2]).sum().item() * 100 / len(labels[::2])
    assert shard != whole_split  # so the number tells which images were scored
    assert check_teacher_reference(Teacher(network), cfg, data) == pytest.approx(whole_split)


def test_pin_memory_is_a_key_of_every_data_set_and_not_of_the_teacher_cache():
    for name in ("digits", "fake", "cifar10", "cifar100", "imagefolder", "imagenet"):
        assert compose_config(f"dataset={name}").dataset.pin_memory is False, name
    cfg = compose_config()
    pinned = compose_config("dataset.pin_memory=true")
    assert teacher_cache_key(cfg.teacher, cfg.dataset) == teacher_cache_key(pinned.teacher, pinned.dataset)
    data = DigitsData(pin_memory=True)
    data.setup("fit")
    assert data.val_dataloader().pin_memory and data.train_dataloader().pin_memory
    assert not ClassificationData(batch_size=4, num_classes=2, image_size=8).pin_memory


def test_ranks_started_together_download_cifar_once(monkeypatch, tmp_path):
    """Two processes preparing CIFAR-10 at once (threads here; ranks of torchrun in a run): one downloads
    (a CIFAR archive made here; nothing is fetched), the other waits on the lock and finds it complete."""
    source = tmp_path / "source"
    write_cifar(source, "cifar10")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    downloads = []

    def fake_download(url, root, filename=None, md5=None, **_):
        downloads.append(url)
        time.sleep(0.5)  # long enough for the other process to arrive while this one downloads
        Path(root, filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    root = tmp_path / "data"
    modules = [CIFARData(root=str(root), variant="cifar10", num_classes=10, download=True) for _ in range(2)]
    errors = []
    threads = [threading.Thread(target=lambda m=m: _call(m.prepare_data, errors)) for m in modules]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(downloads) == 1
    modules[1].setup("fit")
    assert (len(modules[1].train_set), len(modules[1].val_set)) == (40, 20)
    modules[0].prepare_data()  # complete: no download, no lock needed
    assert len(downloads) == 1


def _call(function, errors: list) -> None:
    try:
        function()
    except Exception as error:  # reported by the test, not lost in the thread
        errors.append(error)
