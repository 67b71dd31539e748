"""Progress display: a live bar (tqdm) on a terminal, nothing of the kind in pipes, files and CI.

``MLX_LORA_PROGRESS=1`` draws bars even when stderr is not a terminal, ``=0`` never draws them.
What a command prints instead of a bar (training's plain log lines) is up to the command.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


def show_bar(stream: Optional[TextIO] = None, show: Optional[bool] = None) -> bool:
    """Whether to draw a live bar on ``stream`` (default stderr): ``show`` when given, else what
    ``MLX_LORA_PROGRESS`` says, else whether ``stream`` is a terminal."""
    if show is not None:
        return show
    env = os.environ.get("MLX_LORA_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int, desc: str, *, stream: Optional[TextIO] = None, **options):
    """A tqdm bar on ``stream`` (default stderr) that stays on screen when closed."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=stream or sys.stderr, leave=True, **options)


class ByteProgress:
    """A byte-count bar (see :func:`bar`), drawn only when :func:`show_bar` says so."""

    def __init__(self, total: int, desc: str, show: Optional[bool] = None):
        self._bar = bar(total, desc, unit="B", unit_scale=True, unit_divisor=1024) if show_bar(show=show) else None

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
