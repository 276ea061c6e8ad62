"""Shared fixtures: run the CLI in a scratch directory, compose configs in-process, one cached teacher."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "kd_experiments" / "conf")

# Small, quiet runs: the defaults with fewer epochs and no experiment logger.
QUICK = ["trainer.max_epochs=2", "logger=none", "++trainer.enable_model_summary=false"]


def clean_env(home: Path) -> dict:
    """The environment of a user with no W&B credentials and no W&B mode set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(home)  # no ~/.netrc with W&B credentials
    env["WANDB_SILENT"] = "true"
    return env


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python -m kd_experiments ARGS` in `cwd` (so outputs/ lands there)."""
    return subprocess.run(
        [sys.executable, "-m", "kd_experiments", *args],
        cwd=cwd,
        env=env or clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main_in_process(*args: str, cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`python -m kd_experiments ARGS` in `cwd`, but in this process: the same entry point (`__main__.main`,
    Hydra's command-line parsing, the one-line error handler) without the seconds of a new interpreter.
    Returns what `run_cli` does: the exit code and the captured stdout / stderr."""
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(cwd))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(REPO / "kd_experiments/__main__.py"), *args])
    capsys.readouterr()  # drop what earlier steps printed
    try:
        runpy.run_module("kd_experiments", run_name="__main__")  # what `python -m` does
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out, err)


def refusal_line(*args: str, cwd: Path, monkeypatch, capsys) -> str:
    """The one line a refused run prints (`run_main_in_process`), after checking it was a refusal: exit
    code 2 and no traceback."""
    result = run_main_in_process(*args, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def run_summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("outputs/runs/*/*/summary.json"))]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def project_dir(tmp_path_factory) -> Path:
    """A scratch working directory whose outputs/teachers/ holds the default teacher, trained once by a
    first default run (so every later test reuses the cache)."""
    root = tmp_path_factory.mktemp("project")
    result = run_cli(*QUICK, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((root / "outputs/teachers").glob("convnet_wide-digits-*.pt"))) == 1
    return root


@pytest.fixture
def workdir(project_dir, tmp_path) -> Path:
    """A fresh working directory that shares the session's cached teacher (symlinked outputs/teachers)."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs/teachers").symlink_to(project_dir / "outputs/teachers")
    return tmp_path


@pytest.fixture
def cachedir(workdir) -> str:
    """A teacher cache of the test's own (the override that selects it), holding a copy of the session's
    trained teacher: tests running side by side must not read each other's stored outputs or statistics."""
    private = workdir / "teachers"
    private.mkdir()
    for path in (workdir / "outputs/teachers").glob("convnet_wide-digits-*"):
        shutil.copy(path, private / path.name)
    return f"paths.teacher_cache_dir={private}"


@pytest.fixture(scope="session")
def reference_shapes() -> dict:
    """mdistiller's CIFAR-100 state-dict shapes (shared/reference), or skip where the file is absent."""
    from tests.zoo_helpers import load_reference_shapes

    shapes = load_reference_shapes()
    if shapes is None:
        pytest.skip("cifar_zoo_state_dicts.json not found (set KD_CIFAR_ZOO_REFERENCE)")
    return shapes


@pytest.fixture(scope="session")
def sample_batch():
    import torch

    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def recipe_task(name: str) -> str:
    """The task of recipe `name` (conf/experiment/<name>.yaml) without composing it: its data set's `task`
    (detection, multilabel; classification when the data set YAML names none)."""
    import re

    text = (REPO / "conf/experiment" / f"{name}.yaml").read_text()
    dataset = re.search(r"override /dataset: (\S+)", text)
    if dataset is None:
        return "classification"
    task = re.search(r"^task: (\w+)", (REPO / "conf/dataset" / f"{dataset.group(1)}.yaml").read_text(), re.M)
    return task.group(1) if task else "classification"
