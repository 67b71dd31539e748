"""Generation-based evaluation: test rows -> prompts and references, batched generation, scores.

A row of any training format with an answer becomes a prompt and a reference, rendered the way
training renders it (:mod:`mlx_lora.data_formats`), so a model is asked exactly what it was
trained to answer:

- chat / sharegpt: the messages before the last assistant turn, rendered by the chat template
  with a generation prompt; the reference is that assistant turn's content;
- completions: ``prompt``; the reference is ``completion``;
- alpaca: the Alpaca prompt of ``instruction`` and ``input``; the reference is ``output``;
- text rows have no reference and are refused.

A row may carry ``tests`` (Python source) for the ``pass@1`` metric (:mod:`mlx_lora.metrics`).

Generation runs through the one generation engine (:mod:`mlx_lora.engine`, continuous batching):
greedy by default, or sampled with a temperature and top-p, row ``i`` from seed ``seed + i``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import metrics as M
from .data_formats import ChatSample, PairSample, TextSample, file_samples, one_line, tname
from .engine import Engine, Sampling
from .errors import DataError, MlxLoraError
from .templates import TemplateLimitError

DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalRow:
    line: int
    """1-based line of the row in its file."""
    prompt: str
    """The prompt as text (what the model continues)."""
    tokens: list[int]
    """The prompt's token ids (BOS included when the tokenizer adds one, as in training)."""
    reference: str
    reference_field: str
    """Where the reference is in the row, e.g. ``messages[1].content``."""
    tests: Optional[str] = None
    sample: object = field(default=None, repr=False)
    """The checked row (:mod:`mlx_lora.data_formats`)."""


@dataclass
class EvalSet:
    path: str
    format: str
    rows: list[EvalRow]


# ---------------------------------------------------------------------------------------------
# rows


def _chat_reference(sample: ChatSample, path: str, line: int) -> tuple[str, str]:
    """(reference, its field) of a conversation: its last assistant turn."""
    msgs = sample.messages
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("the conversation has no assistant turn to compare the output with", path, line, sample.key)
    content_key = "value" if sample.key == "conversations" else "content"
    where = f"{sample.key}[{last}].{content_key}"
    if not isinstance(msgs[last].get("content"), str):
        raise DataError("the last assistant turn has no text content to compare the output with", path, line, where)
    if last == 0:
        raise DataError("nothing comes before the last assistant turn: there is no prompt", path, line, where)
    return msgs[last]["content"], where


def _chat_prompt(sample: ChatSample, template, path: str, line: int) -> str:
    """The messages before the last assistant turn, rendered with a generation prompt."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    if template is None:
        raise DataError("chat rows need a chat template and the tokenizer has none; pass --chat-template chatml "
                        "(or a path to a .jinja file)", path, line)
    try:
        return template.render(sample.messages[:last], tools=sample.tools, add_generation_prompt=True)
    except TemplateLimitError as e:
        raise DataError(f"chat template {template.name} {e} (rendering this row)", path, line, sample.key) from None
    except Exception as e:
        raise DataError(f"chat template ({template.name}) failed: {type(e).__name__}: {one_line(e)}",
                        path, line, sample.key) from None


def read_eval_set(path, *, fmt: str = "auto", limit: Optional[int] = None) -> EvalSet:
    """The rows of the JSONL file ``path`` (the first ``limit`` of them) with their references
    and tests, checked; no tokenizer needed, so a bad file fails before a model loads. The
    prompts are filled in by :func:`render_prompts`."""
    from .data import read_jsonl_rows

    p = str(Path(path).expanduser())
    rows = read_jsonl_rows(p)
    if limit is not None:
        rows = rows[:limit]
    name, samples = file_samples(p, rows, fmt)
    if any(isinstance(s, TextSample) for s in samples):
        raise DataError("text rows have no reference answer to score; eval --generate needs chat, sharegpt, "
                        "completions or alpaca rows (loss and perplexity: eval without --generate)", p)
    out = []
    for (line, row), sample in zip(rows, samples):
        if isinstance(sample, ChatSample):
            ref, where = _chat_reference(sample, p, line)
        else:
            assert isinstance(sample, PairSample)
            ref, where = sample.completion, "completion" if name == "completions" else "output"
        tests = row.get(M.TESTS_FIELD)
        if tests is not None and not isinstance(tests, str):
            raise DataError(f"expected Python source as a string, got {tname(tests)}", p, line, M.TESTS_FIELD)
        out.append(EvalRow(line, "", [], ref, where, tests, sample))
    return EvalSet(p, name, out)


def render_prompts(data: EvalSet, tokenizer, chat_template: Optional[str] = None) -> EvalSet:
    """Fill in each row's prompt text and tokens: the chat template (``chat_template``, else the
    tokenizer's) for conversations, and the BOS token where training examples have one."""
    from .data import _Encoder
    from .templates import resolve_chat_template

    chat = data.format in ("chat", "sharegpt")
    template = resolve_chat_template(chat_template, tokenizer) if chat else None
    enc = _Encoder(tokenizer, template)
    for row in data.rows:
        sample = row.sample
        row.prompt = (_chat_prompt(sample, template, data.path, row.line) if isinstance(sample, ChatSample)
                      else sample.prompt)
    for row, tokens in zip(data.rows, enc.encode_many([r.prompt for r in data.rows])):
        if enc.adds_bos and tokens[:1] != [enc.bos_id]:
            tokens = [enc.bos_id] + tokens  # as training examples start (data_formats.Sample.example)
        if not tokens:
            raise DataError("the prompt is empty (no tokens)", data.path, row.line)
        row.tokens = tokens
    return data


def load_eval_set(path, tokenizer, *, chat_template: Optional[str] = None, fmt: str = "auto",
                  limit: Optional[int] = None) -> EvalSet:
    """:func:`read_eval_set` then :func:`render_prompts`."""
    return render_prompts(read_eval_set(path, fmt=fmt, limit=limit), tokenizer, chat_template)


def check_metrics(metrics: Sequence[str], data: EvalSet) -> None:
    """Refuse, before any generation, rows a metric cannot score: ``pass@1`` needs ``tests`` on
    every row, ``json`` a reference that parses as JSON."""
    for row in data.rows:
        if "pass@1" in metrics and not (row.tests or "").strip():
            raise DataError("missing: pass@1 runs each row's tests (Python source, e.g. \"assert f(2) == 4\")",
                            data.path, row.line, M.TESTS_FIELD)
        if "json" in metrics and not M.parse_json(row.reference)[0]:
            raise DataError("the reference is not JSON, so the json metric cannot compare with it", data.path,
                            row.line, row.reference_field)


# ---------------------------------------------------------------------------------------------
# generation


def generate_tokens(model, prompts: Sequence[Sequence[int]], max_tokens: int, eos: set, *,
                    batch_size: int = DEFAULT_BATCH_SIZE, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0, tokenizer=None) -> list[list[int]]:
    """Continuations (token ids; a token in ``eos`` ends one and is left out) of several token
    prompts, in the order given, from the generation engine (:mod:`mlx_lora.engine`) with at most
    ``batch_size`` rows decoding at once. Greedy when ``temperature`` is 0; otherwise row ``i`` is
    sampled from seed ``seed + i``, keeping the smallest set of tokens whose probability reaches
    ``top_p``."""
    engine = Engine(model, tokenizer, eos=eos, max_batch=batch_size, prompt_cache_bytes=0)
    try:
        samplings = [Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
                     for i in range(len(prompts))]
        return [r.tokens for r in engine.generate([list(p) for p in prompts], samplings)]
    finally:
        engine.close()


def eos_ids(tokenizer) -> set:
    return set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """:func:`generate_tokens` decoded to text."""
    return [tokenizer.decode(g) for g in generate_tokens(model, prompts, max_tokens, eos_ids(tokenizer),
                                                         batch_size=batch_size, temperature=temperature, top_p=top_p,
                                                         seed=seed, tokenizer=tokenizer)]


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass
class Scores:
    """Per-row scores (column -> value) and their means, for one model's outputs."""

    outputs: list[str]
    rows: list[dict]
    means: dict[str, float]
    seconds: float = 0.0
    statuses: list[Optional[str]] = field(default_factory=list)
    """pass@1 only: the sandbox's verdict per row (passed, failed, timeout, crashed)."""


def columns(metrics: Sequence[str]) -> list[str]:
    return [c for m in metrics for c in M.COLUMNS[m]]


def score(metrics: Sequence[str], rows: Sequence[EvalRow], outputs: Sequence[str], *,
          timeout_s: float = 10.0, workers: int = 2) -> Scores:
    """Every metric of ``metrics`` on every row (pass@1 runs ``workers`` sandboxes at a time)."""
    per_row: list[dict] = [{} for _ in rows]
    statuses: list[Optional[str]] = [None] * len(rows)
    for k, (row, out) in enumerate(zip(rows, outputs)):
        s = per_row[k]
        if "exact" in metrics:
            s["exact"] = M.exact(out, row.reference)
        if "contains" in metrics:
            s["contains"] = M.contains(out, row.reference)
        if "json" in metrics:
            s.update(M.json_scores(out, M.parse_json(row.reference)[1]))
        if "rouge-l" in metrics:
            s["rouge-l"] = M.rouge_l(out, row.reference)
    if "pass@1" in metrics:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda ro: M.pass_at_1(ro[1], ro[0].tests or "", timeout_s), zip(rows, outputs)))
        for k, (value, status) in enumerate(results):
            per_row[k]["pass@1"], statuses[k] = value, status
    cols = columns(metrics)
    means = {c: sum(s[c] for s in per_row) / max(len(per_row), 1) for c in cols}
    return Scores(list(outputs), per_row, means, statuses=statuses)


def generate_and_score(model, tokenizer, data: EvalSet, metrics: Sequence[str], *, max_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = DEFAULT_BATCH_SIZE, timeout_s: float = 10.0) -> Scores:
    """Generate an answer for every row of ``data`` and score it."""
    if not data.rows:
        raise MlxLoraError(f"{data.path}: no rows to evaluate")
    t0 = time.perf_counter()
    outputs = generate(model, tokenizer, [r.tokens for r in data.rows], max_tokens, temperature=temperature,
                       top_p=top_p, seed=seed, batch_size=batch_size)
    s = score(metrics, data.rows, outputs, timeout_s=timeout_s)
    s.seconds = time.perf_counter() - t0
    return s
