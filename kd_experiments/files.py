"""Writing result and cache files: whole or not at all, with the permissions the user's umask gives."""

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from kd_experiments.errors import UserError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def require_writable(path: Path, what: str) -> None:
    """Stop with one line unless `path` is a directory this process can write in, creating it (and its
    parents) when missing: a run learns it at start-up, not when it first saves a checkpoint or a trained
    teacher. A real file is created and removed, since permission bits say nothing about root, ACLs or a
    read-only mount. `what` is the config key that set the path, e.g. paths.teacher_cache_dir."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=path, prefix=".write-test-", suffix=".tmp")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:  # PermissionError, NotADirectoryError, FileExistsError, a read-only file system
        if isinstance(error, FileExistsError):  # mkdir(exist_ok=True) says so when a file has the name
            reason = "it is a file, not a directory"
        else:
            reason = error.strerror or str(error)
        raise UserError(
            f"{what}={path} is not writable ({reason}); point it at a writable directory"
        ) from None


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`: a crash or a full disk
    never leaves half a file under the real name. The file gets 0666 less the umask, as open() would give
    (mkstemp's own 0600 would lock out the rest of a group sharing a teacher cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(payload: dict, path: Path) -> None:
    atomic_write_text(json.dumps(payload, indent=2, default=str) + "\n", path)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def exclusive_lock(lock_path: Path, waiting_for: str, unwritable: str) -> Iterator[None]:
    """Hold an exclusive file lock at `lock_path` (creating its folder): processes that need the same file
    made once (a cached teacher, a download) queue here, and a waiting one says what it waits for. A folder
    that cannot be written is one UserError line: `unwritable`, then the OS's reason."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"Waiting for {waiting_for} ({lock_path})")
            lock.acquire()
    except OSError as error:
        raise UserError(unwritable.format(reason=error.strerror)) from None
    try:
        yield
    finally:
        lock.release()
