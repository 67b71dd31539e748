"""Output ownership: the tool replaces only what it wrote.

Every folder a command creates (a run folder, a fused or converted model, a PEFT export, the
quickstart's output, an Ollama or LM Studio package) carries a small marker file,
:data:`MARKER`, that names the kind of folder and the command that wrote it. ``--overwrite``
may then replace:

- an empty folder, or
- a folder whose marker is of a compatible kind (a fused model may replace a converted one, never
  a run folder) and that holds nothing but what that kind of folder contains.

Anything else is refused with one line naming the folder and the first entry the tool did not
write. The current folder, any folder above it, the home folder and ``/`` are never replaced. An
``--out`` that is a symbolic link is followed: the folder it points to is checked and replaced,
and the link keeps pointing at the result.

Single-file outputs (a ``.gguf``) have no marker; ``--overwrite`` replaces an existing file only
when it is a GGUF file, the only kind of file those commands write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from mlx_lora import __version__
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.io import _host_tag, atomic_write_json, temp_prefix

MARKER = ".mlx-lora.json"
"""Name of the marker file in every folder the tool creates."""

LOCK = ".lock"
"""A run folder's lock file (see :mod:`mlx_lora.training.checkpoints`)."""

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

# Entries a folder of each kind may hold besides those its marker lists (a run folder grows while it
# trains, so its contents are described by name rather than recorded once).
_KNOWN_ENTRIES = {
    "run": {"config.yaml", "adapter_config.json", "adapter_model.safetensors", "adapters.safetensors", "metrics.jsonl",
            "loss.png", "checkpoints"},
    "quickstart": {"run", "fused", "gguf", "quickstart.json"},
}

_TEMP = re.compile(r"^\..+\.mlx-lora-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.")
_OUR_TEMP_SUFFIXES = (".tmp", ".partial", ".old", ".deleting")


class OwnershipError(MlxLoraError):
    """An output location the tool will not write to or replace."""


# ---------------------------------------------------------------------------------------------
# temporary names that say who made them


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


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
    host = _host_tag()
    for p in entries:
        m = _TEMP.match(p.name)
        if not m or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
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


# ---------------------------------------------------------------------------------------------
# the marker


def write_marker(folder, kind: str, command: str, files: Optional[Iterable[str]] = None) -> None:
    """Record in ``folder`` that ``command`` wrote it as a folder of ``kind``; ``files`` are the
    top-level entries it wrote (default: everything the folder holds now)."""
    folder = Path(folder)
    if kind not in COMPATIBLE:
        raise ValueError(f"unknown output kind {kind!r}")
    if files is None:
        files = [p.name for p in folder.iterdir() if p.name != MARKER and not _is_our_temp(p.name)]
    atomic_write_json(folder / MARKER, {"written_by": "mlx-lora", "version": __version__, "kind": kind,
                                        "command": command, "files": sorted(set(files))})


def read_marker(folder) -> Optional[dict]:
    """The marker of ``folder``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "mlx-lora" or data.get("kind") not in COMPATIBLE:
        return None
    return data


def _is_our_temp(name: str) -> bool:
    return name.startswith(".") and (bool(_TEMP.match(name)) or name.endswith(_OUR_TEMP_SUFFIXES))


def foreign_entries(folder, kind: str, marker: Optional[dict]) -> list[str]:
    """Entries of ``folder`` (sorted) that a folder of ``kind`` written by the tool would not hold."""
    ours = {MARKER, LOCK} | _KNOWN_ENTRIES.get(kind, set())
    if marker is not None:
        files = marker.get("files")
        if isinstance(files, list):
            ours |= {f for f in files if isinstance(f, str)}
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in ours and not _is_our_temp(p.name))


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
            raise OwnershipError(f"{what} {path} is a symbolic link to {target}, which does not exist; "
                                 f"create it or give another path")
        return target
    return path


def check_output_dir(path, kind: str, *, overwrite: bool, what: str = "output folder",
                     exists_hint: str = "pass --overwrite to replace it") -> Path:
    """Check, before any work, that a command that writes a folder of ``kind`` may write ``path``;
    returns the path to write (a symbolic link followed).

    Allowed: a new path, an empty folder, or (with ``overwrite``) a folder of a compatible kind
    that the tool wrote and that holds nothing else. Refused with :class:`OwnershipError`: a file,
    a folder holding anything the tool did not write, and (always) the current folder, a folder
    above it, the home folder and ``/``. Leftovers of dead processes in the parent are removed.
    """
    out = follow_link(path, what)
    why = _protected(out.resolve())
    if why is not None:
        raise OwnershipError(f"{what} {out} is {why}; mlx-lora never writes its output over it. "
                             f"Give a new folder (e.g. {Path(out.resolve().name or 'out') / 'mlx-lora-out'})")
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
        raise OwnershipError(f"{what} {out} is not empty and was not written by this kind of mlx-lora command"
                             f"{label}: it holds {first!r}; mlx-lora replaces only folders it wrote. "
                             f"Choose another folder")
    foreign = foreign_entries(out, kind, marker)
    if foreign:
        raise OwnershipError(f"{what} {out} holds {foreign[0]!r}, which mlx-lora did not write"
                             + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                             + "; move it out or choose another folder")
    if not overwrite:
        raise OwnershipError(f"{what} {out} already exists; {exists_hint}")
    return out


def check_output_file(path, *, overwrite: bool, what: str = "output file", magic: bytes = b"GGUF") -> Path:
    """Check a single-file output before any work: a new path, or (with ``overwrite``) an existing
    file that starts with ``magic`` (the kind of file the command writes). Returns the path to
    write (a symbolic link followed); leftovers of dead processes in its folder are removed."""
    out = follow_link(path, what)
    if out.is_dir():
        raise OwnershipError(f"{what} {out} is a folder; give a file name")
    if out.parent.is_dir():
        clean_stale_temps(out.parent)
    if out.exists():
        if not overwrite:
            raise OwnershipError(f"{what} {out} already exists (pass --overwrite to replace it)")
        try:
            with open(out, "rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise OwnershipError(f"{what} {out} cannot be read ({e.strerror or e})") from None
        if head != magic:
            raise OwnershipError(f"{what} {out} exists and is not a {magic.decode(errors='replace')} file; "
                                 f"--overwrite replaces only files of the kind this command writes. "
                                 f"Choose another name")
    return out


def clear_owned_dir(path, keep: Iterable[str] = (LOCK,)) -> None:
    """Empty a folder :func:`check_output_dir` accepted for replacement, in place, except ``keep``
    (a run folder's lock file stays, so the lock held on it keeps its meaning). Folders are first
    renamed to hidden temporary names, and the marker goes last, so a crash part-way leaves a
    folder that is still recognisably the tool's."""
    path = Path(path)
    if not path.is_dir():
        return
    keep = set(keep)
    for p in sorted(path.iterdir(), key=lambda p: p.name == MARKER):
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            doomed = p.with_name(temp_prefix(p.name) + "deleting")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
