"""Reward functions for GRPO (``train.method: grpo``): a completion and its data row -> a number.

A reward is named in the config, alone (``train.reward: number``) or several with weights
(``train.rewards: {number: 1.0, format: 0.2}``); a completion's reward is the weighted sum.
Built in (every one returns a finite number; ``answer`` and ``tests`` are the row's fields):

- ``number``: 1 when the first number in the completion equals the first number of ``answer``
  (``1,000`` and ``1000`` are equal, ``2.50`` and ``2.5`` too), else 0;
- ``exact``: 1 when the completion equals ``answer`` after normalising case and whitespace;
- ``contains``: 1 when the normalised ``answer`` occurs in the normalised completion;
- ``json``: 1 when the completion (or its first fenced block) parses as JSON equal to ``answer``
  (a JSON value, or a string holding JSON);
- ``regex:PATTERN``: 1 when the regular expression occurs in the completion;
- ``format:PATTERN``: 1 when the whole completion (surrounding whitespace aside) matches it;
- ``pass@1``: 1 when the completion's code followed by the row's ``tests`` runs without error in
  :func:`mlx_lora.plumbing.sandbox.run_python`;
- ``length``: ``-tokens / max_completion_length``, a penalty in [-1, 0] on long completions;
  ``length:N`` only penalises tokens past N: ``-max(0, tokens - N) / (max_completion_length - N)``.

A user's function is named ``module:function`` (``my_rewards:brevity``): the module is imported
from the current directory or the installed packages and called as ``function(completion, row)``
(``row``: the data row, a dict) -> a number. That is running the user's own code, as a training
script would; it is never taken from a data set or a model folder, which are only data.

A reward that raises, or returns something that is not a finite number, stops training with one
line naming the data row (file and line) and the reward.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mlx_lora.data.formats import one_line
from mlx_lora.inference import metrics as M
from mlx_lora.plumbing.errors import DataError, MlxLoraError
from mlx_lora.plumbing.sandbox import run_python

ANSWER, TESTS = "answer", M.TESTS_FIELD
BUILTIN = ("number", "exact", "contains", "json", "pass@1", "length")
PREFIXED = ("regex:", "format:", "length:")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_USER = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")
PASS_TIMEOUT_S = 10.0


class RewardError(MlxLoraError, ValueError):
    """A reward name or function that cannot be used."""


@dataclass(frozen=True)
class Reward:
    """One reward function: its configured name, weight and the row fields it reads."""

    name: str
    weight: float
    fn: Callable[[str, dict, int, int], Any]
    """(completion text, row, completion tokens, max_completion_length) -> number."""
    needs: tuple[str, ...] = ()
    user: bool = False


def first_number(text: Any) -> Optional[float]:
    """The first number written in ``text`` (thousands separators allowed), or None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, numbers.Real):
        return float(text)
    m = _NUMBER.search(str(text))
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def number_reward(completion: str, answer: Any) -> float:
    got, want = first_number(completion), first_number(answer)
    if got is None or want is None or not (math.isfinite(got) and math.isfinite(want)):
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def _answer_text(answer: Any) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer)


def json_reward(completion: str, answer: Any) -> float:
    want = answer
    if isinstance(answer, str):
        ok, value = M.parse_json(answer)
        want = value if ok else answer
    ok, got = M.parse_json(completion)
    return float(ok and got == want)


def _regex(pattern: str, name: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.S)
    except re.error as e:
        raise RewardError(f"reward {name}: bad regular expression: {e}") from None


def _length_cut(name: str) -> int:
    text = name[len("length:") :]
    if not text.isdigit():
        raise RewardError(f"reward {name}: expected length:N with N a whole number of tokens")
    return int(text)


def _builtin(name: str) -> tuple[Callable, tuple[str, ...]]:
    if name == "number":
        return (lambda c, row, n, m: number_reward(c, row[ANSWER])), (ANSWER,)
    if name == "exact":
        return (lambda c, row, n, m: M.exact(c, _answer_text(row[ANSWER]))), (ANSWER,)
    if name == "contains":
        return (lambda c, row, n, m: M.contains(c, _answer_text(row[ANSWER]))), (ANSWER,)
    if name == "json":
        return (lambda c, row, n, m: json_reward(c, row[ANSWER])), (ANSWER,)
    if name == "pass@1":

        def passed(c, row, n, m):
            source = M.code_of(c).rstrip() + "\n\n" + row[TESTS] + "\n"
            return float(run_python(source, timeout_s=PASS_TIMEOUT_S).passed)

        return passed, (TESTS,)
    if name == "length":
        return (lambda c, row, n, m: -n / max(m, 1)), ()
    if name.startswith("length:"):
        cut = _length_cut(name)
        return (lambda c, row, n, m: -max(0, n - cut) / max(m - cut, 1)), ()
    if name.startswith("regex:"):
        rx = _regex(name[len("regex:") :], name)
        return (lambda c, row, n, m: float(rx.search(c) is not None)), ()
    if name.startswith("format:"):
        rx = _regex(name[len("format:") :], name)
        return (lambda c, row, n, m: float(rx.fullmatch(c.strip()) is not None)), ()
    raise KeyError(name)


def is_user_function(name: str) -> bool:
    return bool(_USER.match(name)) and not name.startswith(PREFIXED)


def name_problem(name: Any) -> Optional[str]:
    """What is wrong with a reward name (no import is tried), or None."""
    if not isinstance(name, str) or not name.strip():
        return f"expected a reward name, got {name!r}"
    if name in BUILTIN or is_user_function(name):
        return None
    if name.startswith(PREFIXED):
        try:
            _builtin(name)
        except RewardError as e:
            return str(e)
        return None
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"unknown reward '{name}'{hint}; built in: {', '.join(BUILTIN)}, regex:PATTERN, format:PATTERN, "
        f"length:N; or a function of yours as module:function"
    )


def _user_function(name: str) -> Callable:
    module, _, attr = name.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # a module of the user's next to where they run the command
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module raised while it loaded
        raise RewardError(f"reward {name}: cannot import module '{module}': {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name}: module '{module}' has no function '{attr}'")
    return lambda c, row, n, m: fn(c, row)


def weights_of(reward: Optional[str], rewards: Optional[dict]) -> dict[str, float]:
    """The configured rewards as {name: weight} (``train.reward`` is one of weight 1)."""
    if rewards:
        return {str(k): v for k, v in rewards.items()}
    return {reward: 1.0} if reward else {}


def build(reward: Optional[str], rewards: Optional[dict]) -> list[Reward]:
    """The reward functions of ``train.reward`` / ``train.rewards`` (names checked by
    :func:`mlx_lora.config.validate`); a user's module is imported here."""
    out = []
    for name, weight in weights_of(reward, rewards).items():
        problem = name_problem(name)
        if problem:
            raise RewardError(problem)
        if is_user_function(name) and name not in BUILTIN:
            out.append(Reward(name, float(weight), _user_function(name), user=True))
        else:
            fn, needs = _builtin(name)
            out.append(Reward(name, float(weight), fn, needs))
    return out


def check_rows(rewards: list[Reward], rows: list[tuple[int, dict]], path: str) -> None:
    """Refuse rows that lack a field a reward reads (``answer``, ``tests``), naming the first."""
    for line, row in rows:
        for r in rewards:
            for f in r.needs:
                value = row.get(f)
                if value is None:
                    raise DataError(
                        f"missing: reward {r.name} compares the completion with the row's '{f}'", path, line, f
                    )
                if f == TESTS and not isinstance(value, str):
                    raise DataError(f"expected Python source as a string, got {type(value).__name__}", path, line, f)


def call(r: Reward, completion: str, row: dict, tokens: int, max_tokens: int, path: str, line: int) -> float:
    """``r``'s value, checked: a reward that raises or gives no finite number is a DataError
    naming the row and the reward."""
    try:
        value = r.fn(completion, row, tokens, max_tokens)
    except Exception as e:
        raise DataError(f"reward {r.name} raised {type(e).__name__}: {one_line(e)}"[:300], path, line, r.name) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(
            f"reward {r.name} returned {type(value).__name__} {str(value)[:40]!r}, not a number", path, line, r.name
        )
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"reward {r.name} returned {value}, not a finite number", path, line, r.name)
    return value


def probe(rewards: list[Reward], rows: list[tuple[int, dict]], path: str, max_tokens: int) -> None:
    """Run every user function on each row with two completions (the row's answer, and an
    empty one) before training, so a function that fails on this data fails before anything is
    written. Built-in rewards never raise (the sandbox is not run here)."""
    for line, row in rows:
        answer = row.get(ANSWER)
        for completion in ("" if answer is None else _answer_text(answer), ""):
            for r in rewards:
                if r.user:
                    call(r, completion, row, 0, max_tokens, path, line)
