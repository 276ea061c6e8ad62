"""A run killed or pre-empted and then continued ends exactly where the uninterrupted run ends; a directory
holding another run is refused without touching it."""

import csv
import hashlib
import json
import math
import signal

import pytest
import torch

from tests.conftest import REPO, clean_env, run_cli, run_main_in_process

# The digits default, 4 epochs, deterministic kernels, no logger; the student's weights averaged over the
# last 3 epochs and an EMA of them, whose state a resumed run must carry on too.
RUN = [
    "trainer.max_epochs=4",
    "logger=none",
    "trainer.deterministic=true",
    "++trainer.enable_model_summary=false",
    "report=weight_average",
    "average_epochs=3",
    "ema_decay=0.9",
]
_reference: dict = {}


def fault(kind: str, epoch: int, marker) -> list[str]:
    """Overrides that send `kind` to the run at batch 3 of `epoch`, once (tests/faults.py)."""
    return [
        "+callbacks.fault._target_=tests.faults.SignalOnce",
        f"+callbacks.fault.signal={kind}",
        f"+callbacks.fault.epoch={epoch}",
        "+callbacks.fault.batch=3",
        f"+callbacks.fault.marker={marker}",
    ]


def outcome(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    last = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    averaged, ema = (
        torch.load(run_dir / "checkpoints" / name) for name in ("averaged_student.pt", "ema_student.pt")
    )
    return {
        "summary": summary,
        "history": last["validation_history"],
        "weights": last["state_dict"],
        "averaged": averaged,
        "ema": ema,
    }


def uninterrupted(workdir, monkeypatch, capsys) -> dict:
    """The same run without a fault, once per test session."""
    if not _reference:
        run_dir = workdir / "outputs/reference"
        result = run_main_in_process(
            *RUN, f"hydra.run.dir={run_dir}", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
        )
        assert result.returncode == 0, result.stderr[-2000:]
        _reference.update(outcome(run_dir))
    return _reference


def assert_same_run(resumed: dict, reference: dict) -> None:
    got, expected = resumed["summary"], reference["summary"]
    assert got["status"] == "completed"
    assert got["steps"] == expected["steps"] == 24 and expected["averaged_epochs"] == 3
    for key in ("student_top1", "student_top1_reported", "averaged_epochs", "student_top1_ema"):
        assert got[key] == expected[key], key
    assert resumed["history"] == reference["history"]  # every epoch's top-1 and top-5
    # summary.json's history: every epoch once, with the same top-1, LR and loss means (not the same speed)
    without_speed = [({k: v for k, v in h.items() if k != "images_per_s"}) for h in got["history"]]
    assert without_speed == [{k: v for k, v in h.items() if k != "images_per_s"} for h in expected["history"]]
    assert [h["epoch"] for h in got["history"]] == [0, 1, 2, 3]
    for part in ("weights", "averaged", "ema"):  # the student, its 3-epoch average, its EMA
        for name, tensor in reference[part].items():
            torch.testing.assert_close(resumed[part][name], tensor, rtol=0, atol=1e-6, msg=f"{part}: {name}")


def with_repo_on_path(workdir) -> dict:
    env = clean_env(workdir)
    env["PYTHONPATH"] = str(REPO)  # tests.faults, for the killed process
    return env


@pytest.mark.parametrize("epoch", [0, 2, 3])
def test_a_run_killed_in_any_epoch_and_run_again_ends_as_the_uninterrupted_one(
    workdir, epoch, monkeypatch, capsys
):
    reference = uninterrupted(workdir, monkeypatch, capsys)
    run_dir, marker = workdir / "outputs/killed", workdir / "fired"
    command = [*RUN, f"hydra.run.dir={run_dir}", *fault("SIGKILL", epoch, marker)]
    killed = run_cli(*command, cwd=workdir, env=with_repo_on_path(workdir))
    assert killed.returncode == -signal.SIGKILL and marker.exists()
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints/last.ckpt").exists() == (epoch > 0)

    # SLURM requeue / submitit: the identical command, the same run directory
    result = run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = outcome(run_dir)
    assert_same_run(resumed, reference)
    expected = [{"from_epoch": epoch, "from_step": 6 * epoch}] if epoch > 0 else None
    assert resumed["summary"].get("resumes") == expected


@pytest.mark.parametrize(("kind", "epoch"), [("SIGTERM", 1), ("SIGUSR1", 2)])
def test_a_preempted_run_saves_its_step_says_interrupted_and_resumes_exactly(
    workdir, kind, epoch, monkeypatch, capsys
):
    reference = uninterrupted(workdir, monkeypatch, capsys)
    run_dir, marker = workdir / "outputs/preempted", workdir / "fired"
    signum = getattr(signal, kind)
    logger = ["logger=wandb"] if kind == "SIGUSR1" else []  # offline; the resumed run must continue its id
    stopped = run_cli(
        *RUN,
        *logger,
        f"hydra.run.dir={run_dir}",
        *fault(kind, epoch, marker),
        cwd=workdir,
        env=with_repo_on_path(workdir),
    )
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"interrupted: stopped by {kind} at epoch {epoch}, step {6 * epoch + 4}; that step is saved in "
        f"{run_dir}/checkpoints/interrupted.ckpt; continue from the start of that epoch with: python -m "
        f"kd_experiments resume={run_dir}"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and kind in summary["error"]
    interrupted = torch.load(run_dir / "checkpoints/interrupted.ckpt", weights_only=True)
    assert interrupted["global_step"] == 6 * epoch + 4  # the step the signal arrived in, finished
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["epoch"] == epoch - 1

    result = run_main_in_process(f"resume={run_dir}", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(outcome(run_dir), reference)
    if logger:  # both attempts logged offline into one W&B run id: the curve continues in the same run
        runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1, runs


def test_resume_with_more_epochs_stretches_the_schedule_and_keeps_the_logs(workdir, monkeypatch, capsys):
    run_dir = workdir / "outputs/extended"
    first = run_main_in_process(
        "trainer.max_epochs=3", "logger=csv", f"hydra.run.dir={run_dir}",
        cwd=workdir, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_main_in_process(
        f"resume={run_dir}", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )  # a finished run: nothing to resume
    assert again.returncode == 2
    assert "finished all 3 epochs; to train it longer give a larger trainer.max_epochs" in again.stderr
    longer = run_main_in_process(
        f"resume={run_dir}", "trainer.max_epochs=5", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["epochs"], summary["resumes"]) == (5, [{"from_epoch": 3, "from_step": 18}])
    with open(run_dir / "csv/metrics.csv", newline="") as file:
        rates = [float(row["lr-SGD"]) for row in csv.DictReader(file) if row.get("lr-SGD")]
    # epochs 0-2 on the 3-epoch cosine, then the 5-epoch cosine from epoch 3 on (CSV rows kept across)
    cosine = [0.05 * (1 + math.cos(math.pi * e / t)) / 2 for e, t in ((0, 3), (1, 3), (2, 3), (3, 5), (4, 5))]
    assert rates == pytest.approx(cosine, abs=1e-9)
    saved = (run_dir / ".hydra/config.yaml").read_text()
    assert "max_epochs: 5" in saved  # the saved config is what the run now is


def snapshot(directory) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*") if p.is_file()}


def test_what_may_not_be_resumed_is_refused_in_one_line_touching_nothing(workdir, monkeypatch, capsys):
    run_dir, marker = workdir / "outputs/stopped", workdir / "fired"
    command = [
        "trainer.max_epochs=3",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *fault("SIGKILL", 1, marker),
    ]
    assert run_cli(*command, cwd=workdir, env=with_repo_on_path(workdir)).returncode == -signal.SIGKILL
    before = snapshot(run_dir)
    refusals = {
        (*command, "method=dkd"): (
            f"{run_dir} holds a run with a different config (method.name: 'kd' there, 'dkd' now; "
        ),
        (f"resume={run_dir}", "seed=3"): (
            "resume= continues a run with its saved config; drop seed (only a longer trainer.max_epochs may "
            "be given)"
        ),
        (f"resume={run_dir}", "trainer.max_epochs=2"): (
            "trainer.max_epochs=2 is shorter than the run's 3; a resumed run may only be made longer"
        ),
        (f"resume={workdir}/outputs/nothing_here",): (f"resume={workdir}/outputs/nothing_here: no run there"),
        (
            "-m",
            f"resume={run_dir}",
        ): "resume= continues one run; to continue a sweep, run the same -m command",
    }
    for arguments, message in refusals.items():
        result = run_main_in_process(*arguments, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
        assert result.returncode == 2, (arguments, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        if arguments[0] == "-m":  # a sweep names its failed jobs after the job's own line
            assert lines[1:] == ["error: 1 sweep job(s) failed:", f"  #0 ({arguments[1]}): {lines[0][7:]}"]
            lines = lines[:1]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(run_dir) == before, arguments  # not a byte changed, not a file added


def test_the_identical_command_in_a_finished_run_changes_nothing(workdir, monkeypatch, capsys):
    run_dir = workdir / "outputs/done"
    command = ["trainer.max_epochs=1", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys).returncode == 0
    before = snapshot(run_dir)
    result = run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0
    assert f"{run_dir} already finished this run (status completed); nothing to do" in result.stderr
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("under_slurm", [False, True])
def test_sigusr1_is_ours_except_under_slurm_where_lightning_requeues(tmp_path, monkeypatch, under_slurm):
    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from kd_experiments.resume import Preemption

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    if under_slurm:  # what sbatch / srun set
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "distil")
        monkeypatch.setenv("SLURM_JOB_ID", "1234")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    slurm = isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert slurm == under_slurm
    preemption = Preemption(tmp_path)
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.signals(trainer):
        assert signal.getsignal(signal.SIGTERM) == preemption._record  # Lightning calls it after its own
        usr1 = signal.getsignal(signal.SIGUSR1)
        # under SLURM, SIGUSR1 is left to Lightning's SLURMEnvironment (save hpc_ckpt, scontrol requeue)
        assert (usr1 == preemption._as_sigterm) == (not under_slurm)
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_sweep_run_again_continues_only_its_unfinished_jobs(workdir, monkeypatch, capsys):
    sweep = workdir / "outputs/sweep"
    command = ["-m", "seed=0,1", "trainer.max_epochs=1", "logger=none", f"hydra.sweep.dir={sweep}"]
    first = run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert first.returncode == 0, first.stderr[-2000:]
    (
        sweep / "1_seed=1,trainer.max_epochs=1/summary.json"
    ).unlink()  # job 1 was killed after its last checkpoint
    finished = snapshot(sweep / "0_seed=0,trainer.max_epochs=1")
    again = run_main_in_process(*command, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        f"{sweep}/0_seed=0,trainer.max_epochs=1 already finished this run (status completed); nothing to do"
        in again.stderr
    )
    assert snapshot(sweep / "0_seed=0,trainer.max_epochs=1") == finished
    resumed = json.loads((sweep / "1_seed=1,trainer.max_epochs=1/summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumes"] == [{"from_epoch": 1, "from_step": 6}]
