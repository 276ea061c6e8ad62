"""Result and cache files: written whole or not at all, with the umask's permissions."""

import os
import stat

import pytest
import torch

from kd_experiments.files import atomic_torch_save, atomic_write, atomic_write_json


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
