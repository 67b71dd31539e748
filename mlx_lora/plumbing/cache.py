"""Where mlx-lora keeps what it can rebuild: tokenized data, GGUF imports, downloaded models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MLX_LORA_CACHE`` when set, else ``~/.cache/mlx-lora``."""
    root = os.environ.get("MLX_LORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-lora"
