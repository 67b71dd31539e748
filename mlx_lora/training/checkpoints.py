"""The run folder and its checkpoints.

```
runs/NAME/
  config.yaml                  resolved config (what --resume reads)
  adapter_config.json          latest adapter, PEFT layout
  adapter_model.safetensors
  metrics.jsonl
  checkpoints/
    step-0000100/              adapter + optimizer.safetensors + state.json
    best/                      adapter with the lowest validation loss
    latest                     name of the newest complete checkpoint
```

Every checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically after that, so a crash at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.model.run_layout import RUN_LAYOUT, STEP_DIR, check_run_layout  # noqa: F401 (re-exported)
from mlx_lora.plumbing.errors import CheckpointError
from mlx_lora.plumbing.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, is_own_or_stale_temp
from mlx_lora.plumbing.ownership import (
    LOCK,
    OwnershipError,
    new_beside,
    problems,
    record,
    remove_subfolder,
    replace_subfolder,
    subfolder_problems,
)

logger = logging.getLogger(__name__)

# A checkpoint renamed aside while a new one of the same step replaced it (io.atomic_dir); a crash
# between the two renames leaves only this name, which remove_partial_writes() puts back.
REPLACED_STEP_DIR = re.compile(r"^\.(step-(\d+))\.old$")
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# The files a checkpoint holds (best/ holds the first two).
CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapters.safetensors",
    OPTIMIZER_FILE,
    STATE_FILE,
)
"""What a checkpoint folder holds: the adapter (PEFT layout, and mlx-lm's weights beside it), the
optimizer state and the training state."""


@dataclass
class TrainState:
    """Everything besides weights that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    trained_tokens: int = 0
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    world_size: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data, source) -> "TrainState":
        """A TrainState from the parsed ``state.json`` at ``source``; a missing, unknown or
        ill-typed key raises :class:`CheckpointError` naming the file and the key."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise CheckpointError(
                f"{source}: unexpected key {unknown[0]!r}; this is not a state file that "
                f"mlx-lora wrote (or it was edited)"
            )
        missing = [k for k in names if k not in data]
        if missing:
            raise CheckpointError(f"{source}: key {missing[0]!r} is missing")

        def bad(key, want):
            return CheckpointError(f"{source}: key {key!r} must be {want}, got {json.dumps(data[key])}")

        def whole(v):  # JSON true/false are ints to Python; 3.0 is not a step count
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        for key in ("step", "epoch", "batch_index", "trained_tokens", "evals_since_best"):
            if not whole(data[key]) or data[key] < 0:
                raise bad(key, "a whole number >= 0")
        if not whole(data["world_size"]) or data["world_size"] < 1:
            raise bad("world_size", "a whole number >= 1")
        best = data["best_step"]
        if best is not None and (not whole(best) or not 0 <= best <= data["step"]):
            raise bad("best_step", f"null or a whole number from 0 to the step ({data['step']})")
        if data["best_val_loss"] is not None and not number(data["best_val_loss"]):
            raise bad("best_val_loss", "null or a finite number")
        if not number(data["elapsed_s"]) or data["elapsed_s"] < 0:
            raise bad("elapsed_s", "a finite number >= 0")
        if not isinstance(data["extra"], dict):
            raise bad("extra", "an object")
        gb = data["extra"].get("global_batch")
        if gb is not None and (not whole(gb) or gb < 1):
            raise CheckpointError(
                f"{source}: key 'extra.global_batch' must be a whole number >= 1, got {json.dumps(gb)}"
            )
        return cls(**{k: data[k] for k in names})


class RunInUse(CheckpointError):
    """Another process is writing the run folder."""


class RunLock:
    """One writer per run folder: an exclusive ``flock`` on ``RUN/.lock``, which holds the
    writer's process id for the message a second writer gets.

    The operating system drops the lock when its process ends in any way (SIGKILL and power loss
    included), so a dead run never blocks its own ``--resume``; a stale ``.lock`` file is just
    locked again. A clean end removes the file. Use as a context manager, or
    :meth:`acquire` / :meth:`release`; :meth:`check_free` asks without taking it.
    """

    # A check_free() in another process holds a shared lock for microseconds; an acquire that
    # collides with it tries again for this long before calling the folder busy.
    RETRY_S = 0.5

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def check_free(self) -> None:
        """Raise :class:`RunInUse` when a live process holds the lock; creates and changes nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or no folder): no writer, and prepare_run_dir judges the rest
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(fd) from None
            except OSError:
                return  # a file system without locks: acquire() says so
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def acquire(self) -> "RunLock":
        """Create the folder if needed and take the lock, or raise :class:`RunInUse`."""
        import fcntl

        if self._fd is not None:
            return self
        deadline = time.monotonic() + self.RETRY_S
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        os.close(fd)
                        time.sleep(0.02)
                        continue
                    err = self._in_use(fd)
                    os.close(fd)
                    raise err from None
                except BaseException:
                    os.close(fd)
                    raise
                # The previous holder removes the file as it lets go; a lock on a removed file
                # guards nothing, so take the one now at the path instead.
                if not self._is_current(fd):
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except BaseException:
                    self._fd = fd
                    self.release()
                    raise
                self._fd = fd
                return self
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # reported as a full disk
            raise CheckpointError(
                f"{self.path}: cannot lock the run folder ({e.strerror or e}); mlx-lora "
                f"locks it so that no two runs write it at once"
            ) from None

    def moved_to(self, folder) -> None:
        """The locked folder was renamed to ``folder`` (a run built beside the one it replaces)."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK

    def release(self) -> None:
        """Remove the lock file and let go (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._is_current(fd):
                os.unlink(self.path)  # before unlocking, so no one locks a file that is going away
        except OSError:
            pass  # a leftover .lock is harmless: the next run locks it again
        finally:
            os.close(fd)

    def _is_current(self, fd: int) -> bool:
        try:
            mine, now = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def _in_use(self, fd: int) -> RunInUse:
        pid = None
        # The holder writes its pid right after locking: give it a moment if the file is still empty.
        for _ in range(20):
            try:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                text = ""
            if text.isdigit():
                pid = int(text)
                break
            time.sleep(0.01)
        who = f"pid {pid}" if pid is not None else "process id unknown"
        return RunInUse(
            f"{self.folder} is in use by another mlx-lora train ({who}); wait for it to finish or "
            f"stop it, or choose another --out"
        )


class RunDir:
    def __init__(self, path, replacing=None):
        self.path = Path(path)
        # With train --overwrite this run is built beside the run folder it will replace (this
        # folder is then a temporary sibling, swapped in when the run completes).
        self.replacing: Optional[Path] = Path(replacing) if replacing is not None else None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def exists(self) -> bool:
        return self.config_file.exists()

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_file, text)
        record(self.path, self.config_file.name)

    def record(self, *paths) -> None:
        """Record in the run folder's marker what the tool just wrote at ``paths`` (inside the
        run folder), so that ``--overwrite`` can later prove it wrote them."""
        record(self.path, *(str(Path(p).relative_to(self.path)) if Path(p).is_absolute() else str(p) for p in paths))

    def replace_checkpoint(self, name: str, writer) -> Path:
        """Write ``checkpoints/NAME`` (``writer(folder)`` fills a temporary folder), replacing one
        of that name only when every entry in it is one the tool wrote."""
        target = self.checkpoints / name
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        rel = f"checkpoints/{name}"
        if target.exists() or target.is_symlink():  # refuse before the work, naming what is not ours
            found = subfolder_problems(self.path, rel, CHECKPOINT_FILES)
            if found:
                raise CheckpointError(
                    f"{target} holds {found[0][0]!r}, {found[0][1]}; mlx-lora replaces only "
                    f"checkpoints it wrote: move it out and --resume"
                )
        tmp = new_beside(target, ".tmp")
        try:
            writer(tmp)
            replace_subfolder(self.path, rel, tmp, what="checkpoint", names=CHECKPOINT_FILES)
        except OwnershipError as e:
            raise CheckpointError(str(e)) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.checkpoints.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def save_checkpoint(
        self, step: int, adapter_writer, optimizer_state: dict, state: TrainState, keep: int = 3
    ) -> Path:
        """``adapter_writer(folder)`` writes the adapter files into the new checkpoint folder."""

        def write(tmp: Path) -> None:
            adapter_writer(tmp)
            atomic_save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer_state)))
            atomic_write_json(tmp / STATE_FILE, state.__dict__)

        target = self.replace_checkpoint(f"step-{step:07d}", write)
        atomic_write_text(self.checkpoints / "latest", target.name + "\n")
        self.record(self.checkpoints / "latest")
        for old in self.list_checkpoints()[:-keep]:
            if old != target:
                # Renamed to a temporary name first (one atomic rename): a crash during the deletion
                # then leaves a temporary, never a half-deleted step-* checkpoint. Only what the tool
                # wrote is deleted: a checkpoint holding anything else is kept, and said so.
                foreign = remove_subfolder(
                    self.path, f"checkpoints/{old.name}", what="checkpoint", names=CHECKPOINT_FILES
                )
                if foreign is not None:
                    logger.warning("kept old checkpoint %s: it holds %r, which mlx-lora did not write", old, foreign)
        return target

    def remove_partial_writes(self) -> list[Path]:
        """Clear what writes cut short by a crash left behind: hidden temporary files and folders of
        the run folder and ``checkpoints/``. A folder that was being replaced when the crash came
        (``.NAME.old`` with no ``NAME``) is put back. Returns the paths removed."""
        removed = []
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                name = p.name
                if not name.startswith("."):
                    continue
                # A folder renamed aside by an earlier version (.NAME.old, .NAME.deleting) is put back
                # or removed only when it is, entry for entry, the one the marker records as NAME.
                old = re.match(r"^\.(.+)\.(old|deleting)$", name)
                if old and p.is_dir() and not p.is_symlink() and not is_own_or_stale_temp(name):
                    if old.group(2) == "old" and not (folder / old.group(1)).exists():
                        os.replace(p, folder / old.group(1))  # put back: a rename deletes nothing
                        continue
                    rel = str((folder / old.group(1)).relative_to(self.path))
                    if problems(p, under=rel, root=self.path):
                        continue  # not provably ours: left alone
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                elif is_own_or_stale_temp(name):  # a temporary of this host's dead (or this) process
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint that is complete; falls back past damaged ones. One that a crash
        left renamed aside (``.step-N.old``, see :data:`REPLACED_STEP_DIR`) counts, under that
        name, until :meth:`remove_partial_writes` puts it back: choosing a checkpoint only reads."""
        found = {p.name: p for p in self.list_checkpoints()}
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                m = REPLACED_STEP_DIR.match(p.name)
                if m and p.is_dir() and m.group(1) not in found:
                    found[m.group(1)] = p
        names = sorted(found, key=lambda n: int(STEP_DIR.match(n).group(1)), reverse=True)
        pointer = self.checkpoints / "latest"
        if pointer.is_file():
            named = pointer.read_text(encoding="utf-8", errors="replace").strip()
            if named in found:
                names.remove(named)
                names.insert(0, named)
        for name in names:
            if self.is_complete(found[name]):
                return found[name]
        return None

    @staticmethod
    def is_complete(ckpt: Path) -> bool:
        try:
            json.loads((ckpt / STATE_FILE).read_text())
            json.loads((ckpt / "adapter_config.json").read_text())
            mx.load(str(ckpt / "adapter_model.safetensors"))
            mx.load(str(ckpt / OPTIMIZER_FILE))
            return True
        except Exception:
            return False

    @staticmethod
    def read_state(ckpt: Path) -> TrainState:
        """The checked :class:`TrainState` of a checkpoint; its step must match the folder's name."""
        source = ckpt / STATE_FILE
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{source}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        state = TrainState.from_json(data, source)
        m = STEP_DIR.match(ckpt.name) or REPLACED_STEP_DIR.match(ckpt.name)
        if m and int(m.groups()[-1]) != state.step:
            raise CheckpointError(f"{source}: key 'step' is {state.step} but the checkpoint folder is {ckpt.name}")
        return state

    @classmethod
    def load_checkpoint(cls, ckpt: Path) -> tuple[dict, dict, TrainState]:
        """(adapter tensors, optimizer state tree, TrainState)."""
        state = cls.read_state(ckpt)
        try:
            adapter = mx.load(str(ckpt / "adapter_model.safetensors"))
            opt = mx.load(str(ckpt / OPTIMIZER_FILE))
        except Exception as e:
            raise CheckpointError(f"{ckpt}: checkpoint is unreadable ({e})") from None
        return adapter, tree_unflatten(list(opt.items())), state
