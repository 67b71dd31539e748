"""Atomic file and folder writes: a reader (or a resumed run) never sees half a file.

Each writer puts the content in a temporary sibling, flushes it to disk, then ``os.replace``s it
over the target, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .ownership import temp_prefix


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
def atomic_path(target, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish_file(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def atomic_write_json(target, obj) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(target, arrays: dict, metadata: Optional[dict] = None) -> None:
    import mlx.core as mx

    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    with atomic_path(target, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


@contextlib.contextmanager
def atomic_dir(target, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``.

    On failure the temporary folder is removed and ``target`` is left as it was. With
    ``overwrite`` an existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable_dir(path, what: str = "output folder") -> Path:
    """Check that ``path`` is (or can become) a writable folder; raise a clear error if not."""
    from .errors import MlxLoraError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MlxLoraError(f"{what} {path} is a file, not a folder")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise MlxLoraError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MlxLoraError(f"{what} {path} is not writable ({probe} denies write access)")
    return path
