"""Result and cache files: written whole or not at all, with the umask's permissions, into directories
checked to be writable first."""

import os
import re
import stat

import pytest
import torch

from kd_experiments.errors import UserError
from kd_experiments.files import atomic_torch_save, atomic_write, atomic_write_json, require_writable


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_permissions_of_the_umask_not_mkstemps_0600(tmp_path, umask):
    umask(0o002)  # a group sharing a teacher cache
    atomic_write_json({"status": "completed"}, tmp_path / "summary.json")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "cache/teacher.pt")
    assert mode(tmp_path / "summary.json") == 0o664 and mode(tmp_path / "cache/teacher.pt") == 0o664
    umask(0o077)
    atomic_write_json({"status": "completed"}, tmp_path / "private.json")
    assert mode(tmp_path / "private.json") == 0o600
    assert torch.load(tmp_path / "cache/teacher.pt")["w"].tolist() == [1.0, 1.0]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json({"status": "completed"}, target)

    def half_then_fail(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"status": "comp')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == '{\n  "status": "completed"\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_missing_writable_directory_is_created_and_left_empty(tmp_path):
    cache = tmp_path / "outputs/deep/teachers"
    require_writable(cache, "paths.teacher_cache_dir")
    assert cache.is_dir() and list(cache.iterdir()) == []  # the probe file is gone
    require_writable(cache, "paths.teacher_cache_dir")  # and an existing one passes too


# The tests run as root, for whom chmod blocks nothing: a path through a regular file fails for everyone.
def test_a_directory_below_a_file_is_not_writable(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    cache = tmp_path / "afile/cache"
    expected = f"paths.teacher_cache_dir={cache} is not writable (Not a directory); point it at a writable"
    with pytest.raises(UserError, match=re.escape(expected)):
        require_writable(cache, "paths.teacher_cache_dir")
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_a_file_in_place_of_the_directory_is_not_writable(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(
        UserError, match=r"hydra.run.dir=.*/run is not writable \(it is a file, not a directory\)"
    ):
        require_writable(tmp_path / "run", "hydra.run.dir")


def test_a_directory_without_write_permission_is_not_writable(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("kd_experiments.files.tempfile.mkstemp", refuse)  # what a non-root user meets
    with pytest.raises(UserError, match=r"is not writable \(Permission denied\); point it at a writable"):
        require_writable(tmp_path, "paths.teacher_cache_dir")
