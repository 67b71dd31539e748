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

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CheckpointError
from .io import atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

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

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if p.is_dir() and (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self, step: int, adapter_writer, optimizer_state: dict, state: TrainState,
                        keep: int = 3) -> Path:
        """``adapter_writer(folder)`` writes the adapter files into the new checkpoint folder."""
        target = self.checkpoints / f"step-{step:07d}"
        with atomic_dir(target, overwrite=True) as tmp:
            adapter_writer(tmp)
            atomic_save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer_state)))
            atomic_write_json(tmp / STATE_FILE, state.__dict__)
        atomic_write_text(self.checkpoints / "latest", target.name + "\n")
        for old in self.list_checkpoints()[:-keep]:
            if old != target:
                # Hide it first (one atomic rename): a crash during the deletion then leaves a hidden
                # folder that remove_partial_writes() clears, never a half-deleted step-* checkpoint.
                doomed = old.with_name(f".{old.name}.deleting")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
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
                if name.endswith(".old") and p.is_dir() and not (folder / name[1:-4]).exists():
                    os.replace(p, folder / name[1:-4])
                    continue
                if ".tmp" in name or name.endswith((".old", ".deleting")):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint that is complete; falls back past damaged ones."""
        candidates = list(reversed(self.list_checkpoints()))
        pointer = self.checkpoints / "latest"
        if pointer.is_file():
            named = self.checkpoints / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for c in candidates:
            if self.is_complete(c):
                return c
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
    def load_checkpoint(ckpt: Path) -> tuple[dict, dict, TrainState]:
        """(adapter tensors, optimizer state tree, TrainState)."""
        try:
            adapter = mx.load(str(ckpt / "adapter_model.safetensors"))
            opt = mx.load(str(ckpt / OPTIMIZER_FILE))
            state = TrainState(**json.loads((ckpt / STATE_FILE).read_text()))
        except Exception as e:
            raise CheckpointError(f"{ckpt}: checkpoint is unreadable ({e})") from None
        return adapter, tree_unflatten(list(opt.items())), state
