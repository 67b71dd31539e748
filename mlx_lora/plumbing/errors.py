"""User-facing errors.

Every mistake a user can make (bad data, bad config, wrong model path) raises a subclass of
:class:`MlxLoraError`. The CLI prints its message in one line and exits non-zero, without a
traceback unless ``--debug`` is given. Library callers can catch them by type.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Optional


class MlxLoraError(Exception):
    """Base class for errors caused by user input rather than by a bug."""

    exit_code = 2


class ConfigError(MlxLoraError, ValueError):
    """An invalid configuration; ``problems`` lists every problem found at once."""

    def __init__(self, problems: list[str], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"invalid configuration{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(msg)


class DataError(MlxLoraError, ValueError):
    """A problem with a data file, located by file, line (1-based) and field."""

    def __init__(
        self,
        message: str,
        path: Optional[str] = None,
        line: Optional[int] = None,
        field: Optional[str] = None,
    ):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(MlxLoraError, ValueError):
    """A model path, architecture or weight file that cannot be used."""


class AdapterError(MlxLoraError, ValueError):
    """An adapter that cannot be loaded or does not fit the model."""


class ExportError(MlxLoraError, ValueError):
    """An export or conversion that cannot be done as asked."""


class CheckpointError(MlxLoraError, ValueError):
    """A run folder or checkpoint that cannot be resumed."""


# ---------------------------------------------------------------------------------------------
# values in messages

SHOW_CHARS = 80
"""How much of a value an error message echoes: a message stays one readable line however large
the value (a long string, a list of thousands, a structure built from YAML aliases)."""
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = SHOW_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def clip(text: str, limit: int = SHOW_CHARS) -> str:
    """``text`` on one line (control characters escaped), cut to ``limit`` characters with '...'."""
    text = str(text)[: limit * 4]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """``repr(value)`` for a message, on one line and at most SHOW_CHARS characters, without ever
    building the whole repr of a huge value."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr of a huge int is slow, or refused
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        text = _repr.repr(value)
    except Exception:  # a value whose repr fails: say what it is
        text = f"<{type(value).__name__}>"
    return clip(text)
