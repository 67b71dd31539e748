"""Output ownership: the tool replaces only what it can prove it wrote.

Every folder a command creates (a run folder, a fused or converted model, a PEFT export, the
quickstart's output, an Ollama or LM Studio package) carries a marker file, :data:`MARKER`, that
names the kind of folder and the command that wrote it, and records every entry the tool wrote, at
every depth: a folder as a folder, a file with its size and the SHA-256 of its bytes. The record is
kept up to date as the tool writes more into its own folder (each checkpoint, the metrics, the loss
plot). The marker is bound to its folder: it also records the folder's inode number, so a marker
copied into another folder authorises nothing there.

``--overwrite`` may then replace:

- an empty folder, or
- a folder whose marker is of a compatible kind (a fused model may replace a converted one, never
  a run folder), is the folder's own, and whose every entry, at every depth, is one the marker
  records with the same kind, size and content hash (besides the marker itself, a run folder's
  ``.lock`` and the temporaries of dead mlx-lora processes).

Anything else is refused, before anything is deleted, with one line naming the folder and the first
entry the tool cannot prove it wrote: a file it did not write, a file changed since, a symbolic
link, an entry a marker lists outside its folder. The current folder, any folder above it, the home
folder and ``/`` are never replaced. An ``--out`` that is a symbolic link is followed: the folder it
points to is checked and replaced, and the link keeps pointing at the result.

Replacing means building the new folder beside the old one (a temporary name in the same parent),
checking the old one again, and swapping at the end (:func:`building`, :func:`swap_in`): a failure
at any point before the swap leaves the old folder as it was. The old folder is then deleted entry
by entry, only where an entry still matches its record.

Single-file outputs (a ``.gguf``) have no marker; ``--overwrite`` replaces an existing file only
when it is a GGUF file, the only kind of file those commands write, or, in a folder the tool marked,
when the marker records it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Optional

from mlx_lora import __version__
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.io import (  # noqa: F401
    _umask,
    atomic_dir,
    atomic_write_json,
    clean_stale_temps,
    is_own_or_stale_temp,
    is_stale_temp,
    is_temp_name,
    temp_prefix,
)

logger = logging.getLogger(__name__)

MARKER = ".mlx-lora.json"
"""Name of the marker file in every folder the tool creates."""

LOCK = ".lock"
"""A run folder's lock file (see :mod:`mlx_lora.training.checkpoints`)."""

FORMAT = 2
"""Marker format: 2 records every entry with its size and content hash."""

# kind -> the kinds a folder of that kind may replace
COMPATIBLE = {
    "run": {"run"},
    "model": {"model"},  # `fuse` and `convert` both write model folders
    "peft": {"peft"},
    "mlx-lm": {"mlx-lm"},
    "quickstart": {"quickstart"},
    "ollama": {"ollama"},
    "lmstudio": {"lmstudio"},
}

_LOCK_MAX_BYTES = 64  # a lock file holds a process id


class OwnershipError(MlxLoraError):
    """An output location the tool will not write to or replace."""


# ---------------------------------------------------------------------------------------------
# records


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _record_of(path: Path) -> Optional[dict]:
    """The record of one entry as it is now (None for a symbolic link or a special file)."""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        return {"dir": True}
    if stat.S_ISREG(st.st_mode):
        return {"size": st.st_size, "sha256": file_digest(path)}
    return None


def _skipped(rel: str, path: Path) -> bool:
    """Entries that are never recorded: the marker and the lock at the top, and temporaries (a
    write in progress, or what a killed process left)."""
    return ("/" not in rel and rel in (MARKER, LOCK)) or is_temp_name(path.name)


def _scan(root: Path, rel: str = "") -> dict[str, dict]:
    """Records of ``root/rel`` and everything below it, keyed by path relative to ``root``."""
    out: dict[str, dict] = {}
    path = root / rel if rel else root
    if rel:
        rec = _record_of(path)
        if rec is None:
            return out  # the tool writes no links or special files: left unrecorded, so never owned
        out[rel] = rec
        if "dir" not in rec:
            return out
    for child in sorted(path.iterdir()):
        crel = f"{rel}/{child.name}" if rel else child.name
        if _skipped(crel, child):
            continue
        out.update(_scan(root, crel))
    return out


def _valid_key(key) -> bool:
    if not isinstance(key, str) or not key or "\\" in key or "\0" in key:
        return False
    p = PurePosixPath(key)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in key.split("/"))


def _folder_id(folder: Path) -> int:
    return os.stat(folder).st_ino


def _save(folder: Path, marker: dict) -> None:
    entries = marker["entries"]
    marker["files"] = sorted({k.split("/")[0] for k in entries})
    atomic_write_json(folder / MARKER, marker)


def write_marker(folder, kind: str, command: str, files: Optional[Iterable[str]] = None) -> None:
    """Mark ``folder`` as written by ``command`` as a folder of ``kind`` and record what it holds:
    ``files`` (paths relative to the folder; a folder is recorded with all it holds), or by default
    everything the folder holds now (for a folder the command built itself, under a temporary
    name no one else writes to)."""

    folder = Path(folder)
    if kind not in COMPATIBLE:
        raise ValueError(f"unknown output kind {kind!r}")
    if files is None:
        entries = _scan(folder)
    else:
        entries = {}
        for rel in files:
            if (folder / rel).exists() or (folder / rel).is_symlink():
                entries.update(_scan(folder, str(PurePosixPath(rel))))
    _save(
        folder,
        {
            "written_by": "mlx-lora",
            "version": __version__,
            "format": FORMAT,
            "kind": kind,
            "command": command,
            "folder": _folder_id(folder),
            "entries": entries,
        },
    )


def read_marker(folder) -> Optional[dict]:
    """The marker of ``folder``, or None when it has none (or an unreadable one). Its entries are
    not checked here: see :func:`problems`."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "mlx-lora" or data.get("kind") not in COMPATIBLE:
        return None
    return data


def _own_marker(folder: Path) -> Optional[dict]:
    """The marker of ``folder`` when it is a current one, bound to this folder (else None)."""
    marker = read_marker(folder)
    if marker is None or marker.get("format") != FORMAT or not isinstance(marker.get("entries"), dict):
        return None
    try:
        if marker.get("folder") != _folder_id(folder):
            return None
    except OSError:
        return None
    return marker


def record(folder, *paths: str) -> None:
    """Record (again) what the tool just wrote at ``paths`` (relative to ``folder``, the folder that
    holds the marker): a file with its size and hash, a folder with all it holds; a path that no
    longer exists is dropped with everything below it. Does nothing in a folder without a current
    marker of its own (so nothing is ever recorded in a folder the tool does not own)."""
    folder = Path(folder)
    marker = _own_marker(folder)
    if marker is None:
        return
    for rel in paths:
        rel = str(PurePosixPath(rel))
        exists = (folder / rel).exists() or (folder / rel).is_symlink()
        _put(folder, marker["entries"], rel, _scan(folder, rel) if exists else {})
    _save(folder, marker)


def record_before_move(folder, source, rel: str, *, beside: bool = False) -> None:
    """Record the finished ``source`` (inside ``folder``) as what the tool is about to rename to
    ``rel``, before the rename: a process killed in between leaves a record of a path that does not
    exist yet (nothing to prove), never a folder of its own that its marker does not know.

    ``beside``: ``source`` will replace the recorded folder ``rel``; each of its entries is recorded
    beside what is recorded there now, so that whichever of the two is at ``rel`` when the process is
    killed (the old one, or the new one the moment it is renamed into place) is proven.
    :func:`record` of ``rel`` after the replacement keeps the new records alone."""
    folder = Path(folder)
    marker = _own_marker(folder)
    if marker is None:
        return
    rel = str(PurePosixPath(rel))
    src = str(PurePosixPath(Path(source).relative_to(folder)))
    scanned = {rel + k[len(src) :]: v for k, v in _scan(folder, src).items()}
    entries = marker["entries"]
    if beside:
        for key, new in scanned.items():
            entries[key] = _either(entries.get(key), new)
    else:
        _put(folder, entries, rel, scanned)
    _save(folder, marker)


def _either(old: Optional[dict], new: dict) -> dict:
    """One record that proves either ``new`` or ``old`` (the ``also`` alternatives of a file)."""
    if old is None or old == new:
        return new
    both = [new, {k: v for k, v in old.items() if k != "also"}]
    files = [r for r in both if not r.get("dir")]
    if len(files) < 2:  # a folder (and perhaps a file) at this path
        return {"dir": True, **({"also": files} if files else {})}
    return {**files[0], "also": files[1:]}


def _put(folder: Path, entries: dict, rel: str, scanned: dict) -> None:
    """Replace the records of ``rel`` and all below it by ``scanned``, adding the folders on the way."""
    for k in [k for k in entries if k == rel or k.startswith(rel + "/")]:
        del entries[k]
    entries.update(scanned)
    parent = str(PurePosixPath(rel).parent)
    while parent not in (".", "") and parent not in entries and (folder / parent).is_dir():
        entries[parent] = {"dir": True}  # the folders the tool created on the way
        parent = str(PurePosixPath(parent).parent)


def forget(folder, *paths: str) -> None:
    """Drop the records of ``paths`` (and all below them): the tool deleted them."""
    folder = Path(folder)
    marker = _own_marker(folder)
    if marker is None:
        return
    entries = marker["entries"]
    for rel in paths:
        rel = str(PurePosixPath(rel))
        for k in [k for k in entries if k == rel or k.startswith(rel + "/")]:
            del entries[k]
    _save(folder, marker)


# ---------------------------------------------------------------------------------------------
# proving ownership


def _why_not(path: Path, rec: Optional[dict]) -> Optional[str]:
    """Why the entry at ``path`` is not the one ``rec`` records (None when it is)."""
    try:
        st = path.lstat()
    except OSError:
        return None  # gone: nothing to delete
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link, which mlx-lora never writes"
    if rec is None:
        return "which mlx-lora did not write"
    if stat.S_ISDIR(st.st_mode):
        return None if rec.get("dir") is True else "a folder where mlx-lora wrote a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    # A file being replaced has two records for a moment (see record_before_move): either proves it.
    files = [r for r in [rec, *(rec.get("also") or [])] if isinstance(r, dict) and not r.get("dir")]
    if not files:
        return "a file where mlx-lora wrote a folder"
    sized = [r for r in files if r.get("size") == st.st_size]
    if not sized:
        return "which changed since mlx-lora wrote it"
    try:
        digest = file_digest(path)
    except OSError as e:
        return f"which cannot be read ({e.strerror or e})"
    return None if any(r.get("sha256") == digest for r in sized) else "which changed since mlx-lora wrote it"


def _walk_problems(path: Path, entries: dict, prefix: str, shown: str, out: list, limit: int) -> None:
    try:
        children = sorted(path.iterdir())
    except OSError as e:
        out.append((shown or ".", f"which cannot be read ({e.strerror or e})"))
        return
    for child in children:
        if len(out) >= limit:
            return
        rel = f"{prefix}/{child.name}" if prefix else child.name
        name = f"{shown}/{child.name}" if shown else child.name
        if not prefix and child.name == MARKER:
            continue
        if (
            not prefix
            and child.name == LOCK
            and child.is_file()
            and not child.is_symlink()
            and child.stat().st_size <= _LOCK_MAX_BYTES
        ):
            continue
        if is_own_or_stale_temp(child.name):
            continue  # a temporary this process, or a dead mlx-lora process, left half-written
        why = _why_not(child, entries.get(rel))
        if why is not None and entries.get(rel) is None and child.is_dir() and not child.is_symlink():
            name = _first_inside(child, name)  # name the user's file itself, however deep
        if why is not None:
            out.append((name, why))
        elif child.is_dir() and not child.is_symlink():
            _walk_problems(child, entries, rel, name, out, limit)


def _first_inside(folder: Path, shown: str) -> str:
    """The first file (sorted, depth first) inside an unrecorded folder, as ``shown/...``; the
    folder itself when it holds none."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return shown
    for child in children:
        if child.is_dir() and not child.is_symlink():
            inner = _first_inside(child, f"{shown}/{child.name}")
            if inner != f"{shown}/{child.name}":
                return inner
        else:
            return f"{shown}/{child.name}"
    return shown


def marker_problem(folder) -> Optional[str]:
    """Why the marker of ``folder`` cannot prove anything (None when it can)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return "it has no mlx-lora marker"
    if marker.get("format") != FORMAT or not isinstance(marker.get("entries"), dict):
        return "its marker comes from an older mlx-lora that did not record what it wrote"
    bad = next((k for k in marker["entries"] if not _valid_key(k) or not isinstance(marker["entries"][k], dict)), None)
    if bad is not None:
        return f"its marker lists {bad!r}, which is not a path inside the folder"
    if marker.get("folder") != _folder_id(folder):
        return f"its marker {MARKER!r} was written for another folder (a copy?)"
    return None


def problems(folder, limit: int = 1, *, under: str = "", root=None) -> list[tuple[str, str]]:
    """Entries of ``folder`` the tool cannot prove it wrote, as (path, why), sorted, at most
    ``limit``. ``root`` (default ``folder``) is the folder whose marker records them and ``under``
    the path of ``folder`` inside it (a checkpoint being replaced, or a folder renamed aside)."""
    folder = Path(folder)
    root = folder if root is None else Path(root)
    why = marker_problem(root)
    if why is not None:
        return [(MARKER, why)]
    out: list = []
    _walk_problems(folder, read_marker(root)["entries"], under, "", out, limit)
    return out


def owned_entries_only(folder, *, what: str, under: str = "", root=None) -> None:
    """Raise :class:`OwnershipError` naming the first entry of ``folder`` the tool cannot prove it
    wrote (see :func:`problems`)."""
    found = problems(folder, limit=2, under=under, root=root)
    if found:
        name, why = found[0]
        if name == MARKER:
            first = next((p.name for p in sorted(Path(folder).iterdir()) if p.name not in (MARKER, LOCK)), None)
            holds = f", so it proves nothing about {first!r}" if first else ""
            raise OwnershipError(
                f"{what} {folder}: {why}{holds}; mlx-lora replaces only folders it can prove it "
                f"wrote. Choose another folder"
            )
        raise OwnershipError(
            f"{what} {folder} holds {name!r}, {why}; mlx-lora deletes only what it can prove "
            f"it wrote: move it out or choose another folder"
        )


def delete_owned(folder, *, under: str = "", root=None, entries: Optional[dict] = None) -> list[str]:
    """Delete, deepest first, the entries of ``folder`` that still match their records (``entries``,
    default those of ``root``'s marker; ``under``: the path of ``folder`` inside ``root``), then
    ``folder`` itself when nothing else is left. Returns what was kept (not proven the tool's)."""
    folder = Path(folder)
    if entries is None:
        marker = read_marker(folder if root is None else root)
        entries = marker.get("entries", {}) if marker and isinstance(marker.get("entries"), dict) else {}
    kept: list[str] = []

    def sweep(path: Path, prefix: str, shown: str) -> bool:  # True when path is now empty
        empty = True
        for child in sorted(path.iterdir()):
            rel = f"{prefix}/{child.name}" if prefix else child.name
            name = f"{shown}/{child.name}" if shown else child.name
            if not prefix and child.name in (MARKER, LOCK) and child.is_file() and not child.is_symlink():
                continue  # the marker goes last, so a crash part-way leaves a folder still marked
            if is_own_or_stale_temp(child.name):
                _remove(child)
                continue
            if _why_not(child, entries.get(rel)) is not None:
                kept.append(name)
                empty = False
            elif child.is_dir() and not child.is_symlink():
                if sweep(child, rel, name):
                    child.rmdir()
                else:
                    empty = False
            else:
                child.unlink()
        return empty

    if sweep(folder, under, ""):
        for name in (LOCK, MARKER) if not under else ():
            p = folder / name
            if p.is_file() and not p.is_symlink():
                p.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    return kept


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# checking a target before any work


def _protected(real: Path) -> Optional[str]:
    """Why ``real`` (a resolved path) may never be replaced, or None."""
    if real == Path(real.anchor):
        return "the filesystem root"
    try:
        if real == Path.home().resolve():
            return "your home folder"
    except RuntimeError:  # no home folder
        pass
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "the current folder"
    if real in cwd.parents:
        return "a folder that holds the current folder"
    return None


def follow_link(path, what: str) -> Path:
    """``path`` with ``~`` expanded and a final symbolic link followed (a dangling one is an error)."""
    path = Path(path).expanduser()
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            raise OwnershipError(
                f"{what} {path} is a symbolic link to {target}, which does not exist; create it or give another path"
            )
        return target
    return path


def check_output_dir(
    path,
    kind: str,
    *,
    overwrite: bool,
    what: str = "output folder",
    exists_hint: str = "pass --overwrite to replace it",
) -> Path:
    """Check, before any work, that a command that writes a folder of ``kind`` may write ``path``;
    returns the path to write (a symbolic link followed).

    Allowed: a new path, an empty folder, or (with ``overwrite``) a folder of a compatible kind
    whose every entry the tool can prove it wrote (see the module's docstring). Refused with
    :class:`OwnershipError`: a file, a folder holding anything else, and (always) the current
    folder, a folder above it, the home folder and ``/``. Leftovers of dead processes in the parent
    are removed.
    """
    out = follow_link(path, what)
    why = _protected(out.resolve())
    if why is not None:
        raise OwnershipError(
            f"{what} {out} is {why}; mlx-lora never writes its output over it. "
            f"Give a new folder (e.g. {Path(out.resolve().name or 'out') / 'mlx-lora-out'})"
        )
    if out.exists() and not out.is_dir():
        raise OwnershipError(f"{what} {out} is a file, not a folder")
    if out.parent.is_dir():
        clean_stale_temps(out.parent)
    if not out.is_dir() or not any(out.iterdir()):
        return out
    marker = read_marker(out)
    if marker is None or marker["kind"] not in COMPATIBLE[kind]:
        first = next(iter(sorted(p.name for p in out.iterdir())), "?")
        label = "" if marker is None else f" (it holds a {marker['kind']} folder, not a {kind} folder)"
        raise OwnershipError(
            f"{what} {out} is not empty and was not written by this kind of mlx-lora command"
            f"{label}: it holds {first!r}; mlx-lora replaces only folders it wrote. "
            f"Choose another folder"
        )
    if not overwrite:
        raise OwnershipError(f"{what} {out} already exists; {exists_hint}")
    owned_entries_only(out, what=what)
    return out


def check_output_file(path, *, overwrite: bool, what: str = "output file", magic: bytes = b"GGUF") -> Path:
    """Check a single-file output before any work: a new path, or (with ``overwrite``) an existing
    file that starts with ``magic`` (the kind of file the command writes) and, in a folder the tool
    marked, that its marker records unchanged. Returns the path to write (a symbolic link
    followed); leftovers of dead processes in its folder are removed."""
    out = follow_link(path, what)
    if out.is_dir():
        raise OwnershipError(f"{what} {out} is a folder; give a file name")
    if out.parent.is_dir():
        clean_stale_temps(out.parent)
    if out.exists():
        if not overwrite:
            raise OwnershipError(f"{what} {out} already exists (pass --overwrite to replace it)")
        if not out.is_file():
            raise OwnershipError(f"{what} {out} is not a regular file; choose another name")
        try:
            with open(out, "rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise OwnershipError(f"{what} {out} cannot be read ({e.strerror or e})") from None
        if head != magic:
            raise OwnershipError(
                f"{what} {out} exists and is not a {magic.decode(errors='replace')} file; "
                f"--overwrite replaces only files of the kind this command writes. "
                f"Choose another name"
            )
        marker = _own_marker(out.parent)
        if marker is not None and _why_not(out, marker["entries"].get(out.name)) is not None:
            raise OwnershipError(
                f"{what} {out} is not the file mlx-lora wrote there (it changed since, or "
                f"another program wrote it); choose another name"
            )
    return out


# ---------------------------------------------------------------------------------------------
# building beside and swapping


def new_beside(target, suffix: str = ".partial") -> Path:
    """An empty folder with a temporary name next to ``target`` (same disk, so it can be renamed
    over it), with the permissions the umask gives a new folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=suffix, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _check_before_swap(what: str, under: str = "", root=None):
    def check(target: Path) -> None:
        owned_entries_only(target, what=what, under=under, root=root)

    return check


def _dispose(entries_of, what: str):
    """A ``dispose`` for :func:`mlx_lora.plumbing.io.atomic_dir`: delete the old folder, set aside, entry by
    entry where it still matches its records (``entries_of()``, read before the swap); anything else
    stays, under a visible name that is reported."""

    def dispose(old: Path) -> None:
        kept = delete_owned(old, entries=entries_of[0]) if old.exists() else []
        if kept and old.exists():
            base = old.parent / f"{entries_of[1]}.kept"
            keep = base
            n = 1
            while keep.exists() or keep.is_symlink():
                n += 1
                keep = base.with_name(f"{base.name}-{n}")
            os.replace(old, keep)
            logger.warning(
                "%s: %r appeared while it was being replaced and was not deleted; it is now in %s", what, kept[0], keep
            )

    return dispose


@contextlib.contextmanager
def building(
    target, kind: str, command: str, *, what: str = "output folder", suffix: str = ".partial"
) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target`` (checked before by
    :func:`check_output_dir`); on success it is marked as ``kind`` (every entry recorded) and
    takes the place of ``target``. An existing ``target`` is checked again just before the swap and
    then deleted only where it matches its records. On any failure before the swap, the temporary
    folder is removed and ``target`` is left as it was."""
    target = Path(target)
    state: list = [None, target.name]

    def before(t: Path) -> None:
        _check_before_swap(what)(t)
        state[0] = dict(read_marker(t)["entries"])

    with atomic_dir(
        target, overwrite=True, suffix=suffix, set_aside=False, before_swap=before, dispose=_dispose(state, what)
    ) as tmp:
        yield tmp
        write_marker(tmp, kind, command)


def swap_in(new, target, *, what: str = "output folder") -> None:
    """Put the finished folder ``new`` (built by :func:`new_beside`, marker included) in the place
    of ``target``: an absent or empty ``target`` is simply taken; an existing one is checked again
    (raising :class:`OwnershipError` and leaving both as they are when it holds anything the tool
    cannot prove it wrote), set aside, and deleted only where it matches its records."""
    new, target = Path(new), Path(target)
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    owned_entries_only(target, what=what)
    state = [dict(read_marker(target)["entries"]), target.name]
    old = target.with_name(temp_prefix(target.name) + os.urandom(4).hex() + ".old")
    os.replace(target, old)
    os.replace(new, target)
    _dispose(state, what)(old)


def subfolder_problems(root, rel: str, names: Iterable[str]) -> list[tuple[str, str]]:
    """What in ``root/rel`` (a checkpoint inside a run folder) keeps the tool from replacing or
    deleting it, as (path inside it, why): nothing when every entry matches the marker's records.
    In a run folder whose marker proves nothing (a copy, or one an older version wrote, that is
    being resumed) only regular files called one of ``names`` (those a checkpoint holds), and
    nothing else, may go: the same files a save writes over by name."""
    root, target = Path(root), Path(root) / rel
    if target.is_symlink() or not target.is_dir():
        return [(".", "a symbolic link, which mlx-lora never writes" if target.is_symlink() else "not a folder")]
    if marker_problem(root) is None:
        return problems(target, limit=1, under=rel, root=root)
    names = set(names)
    for child in sorted(target.iterdir()):
        if child.is_symlink() or not child.is_file() or child.name not in names:
            shown = _first_inside(child, child.name) if child.is_dir() and not child.is_symlink() else child.name
            return [(shown, "which a checkpoint does not hold")]
    return []


def _delete(folder: Path, rel: str, root: Path, entries: Optional[dict], names: set) -> list[str]:
    """Delete a checkpoint folder checked by :func:`subfolder_problems` (by its records, or by its
    file names when ``entries`` is None); returns what was kept."""
    if entries is not None:
        return delete_owned(folder, under=rel, entries=entries)
    kept = []
    for child in sorted(folder.iterdir()):
        if child.name in names and child.is_file() and not child.is_symlink():
            child.unlink()
        else:
            kept.append(child.name)
    if not kept:
        folder.rmdir()
    return kept


def _entries_if_proven(root: Path) -> Optional[dict]:
    return dict(read_marker(root)["entries"]) if marker_problem(root) is None else None


def replace_subfolder(root, rel: str, tmp, *, what: str, names: Iterable[str]) -> None:
    """Inside ``root`` (a run folder), put the finished folder ``tmp`` at ``rel`` (a checkpoint),
    replacing what is there only when :func:`subfolder_problems` finds nothing, then record it."""
    root, names = Path(root), set(names)
    target = root / rel

    def refuse(found, where: Path):
        raise OwnershipError(
            f"{where} holds {found[0][0]!r}, {found[0][1]}; mlx-lora replaces only "
            f"{what}s it wrote: move it out and --resume"
        )

    if target.exists() or target.is_symlink():
        found = subfolder_problems(root, rel, names)
        if found:
            refuse(found, target)
        entries = _entries_if_proven(root)
        # Set aside as .NAME.old: a crash between the two renames leaves it under a name the run
        # folder recovers from (see mlx_lora.training.checkpoints), and the records still describe it.
        old = target.with_name(f".{target.name}.old")
        if old.exists() or old.is_symlink():
            found = (
                subfolder_problems(root, str(PurePosixPath(rel).parent / old.name), names)
                if entries is None
                else problems(old, limit=1, under=rel, root=root)
            )
            if found or _delete(old, rel, root, entries, names):
                raise OwnershipError(f"{what}: {old} is in the way of replacing {target}")
        record_before_move(root, tmp, rel, beside=True)  # killed after the rename below: the new one is proven too
        os.replace(target, old)
        os.replace(tmp, target)
        kept = _delete(old, rel, root, entries, names)
        if kept and old.exists():
            keep = target.with_name(f"{target.name}.kept-{os.urandom(3).hex()}")
            os.replace(old, keep)
            logger.warning(
                "%s: %r appeared while it was being replaced and was not deleted; it is now in %s", what, kept[0], keep
            )
        record(root, rel)
    else:
        record_before_move(root, tmp, rel)
        os.replace(tmp, target)


def remove_subfolder(root, rel: str, *, what: str, names: Iterable[str]) -> Optional[str]:
    """Delete ``root/rel`` (an old checkpoint) when :func:`subfolder_problems` finds nothing; else
    keep it and return the first entry in the way (nothing is deleted then)."""
    root, names = Path(root), set(names)
    target = root / rel
    found = subfolder_problems(root, rel, names)
    if found:
        return found[0][0]
    entries = _entries_if_proven(root)
    doomed = target.with_name(temp_prefix(target.name) + "deleting")
    os.replace(target, doomed)  # one rename: a crash now leaves a temporary, never half a checkpoint
    _delete(doomed, rel, root, entries, names)
    forget(root, rel)
    return None
