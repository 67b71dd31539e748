"""Atomic file and folder writes: a reader (or a resumed run) never sees half a file.

Each writer puts the content in a temporary sibling named by :func:`temp_prefix` (so a later run
can remove what a killed process left, see :func:`clean_stale_temps`), flushes it to disk, gives it
the permissions of the file it replaces (or, for a new file, those the umask gives), then
``os.replace``s it over the target, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx

from mlx_lora.plumbing.errors import ExportError, MlxLoraError

_TEMP = re.compile(r"^\..+\.mlx-lora-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.")


class OutputAppeared(ExportError):
    """Another process created the output folder while we were writing ours."""


# ---------------------------------------------------------------------------------------------
# temporary names that say who made them


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(name: str) -> str:
    """Prefix for a temporary sibling of ``name``: hidden, and tagged with this host and process so
    a later run can tell a leftover of a dead process (see :func:`clean_stale_temps`)."""
    return f".{name}.mlx-lora-{_host_tag()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is a temporary name made by :func:`temp_prefix` on this host by a process
    that is gone."""
    m = _TEMP.match(name)
    return bool(m) and m["host"] == _host_tag() and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))


def is_own_or_stale_temp(name: str) -> bool:
    """Whether ``name`` is a temporary name made by :func:`temp_prefix` on this host by this
    process or by one that is gone."""
    m = _TEMP.match(name)
    return bool(m) and m["host"] == _host_tag() and (int(m["pid"]) == os.getpid() or not _alive(int(m["pid"])))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` has the form of a name made by :func:`temp_prefix` (any host or process)."""
    return bool(_TEMP.match(name))


def clean_stale_temps(folder) -> list[Path]:
    """Delete the temporary files and folders that processes of this host, now gone, left in
    ``folder`` (a SIGKILLed export leaves a half-written file of hundreds of MB). Only names made by
    :func:`temp_prefix` are touched; returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not is_stale_temp(p.name):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass  # best effort: a leftover we cannot remove harms nothing
    return removed


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
    """Move the finished temporary file ``tmp`` over ``target``: with the permissions of the file
    it replaces (a private 0600 file stays private), or for a new file those the umask gives
    (mkstemp makes it private), flushed to disk, in one atomic rename."""
    try:
        old = os.stat(target)  # a symbolic link is followed: the caller chose to replace what it names
        mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
    except OSError:
        mode = None
    os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
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

    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    with atomic_path(target, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(
    target,
    overwrite: bool = False,
    *,
    suffix: str = ".tmp",
    set_aside: bool = True,
    before_swap: Optional[Callable[[Path], None]] = None,
    dispose: Optional[Callable[[Path], None]] = None,
) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``.

    On failure the temporary folder is removed and ``target`` is left as it was. An existing
    ``target`` other than an empty folder is an error unless ``overwrite``; then it is replaced
    only after the new one is complete. A ``target`` that another process creates while we write
    raises :class:`OutputAppeared` (without ``overwrite``) and is left as that process wrote it.

    ``suffix`` ends the temporary folder's name. The folder being replaced is first renamed to
    ``.NAME.old`` when ``set_aside`` (a crash between the two renames then leaves it under a name a
    caller can recover, see :mod:`mlx_lora.training.checkpoints`), else into a temporary folder that
    :func:`clean_stale_temps` removes after a crash.

    ``before_swap(target)`` runs just before an existing folder is replaced (it may raise to keep
    it: the new folder is then removed); ``dispose(old)`` deletes the replaced folder once it is set
    aside (default: all of it). :mod:`mlx_lora.plumbing.ownership` passes both so that only what the tool
    wrote is deleted.
    """
    target = Path(target)
    if target.exists() and not overwrite and not _is_empty_dir(target):
        raise FileExistsError(f"{target} already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=suffix, dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
        yield tmp
        _move_into_place(tmp, target, overwrite, set_aside, before_swap, dispose)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(
    tmp: Path,
    target: Path,
    overwrite: bool,
    set_aside: bool,
    before_swap: Optional[Callable[[Path], None]] = None,
    dispose: Optional[Callable[[Path], None]] = None,
) -> None:
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
    if before_swap is not None:
        before_swap(target)
    drop = dispose or (lambda p: shutil.rmtree(p, ignore_errors=True))
    # Swap: old aside, new in place, then drop the old; a crash in between leaves both complete
    # folders on disk, never a mix.
    if set_aside:
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            drop(old)
            if old.exists():
                raise FileExistsError(f"{old} is in the way of replacing {target}")
        os.replace(target, old)
        os.replace(tmp, target)
        drop(old)
    else:
        old = target.with_name(temp_prefix(target.name) + os.urandom(4).hex() + ".old")
        os.replace(target, old)
        os.replace(tmp, target)
        drop(old)


def ensure_writable_dir(path, what: str = "output folder") -> Path:
    """Check that ``path`` is (or can become) a writable folder; raise a clear error if not."""

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MlxLoraError(f"{what} {path} is a file, not a folder")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise MlxLoraError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MlxLoraError(f"{what} {path} is not writable ({probe} denies write access)")
    return path
