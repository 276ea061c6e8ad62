"""Study reports (kd_experiments.report): numbers against hand-computed ones on hand-made run folders, the
command line, the sweep callback inside Hydra, the job folder names, and one real multirun."""

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from omegaconf import OmegaConf

from kd_experiments import report, sweep
from kd_experiments.resolvers import job_name
from tests.conftest import CONF_DIR, REPO, run_main_in_process

KD_METHOD = {
    "name": "kd",
    "objectives": {"kd": {"_target_": "kd_experiments.methods.kd.HintonKD", "temperature": 4.0}},
    "weights": {"ce": 0.1, "kd": 0.9},
}
CE_METHOD = {"name": "ce", "objectives": {}, "weights": {"ce": 1.0}}
PAPER = {"top1": 70.66, "source": "CRD paper", "dataset": "cifar100"}


def run_config(method: dict, seed: int, **extra) -> dict:
    """A small composed config, as .hydra/config.yaml holds it (interpolations unresolved)."""
    return {
        "trainer": {"max_epochs": 1, "enable_model_summary": False},
        "teacher": {"arch": "convnet_wide", "num_classes": "${dataset.num_classes}"},
        "student": {"arch": "convnet_narrow"},
        "method": json.loads(json.dumps(method)),
        "dataset": {"name": "digits", "num_classes": 10},
        "logger": {},
        "paths": {"root_dir": ".", "output_dir": "${hydra:runtime.output_dir}"},
        "seed": seed,
        "resume": None,
        "callbacks": {},
        "report": "last",
        **extra,
    }


def make_run(root: Path, name: str, top1: float | None, config: dict | None, status="completed", **fields):
    """A run folder with a hand-made summary.json and, unless `config` is None, .hydra/config.yaml."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    method = (config or {}).get("method", {}).get("name", fields.pop("method", "kd"))
    summary = {
        "status": status, "method": method, "teacher": "convnet_wide", "student": "convnet_narrow",
        "dataset": "digits", "seed": (config or {}).get("seed", fields.pop("seed", 0)),
        "overrides": fields.pop("overrides", []), "output_dir": str(folder), "student_top1": top1,
        "student_top1_best": top1, "report": "last", "student_top1_reported": top1, "teacher_top1": 97.5,
        **fields,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        OmegaConf.save(OmegaConf.create(config), folder / ".hydra/config.yaml")
    return folder


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400 and len(data) > 10_000


@pytest.fixture
def two_methods_three_seeds(tmp_path) -> Path:
    """ce and kd, seeds 0-2, hand-picked top-1s; kd also has a failed and an interrupted seed."""
    sweep_dir = tmp_path / "sweep"
    for seed, top1 in enumerate([70.0, 71.5, 72.1]):
        make_run(sweep_dir, f"{seed}_method=ce,seed={seed}", top1, run_config(CE_METHOD, seed))
    for seed, top1 in enumerate([73.0, 73.4, 74.5]):
        make_run(sweep_dir, f"{seed + 3}_method=kd,seed={seed}", top1, run_config(KD_METHOD, seed))
    make_run(
        sweep_dir, "6_method=kd,seed=3", 12.0, run_config(KD_METHOD, 3), status="failed",
        error="student.num_classes=7 but dataset digits has 10 classes | set it to 10",
    )  # fmt: skip
    make_run(sweep_dir, "7_method=kd,seed=4", None, run_config(KD_METHOD, 4), status="interrupted")
    return sweep_dir


def test_groups_average_the_seeds_with_the_sample_std(two_methods_three_seeds, capsys):
    assert report.main([str(two_methods_three_seeds)]) == 0
    columns, rows = read_csv(two_methods_three_seeds / "report.csv")
    # every method.* key differs between ce and kd, but follows from the method: no column
    assert columns == [
        "method", "n", "top1_mean", "top1_std", "paper_top1", "delta_to_paper", "teacher_top1_mean", "seeds",
    ]  # fmt: skip
    ce, kd = rows
    # by hand: ce 70.0, 71.5, 72.1 -> mean 213.6 / 3 = 71.2, squared deviations 1.44 + 0.09 + 0.81 = 2.34
    assert (ce["method"], ce["n"], ce["seeds"]) == ("ce", "3", "0 1 2")
    assert float(ce["top1_mean"]) == pytest.approx(71.2, abs=1e-4)
    assert float(ce["top1_std"]) == pytest.approx(math.sqrt(2.34 / 2), abs=1e-4)
    # kd 73.0, 73.4, 74.5 (the failed seed's 12.0 is not averaged) -> mean 220.9 / 3, deviations
    # -19/30, -7/30, 26/30 -> squares (361 + 49 + 676) / 900 = 1086 / 900
    assert (kd["method"], kd["n"], kd["seeds"]) == ("kd", "3", "0 1 2")
    assert float(kd["top1_mean"]) == pytest.approx(220.9 / 3, abs=1e-4)
    assert float(kd["top1_std"]) == pytest.approx(math.sqrt(1086 / 900 / 2), abs=1e-4)
    assert float(kd["teacher_top1_mean"]) == 97.5
    assert kd["paper_top1"] == kd["delta_to_paper"] == ""

    text = (two_methods_three_seeds / "report.md").read_text()
    assert "| ce | 3 | 71.20 ± 1.08 | 97.50 | 0 1 2 |" in text
    assert "| kd | 3 | 73.63 ± 0.78 | 97.50 | 0 1 2 |" in text
    not_finished = text.split("## Not finished (not averaged)")[1]
    failed = "| 6_method=kd,seed=3 | failed | student.num_classes=7 but dataset digits has 10 classes \\|"
    assert failed in not_finished
    assert "| 7_method=kd,seed=4 | interrupted |  |" in not_finished
    assert "12.00" not in text and "![student top-1 per group](report.png)" in text
    out = capsys.readouterr().out
    assert "| kd | 3 | 73.63 ± 0.78 |" in out and f"report: {two_methods_three_seeds}/report.md" in out
    assert_png(two_methods_three_seeds / "report.png")
    assert "Repeated seeds" not in text


def test_a_seed_given_twice_is_counted_and_said(two_methods_three_seeds, tmp_path, capsys):
    # the same sweep folder copied (two sweeps of one command, reported together)
    make_run(tmp_path, "again/0_method=ce,seed=0", 70.0, run_config(CE_METHOD, 0))
    assert report.main([str(two_methods_three_seeds), str(tmp_path / "again"), "--out", str(tmp_path)]) == 0
    _, rows = read_csv(tmp_path / "report.csv")
    assert (rows[0]["method"], rows[0]["n"], rows[0]["seeds"]) == ("ce", "4", "0 0 1 2")
    text = (tmp_path / "report.md").read_text()
    assert (
        "**Repeated seeds** (the same config and seed in several folders, each counted): ce: seed 0 x2"
        in text
    )


def test_a_swept_key_becomes_a_column_and_splits_groups(tmp_path):
    for temperature, top1s in ((2.0, [60.0, 62.0]), (4.0, [65.0, 66.0]), (8.0, [64.0, 64.0])):
        method = json.loads(json.dumps(KD_METHOD))
        method["objectives"]["kd"]["temperature"] = temperature
        for seed, top1 in enumerate(top1s):
            overrides = [f"method.objectives.kd.temperature={temperature}", f"seed={seed}"]
            name = f"kd_T{temperature}_s{seed}"
            make_run(tmp_path, name, top1, run_config(method, seed), overrides=overrides)
    make_run(tmp_path, "ce_s0", 55.0, run_config(CE_METHOD, 0))
    assert report.main([str(tmp_path)]) == 0
    columns, rows = read_csv(tmp_path / "report.csv")
    assert columns[:3] == ["method", "method.objectives.kd.temperature", "n"]
    summary = [(r["method"], r["method.objectives.kd.temperature"], r["n"], r["top1_mean"]) for r in rows]
    assert summary == [
        ("ce", "", "1", "55.0"), ("kd", "2.0", "2", "61.0"),
        ("kd", "4.0", "2", "65.5"), ("kd", "8.0", "2", "64.0"),
    ]  # fmt: skip
    assert rows[0]["top1_std"] == "" and float(rows[1]["top1_std"]) == pytest.approx(math.sqrt(2.0), abs=1e-4)
    assert rows[3]["top1_std"] == "0.0"
    assert report.ablation_key(report.build_study(report.find_summaries([tmp_path]))) == columns[1]
    keys = ["student.arch", "teacher.arch", "method.objectives.kd.temperature"]
    assert report.short_key_names(keys) == ["student.arch", "teacher.arch", "temperature"]  # figure labels
    assert_png(tmp_path / "report.png")  # the ablation's line plot, ce as a level line


def test_every_key_a_study_sweeps_within_a_method_is_a_column(tmp_path):
    # An Optuna study: each trial draws its own temperature and KD weight; the temperature alone already
    # tells the trials apart, but the weight must show too.
    trials = ((1.5, 0.3, 80.0), (3.0, 1.2, 90.0), (6.5, 0.7, 85.0))
    for number, (temperature, weight, top1) in enumerate(trials):
        method = json.loads(json.dumps(KD_METHOD))
        method["objectives"]["kd"]["temperature"], method["weights"]["kd"] = temperature, weight
        overrides = [f"method.objectives.kd.temperature={temperature}", f"method.weights.kd={weight}"]
        make_run(tmp_path, f"{number}_trial", top1, run_config(method, 0), overrides=overrides)
    assert report.main([str(tmp_path)]) == 0
    columns, rows = read_csv(tmp_path / "report.csv")
    assert columns[:4] == ["method", "method.objectives.kd.temperature", "method.weights.kd", "n"]
    got = [(r["method.objectives.kd.temperature"], r["method.weights.kd"], r["top1_mean"]) for r in rows]
    assert got == [("1.5", "0.3", "80.0"), ("3.0", "1.2", "90.0"), ("6.5", "0.7", "85.0")]


def test_paper_number_only_where_the_paper_applies(tmp_path):
    recipe = run_config(KD_METHOD, 0, paper=PAPER)
    for seed, top1 in enumerate([70.0, 71.0]):
        config = {**recipe, "seed": seed}
        make_run(tmp_path, f"kd{seed}", top1, config, paper=PAPER, gap_to_paper=round(top1 - 70.66, 2))
    # a run that carries the paper but to which it does not apply (summary.json has no gap_to_paper)
    make_run(tmp_path, "ce0", 60.0, run_config(CE_METHOD, 0, paper=PAPER), paper=PAPER)
    assert report.main([str(tmp_path)]) == 0
    _, (ce, kd) = read_csv(tmp_path / "report.csv")
    assert (ce["paper_top1"], ce["delta_to_paper"]) == ("", "")
    assert float(kd["paper_top1"]) == 70.66
    assert float(kd["delta_to_paper"]) == pytest.approx(70.5 - 70.66, abs=1e-4)
    text = (tmp_path / "report.md").read_text()
    assert "| kd | 2 | 70.50 ± 0.71 | 97.50 | 70.66 | -0.16 | 0 1 |" in text
    assert "| ce | 1 | 60.00 | 97.50 |  |  | 0 |" in text
    assert_png(tmp_path / "report.png")  # bars with the paper marker


def test_runs_without_a_config_file_group_by_their_overrides(tmp_path):
    for name, overrides, top1 in (
        ("a", ["method=kd", "student=resnet8", "seed=0"], 50.0),
        ("b", ["method=kd", "student=resnet8", "seed=1"], 52.0),
        ("c", ["method=kd", "student=resnet20", "seed=0"], 58.0),
    ):
        make_run(tmp_path, name, top1, None, method="kd", overrides=overrides)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/summary.json").write_text('{"status": "comp')  # cut off mid-write
    study = report.build_study(report.find_summaries([tmp_path]))
    assert study.keys == ["student"]
    assert [(g.method, g.values, len(g.runs), g.top1_mean) for g in study.groups] == [
        ("kd", ("resnet20",), 1, 58.0), ("kd", ("resnet8",), 2, 51.0),
    ]  # fmt: skip
    (broken,) = study.unfinished
    assert broken.summary["status"] == "unreadable"


def test_out_defaults_to_the_one_folder_else_here(two_methods_three_seeds, tmp_path, monkeypatch, capsys):
    first, second = (two_methods_three_seeds / f"{seed}_method=ce,seed={seed}" for seed in (0, 1))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert report.main([str(first), str(second)]) == 0
    assert sorted(p.name for p in here.iterdir()) == sorted(report.REPORT_FILES)
    assert report.main([str(first / "summary.json"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere/report.csv").read_text().splitlines()[1].startswith("ce,1,70.0,,")


def test_a_missing_path_is_one_line_and_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'} does not exist\n"
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no summary.json under ")
    assert not list((tmp_path / "empty").iterdir())


def test_the_command_line(two_methods_three_seeds):
    command = [sys.executable, "-m", "kd_experiments.report"]
    result = subprocess.run([*command, str(two_methods_three_seeds)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| ce | 3 | 71.20 ± 1.08 |" in result.stdout and "Traceback" not in result.stderr
    missing = subprocess.run([*command, "no/such/sweep"], capture_output=True, text=True, cwd=REPO)
    assert (missing.returncode, missing.stderr) == (2, "error: no/such/sweep does not exist\n")


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_sweep_report_comes_before_failed_jobs_exits(two_methods_three_seeds, monkeypatch, capsys):
    # Hydra calls on_multirun_end in reverse order: the report must run before FailedJobs' sys.exit(2)
    config = hydra_config(f"hydra.sweep.dir={two_methods_three_seeds}")
    callbacks = list(config.hydra.callbacks)
    assert callbacks.index("sweep_report") > callbacks.index("failed_jobs")
    monkeypatch.setattr(sweep, "FAILED_JOBS", ["#6 (method=kd seed=3): student.num_classes=7 ..."])
    with pytest.raises(SystemExit) as exit_:
        Callbacks(config).on_multirun_end(config=config)
    assert exit_.value.code == 2
    assert all((two_methods_three_seeds / name).is_file() for name in report.REPORT_FILES)
    captured = capsys.readouterr()
    assert "| kd | 3 | 73.63 ± 0.78 |" in captured.out and "error: 1 sweep job(s) failed:" in captured.err


def test_a_sweep_report_that_cannot_be_made_is_one_warning(
    two_methods_three_seeds, tmp_path, monkeypatch, capsys
):
    # every job refused before it began (no summary.json): nothing to report, and nothing said about it
    (tmp_path / "refused/0_seed=-1").mkdir(parents=True)
    (tmp_path / "refused/0_seed=-1/failed.txt").write_text("#0 (seed=-1): seed must be ...")
    report.SweepReport().on_multirun_end(config=hydra_config(f"hydra.sweep.dir={tmp_path / 'refused'}"))
    assert capsys.readouterr() == ("", "")

    def cannot_write(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(report, "write_report", cannot_write)
    report.SweepReport().on_multirun_end(config=hydra_config(f"hydra.sweep.dir={two_methods_three_seeds}"))
    assert capsys.readouterr().err == "warning: no sweep report: No space left on device\n"


def test_job_folder_names_are_safe_and_short():
    assert job_name(3, "method=kd,seed=1") == "3_method=kd,seed=1"
    assert job_name(0, "") == "0"
    assert job_name(1, "teacher.checkpoint=/data/my teacher.pt,tags=[a, b]") == (
        "1_teacher.checkpoint=_data_my_teacher.pt,tags=_a,_b"
    )
    long = job_name(12, ",".join(f"key{i}=value{i}" for i in range(40)))
    assert long.startswith("12_key0=value0,") and len(long) <= len("12_") + 100
    config = hydra_config()
    subdir = OmegaConf.to_container(config.hydra.sweep)["subdir"]
    assert subdir == "${kd.job_name:${hydra.job.num},${hydra.job.override_dirname}}"
    excluded = config.hydra.job.config.override_dirname.exclude_keys
    assert {"paths.log_dir", "paths.teacher_cache_dir", "resume", "logger"} <= set(excluded)


def test_a_multirun_ends_with_its_report(workdir, monkeypatch, capsys):
    result = run_main_in_process(
        "-m", "method=ce,kd", "seed=0,1", "trainer.max_epochs=1", "logger=none",
        "++trainer.enable_model_summary=false", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = workdir.glob("outputs/multirun/*/*")
    assert sorted(p.parent.name for p in sweep_dir.glob("*/summary.json")) == [
        "0_method=ce,seed=0,trainer.max_epochs=1", "1_method=ce,seed=1,trainer.max_epochs=1",
        "2_method=kd,seed=0,trainer.max_epochs=1", "3_method=kd,seed=1,trainer.max_epochs=1",
    ]  # fmt: skip
    assert all((sweep_dir / name).is_file() for name in report.REPORT_FILES)
    _, rows = read_csv(sweep_dir / "report.csv")
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("ce", "2", "0 1"), ("kd", "2", "0 1")]
    assert "| method | n | top-1 (%) | teacher top-1 (%) | seeds |" in result.stdout
    assert f"| kd | 2 | {float(rows[1]['top1_mean']):.2f} ± " in result.stdout
    assert "warning" not in result.stderr
    assert_png(sweep_dir / "report.png")
