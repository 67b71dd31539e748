"""Progress display: a live bar (tqdm) on a terminal, nothing of the kind in pipes, files and CI.

``MLX_LORA_PROGRESS=1`` draws bars even when stderr is not a terminal, ``=0`` never draws them.
What a command prints instead of a bar (training's plain log lines) is up to the command.

:class:`Ticker` is for the stretches of work between a command's own lines (an evaluation pass,
reference log-probs, generating for every test row): nothing while it is short, then a bar on a
terminal or a plain line now and then in a pipe, so that no wait longer than a couple of seconds
is silent. ``MLX_LORA_PROGRESS_DELAY`` (seconds, default 2) is how long a stretch stays quiet.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

DELAY_S = 2.0
"""A stretch of work shorter than this shows nothing (``MLX_LORA_PROGRESS_DELAY``)."""
PLAIN_EVERY_S = 10.0
"""In a pipe, at most one plain progress line this often."""


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


def bar(total: Optional[int], desc: str, *, stream: Optional[TextIO] = None, **options):
    """A tqdm bar on ``stream`` (default stderr) that stays on screen when closed (``leave``)."""

    options.setdefault("leave", True)
    return tqdm(total=total, desc=desc, file=stream or sys.stderr, **options)


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


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get("MLX_LORA_PROGRESS_DELAY", DELAY_S)))
    except ValueError:
        return DELAY_S


class Ticker:
    """Progress of ``total`` units (None: not known) of a stretch of work named ``desc``.

    On a terminal a tqdm bar that appears once the stretch has lasted :data:`DELAY_S` and goes
    when it ends; elsewhere plain lines ``desc: n/total unit (s)`` on ``stream`` from then on, at most
    one every :data:`PLAIN_EVERY_S`, and a last one at the end. ``enabled=False`` (a quiet command)
    or ``MLX_LORA_PROGRESS=0`` shows nothing."""

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        *,
        unit: str = "batch",
        stream: Optional[TextIO] = None,
        show: Optional[bool] = None,
        enabled: bool = True,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.delay, self.start = _delay(), time.monotonic()
        self.last_line: Optional[float] = None
        self.shown_n = -1
        quiet = not enabled or os.environ.get("MLX_LORA_PROGRESS") == "0"
        self._bar = None
        if not quiet and show_bar(self.stream, show):
            self._bar = bar(total, desc, stream=self.stream, unit=unit, delay=self.delay, leave=False)
        self.plain = not quiet and self._bar is None

    def _text(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        unit = self.unit if (self.total or self.n) == 1 else self.unit + ("es" if self.unit.endswith("ch") else "s")
        return f"{self.desc}: {self.n}{of} {unit} ({time.monotonic() - self.start:.0f} s)"

    def _write(self) -> None:
        self.stream.write(self._text() + "\n")
        self.stream.flush()
        self.last_line, self.shown_n = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.plain:
            now = time.monotonic()
            if now - self.start >= self.delay and (self.last_line is None or now - self.last_line >= PLAIN_EVERY_S):
                self._write()

    def close(self) -> None:
        if self._bar is not None:
            if time.monotonic() - self.start >= self.delay:
                # tqdm skips redraws closer together than its mininterval: the bar shows its end
                # (n/total) before it goes, however fast the last units came.
                self._bar.refresh()
            self._bar.close()
            self._bar = None
        elif self.plain and self.last_line is not None and self.shown_n != self.n:
            self._write()  # the end of a stretch that was shown

    def __enter__(self) -> "Ticker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
