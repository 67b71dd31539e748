"""Scores of a generated answer against a row's reference, for ``mlx-lora eval --generate``.

Every score is a number in [0, 1] per row; a metric's result is their mean. A metric may report
more than one column (``json`` reports whether the output parses and whether it equals the
reference).

- ``exact``: the output equals the reference after :func:`normalize` (Unicode NFKC, case folded,
  runs of whitespace made one space, surrounding whitespace removed).
- ``contains``: the normalized reference occurs in the normalized output.
- ``json``: ``json_valid``, the output (or the first fenced code block in it) parses as JSON;
  ``json_equal``, it parses to a value equal to the parsed reference (key order and formatting
  do not matter; ``1`` and ``1.0`` are equal).
- ``rouge-l``: F1 of the longest common subsequence of word tokens (lower-cased runs of letters
  and digits), as ROUGE-L (Lin, 2004) with precision ``LCS / len(output)`` and recall
  ``LCS / len(reference)``.
- ``pass@1``: the generated code (the first fenced code block when there is one, else the whole
  output) followed by the row's ``tests`` runs without error in :mod:`mlx_lora.plumbing.sandbox`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Iterable, Optional, Sequence

from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.sandbox import run_python

METRICS = ("exact", "contains", "json", "rouge-l", "pass@1")
COLUMNS = {
    "exact": ("exact",),
    "contains": ("contains",),
    "json": ("json_valid", "json_equal"),
    "rouge-l": ("rouge-l",),
    "pass@1": ("pass@1",),
}
TESTS_FIELD = "tests"
"""The row field that carries a code row's tests (Python source, e.g. ``assert f(2) == 4``)."""
SHORT_ANSWER_WORDS = 8
"""References of at most this many words on average are scored by exact match by default."""

_FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_WORD = re.compile(r"[^\W_]+")


def parse_metrics(values: Iterable[str]) -> list[str]:
    """Metric names from ``--metric`` values (repeated, or comma lists), in order, each once."""
    out: list[str] = []
    for value in values:
        for name in str(value).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in METRICS:
                raise MlxLoraError(f"--metric: unknown metric {name!r}; choose from {', '.join(METRICS)}")
            if name not in out:
                out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# text


def normalize(text: str) -> str:
    """Unicode NFKC, case folded, whitespace runs as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def fenced_block(text: str) -> Optional[str]:
    """The body of the first Markdown fenced code block in ``text`` (an unclosed one runs to the
    end), or None."""
    m = _FENCE.search(text)
    return m.group(2) if m else None


def exact(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def contains(output: str, reference: str) -> float:
    return float(normalize(reference) in normalize(output))


def parse_json(text: str) -> tuple[bool, object]:
    """(parsed, value) of ``text`` as JSON, or of its first fenced block when the whole does not parse."""
    for candidate in (text, fenced_block(text)):
        if candidate is None:
            continue
        try:
            return True, json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return False, None


def json_scores(output: str, reference_value: object) -> dict[str, float]:
    ok, value = parse_json(output)
    return {"json_valid": float(ok), "json_equal": float(ok and value == reference_value)}


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (what ROUGE calls tokens; Unicode letters count)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len a * len b) time,
    O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 of ``output`` against ``reference``; 0 when either has no word."""
    out, ref = words(output), words(reference)
    if not out or not ref:
        return 0.0
    lcs = lcs_length(out, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(out), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def code_of(output: str) -> str:
    """The code in a model's answer: its first fenced block, else the whole answer."""
    block = fenced_block(output)
    return block if block is not None else output


def pass_at_1(output: str, tests: str, timeout_s: float) -> tuple[float, str]:
    """(1.0 or 0.0, the sandbox's status) for the generated code followed by ``tests``."""

    result = run_python(code_of(output).rstrip() + "\n\n" + tests + "\n", timeout_s=timeout_s)
    return float(result.passed), result.status


# ---------------------------------------------------------------------------------------------
# choosing


def default_metric(references: Sequence[Optional[str]], has_tests: Sequence[bool]) -> tuple[str, str]:
    """(metric, why) for rows with these references: ``pass@1`` when every row carries tests,
    ``json`` when every reference is a JSON object or array, ``exact`` for short answers (at most
    SHORT_ANSWER_WORDS words on average), else ``rouge-l``."""
    if has_tests and all(has_tests):
        return "pass@1", f"every row has '{TESTS_FIELD}'"
    refs = [r or "" for r in references]
    if refs and all(isinstance(parse_json(r)[1], (dict, list)) and parse_json(r)[0] for r in refs):
        return "json", "every reference is a JSON object or array"
    mean_words = sum(len(r.split()) for r in refs) / max(len(refs), 1)
    if mean_words <= SHORT_ANSWER_WORDS:
        return "exact", f"short references ({mean_words:.1f} words on average)"
    return "rouge-l", f"long references ({mean_words:.1f} words on average)"
