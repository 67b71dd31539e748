"""Atomic file and folder writes: a reader (or a resumed run) never sees half a file.

Each writer puts the content in a temporary sibling named by :func:`temp_prefix`
(so a later run can remove what a killed process left), flushes it to disk, gives it the
permissions the umask gives a new file, then ``os.replace``s it over the target, which POSIX makes
atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from mlx_lora.plumbing.errors import ExportError


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(name: str) -> str:
    """Prefix for a temporary sibling of ``name``: hidden, and tagged with this host and process so
    a later run can tell a leftover of a dead process (see :func:`mlx_lora.plumbing.ownership.clean_stale_temps`)."""
    return f".{name}.mlx-lora-{_host_tag()}-{os.getpid()}."


class OutputAppeared(ExportError):
    """Another process created the output folder while we were writing ours."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temp_file(target, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield an empty temporary file next to ``target`` (same disk, so it can be renamed over it);
    it is removed on the way out unless something moved it away."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(target, suffix: str = "", *, temp_suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``.

    ``suffix`` ends the temporary name for writers that insist on an extension."""
    with temp_file(target, temp_suffix + suffix) as tmp:
        yield tmp
        publish_file(tmp, target)


def publish_file(tmp, target) -> None:
    """Move the finished temporary file ``tmp`` over ``target``: with the permissions the umask
    gives a new file (mkstemp makes it private), flushed to disk, in one atomic rename."""
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(Path(target).parent)


def atomic_write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(target, obj, *, ensure_ascii: bool = True) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=ensure_ascii) + "\n")


def atomic_save_safetensors(target, arrays: dict, metadata: Optional[dict] = None) -> None:
    import mlx.core as mx

    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    with atomic_path(target, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(target, overwrite: bool = False, *, suffix: str = ".tmp", set_aside: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``.

    On failure the temporary folder is removed and ``target`` is left as it was. An existing
    ``target`` other than an empty folder is an error unless ``overwrite``; then it is replaced
    only after the new one is complete. A ``target`` that another process creates while we write
    raises :class:`OutputAppeared` (without ``overwrite``) and is left as that process wrote it.

    ``suffix`` ends the temporary folder's name. The folder being replaced is first renamed to
    ``.NAME.old`` when ``set_aside`` (a crash between the two renames then leaves it under a name a
    caller can recover, see :mod:`mlx_lora.training.checkpoints`), else into a temporary folder that
    :func:`~mlx_lora.plumbing.ownership.clean_stale_temps` removes after a crash.
    """
    target = Path(target)
    if target.exists() and not overwrite and not _is_empty_dir(target):
        raise FileExistsError(f"{target} already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=suffix, dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
        yield tmp
        _move_into_place(tmp, target, overwrite, set_aside)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path, overwrite: bool, set_aside: bool) -> None:
    if _is_empty_dir(target):
        target.rmdir()  # os.replace cannot replace a folder on every OS, even an empty one
    if not target.exists():
        try:
            os.replace(tmp, target)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if not overwrite:
        raise OutputAppeared(f"output folder {target} appeared while it was being written (another conversion?)")
    # Swap: old aside, new in place, then drop the old; a crash in between leaves both complete
    # folders on disk, never a mix.
    if set_aside:
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name), suffix=".old"))
        os.replace(target, trash / "old")
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)


def ensure_writable_dir(path, what: str = "output folder") -> Path:
    """Check that ``path`` is (or can become) a writable folder; raise a clear error if not."""
    from mlx_lora.plumbing.errors import MlxLoraError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MlxLoraError(f"{what} {path} is a file, not a folder")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise MlxLoraError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MlxLoraError(f"{what} {path} is not writable ({probe} denies write access)")
    return path
