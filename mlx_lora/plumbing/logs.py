"""One message channel. Library modules report through ``logging.getLogger(__name__)`` (all under the
``mlx_lora`` logger) and never print; the entry point decides what reaches the screen by calling
:func:`setup` once: the ``mlx-lora`` command does (``--quiet``, ``--verbose``, ``--debug``), and so
do the recipe scripts. A program that uses the library without calling it gets Python's default:
warnings and errors on stderr, nothing else.

Messages are one line each, written to stderr as they are (an info line), or prefixed with their
level (``warning: ...``, ``error: ...``, ``debug: module: ...``).
"""

from __future__ import annotations

import logging
import sys

ROOT = "mlx_lora"
QUIET, NORMAL, VERBOSE = -1, 0, 1


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (a test's capture, a pager),
    not on the stream that was there when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property ignores it
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        if record.levelno >= logging.INFO:
            return msg
        return f"debug: {record.name}: {msg}"


def setup(verbosity: int = NORMAL) -> logging.Logger:
    """Install the one handler on the ``mlx_lora`` logger (replacing one installed before):
    ``QUIET`` shows warnings and errors, ``NORMAL`` adds information lines, ``VERBOSE`` adds debug
    lines. Returns the logger. Idempotent."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _Stderr):
            logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO}.get(verbosity, logging.DEBUG))
    return logger


def installed() -> bool:
    """Whether an entry point has called :func:`setup` in this process."""
    return any(isinstance(h, _Stderr) for h in logging.getLogger(ROOT).handlers)
