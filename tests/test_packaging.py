"""A built wheel (not the editable install) holds the configs and runs from a folder outside the repository,
both as `python -m kd_experiments` and as the `kd-experiments` console script."""

import json
import subprocess
import sys
import zipfile

from tests.conftest import QUICK, REPO, clean_env


def test_a_wheel_installed_outside_the_repository_runs_from_any_folder(tmp_path, project_dir):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("kd_experiments-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kd_experiments/conf/config.yaml" in names
    shipped = {n for n in names if n.startswith("kd_experiments/conf/") and n.endswith(".yaml")}
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "kd_experiments/conf").rglob("*.yaml")}
    assert shipped == in_repo  # every recipe, method, dataset ... config

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy first on the path: the editable install of this checkout is never imported.
    env = clean_env(elsewhere) | {"PYTHONPATH": str(target)}
    env.pop("PYTHONSAFEPATH", None)

    def run_elsewhere(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = run_elsewhere(sys.executable, "-c", "import kd_experiments; print(kd_experiments.__file__)")
    assert where.stdout.strip() == str(target / "kd_experiments" / "__init__.py")

    teachers = project_dir / "outputs" / "teachers"  # the shared default teacher: no retraining here
    script = run_elsewhere(
        str(target / "bin" / "kd-experiments"),
        *QUICK,
        "trainer.max_epochs=1",
        f"paths.teacher_cache_dir={teachers}",
    )
    assert script.returncode == 0, script.stderr[-3000:]
    (summary_path,) = elsewhere.glob("outputs/runs/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert (summary_path.parent / ".hydra" / "config.yaml").is_file()

    module_help = run_elsewhere(sys.executable, "-m", "kd_experiments", "--help")
    assert module_help.returncode == 0, module_help.stderr[-2000:]
    assert "digits_kd" in module_help.stdout  # the experiment group, listed from the installed configs
