"""The entries ``mlx-lora train`` writes at fixed names in a run folder, and the check, made by every
command that loads an adapter or a run folder, that they are still of the kind it wrote."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_lora.plumbing.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_LAYOUT = {
    "config.yaml": "file",
    "metrics.jsonl": "file",
    "loss.png": "file",
    "adapter_config.json": "file",
    "adapter_model.safetensors": "file",
    "checkpoints": "dir",
    "checkpoints/latest": "file",
    "checkpoints/best": "dir",
}
"""What the tool writes at fixed names in a run folder, and of what kind (``checkpoints/step-N``
are folders too)."""


def check_run_layout(folder) -> None:
    """Refuse, before anything is read or written, a run folder whose fixed entries are not of
    the kind the tool writes there (a folder in place of ``checkpoints/latest``, say): one
    CheckpointError naming the entry. Used by every command that loads an adapter or a run
    folder. A folder that is not a run folder (no ``config.yaml`` or ``checkpoints``) passes."""
    folder = Path(folder)
    if not (
        (folder / "config.yaml").exists()
        or (folder / "checkpoints").exists()
        or (folder / "config.yaml").is_symlink()
        or (folder / "checkpoints").is_symlink()
    ):
        return
    entries = [(folder / name, kind) for name, kind in RUN_LAYOUT.items()]
    ckpts = folder / "checkpoints"
    if ckpts.is_dir():
        entries += [(p, "dir") for p in sorted(ckpts.iterdir()) if STEP_DIR.match(p.name)]
    for path, kind in entries:
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_dir() if kind == "dir" else path.is_file():
            continue
        got = (
            "a broken symbolic link"
            if not path.exists()
            else "a folder"
            if path.is_dir()
            else "a file"
            if path.is_file()
            else "neither a file nor a folder"
        )
        want = "a folder" if kind == "dir" else "a file"
        raise CheckpointError(
            f"{path} is {got}, where mlx-lora train writes {want}: this run folder was changed by "
            f"hand; remove or rename {path.name}"
        )
