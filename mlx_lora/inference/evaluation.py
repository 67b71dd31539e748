"""Generation-based evaluation: test rows -> prompts and references, batched generation, scores.

A row of any training format with an answer becomes a prompt and a reference, rendered the way
training renders it (:mod:`mlx_lora.data.formats`), so a model is asked exactly what it was
trained to answer:

- chat / sharegpt: the messages before the last assistant turn, rendered by the chat template
  with a generation prompt; the reference is that assistant turn's content;
- completions: ``prompt``; the reference is ``completion``;
- alpaca: the Alpaca prompt of ``instruction`` and ``input``; the reference is ``output``;
- text rows have no reference and are refused.

A row may carry ``tests`` (Python source) for the ``pass@1`` metric (:mod:`mlx_lora.inference.metrics`).

Generation runs through the one generation engine (:mod:`mlx_lora.inference.engine`, continuous batching):
greedy by default, or sampled with a temperature and top-p, row ``i`` from seed ``seed + i``.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from mlx_lora.config import MAX_SEQ_LENGTH
from mlx_lora.data.examples import _Encoder, read_jsonl_rows
from mlx_lora.data.formats import ChatSample, PairSample, TextSample, file_samples, one_line, tname
from mlx_lora.data.templates import TemplateLimitError, resolve_chat_template
from mlx_lora.inference import metrics as M
from mlx_lora.inference.engine import Engine, Sampling, shared_length
from mlx_lora.plumbing.errors import DataError, MlxLoraError
from mlx_lora.plumbing.progress import Ticker

DEFAULT_BATCH_SIZE = 16
MIN_SHARED_PREFIX = 16
"""Prompts that all start with at least this many equal tokens have that start prefilled once."""
SHARED_PREFIX_CACHE = 256 * 2**20
"""Bytes of KV the prefix cache of a batch generation may hold (the shared start and recent rows)."""


# ---------------------------------------------------------------------------------------------
# prompt bounds

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")
"""Where a model's config.json gives its context length (the first one present counts)."""


class PromptTooLong(MlxLoraError):
    """A prompt that leaves no room in the model's context for the tokens asked for."""


def context_length(config: dict) -> Optional[int]:
    """The model's context length from its config (or its ``text_config``), None when unknown."""
    for conf in (config, config.get("text_config")):
        if isinstance(conf, dict):
            for key in CONTEXT_KEYS:
                v = conf.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


_TOKEN_CHARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_chars(tokenizer) -> int:
    """The most characters one token stands for (the longest vocabulary entry, at least 16): a
    text longer than this many characters per token cannot fit, whatever it tokenizes to."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        longest = max((len(t) for t in tokenizer.get_vocab() if isinstance(t, str)), default=0)
    except Exception:
        longest = 64
    n = max(16, longest)
    try:
        _TOKEN_CHARS[tokenizer] = n
    except TypeError:
        pass
    return n


def bound_prompt(
    tokenizer,
    text: str,
    *,
    context: Optional[int],
    max_tokens: int,
    encode: Optional[Callable[[str], list[int]]] = None,
    what: str = "the prompt",
) -> list[int]:
    """Token ids of the prompt ``text`` when it fits in the model's ``context`` (tokens; None:
    unknown, then :data:`~mlx_lora.config.MAX_SEQ_LENGTH`) with room for ``max_tokens`` new
    tokens; otherwise :class:`PromptTooLong`, one line saying by how much.

    Memory stays bounded whatever the text: a text longer than the room times twice the most
    characters a token can stand for (:func:`token_chars`) is refused before it is tokenized.
    ``encode`` turns text into ids (default: the tokenizer's ``encode``). Every prompt path
    (``generate``, ``chat``, ``eval --generate``) calls this one function."""
    limit = (context or MAX_SEQ_LENGTH) - max_tokens
    ctx = f"the model's context is {context} tokens" if context else f"at most {MAX_SEQ_LENGTH} tokens are allowed"
    if limit < 1:
        raise PromptTooLong(f"{max_tokens} new tokens leave no room for {what}: {ctx}; ask for fewer new tokens")
    max_chars = 2 * limit * token_chars(tokenizer)
    if len(text) > max_chars:
        raise PromptTooLong(
            f"{what} has {len(text):,} characters, far more than fit: {ctx}, {max_tokens} of them "
            f"kept for new tokens, so at most {limit:,} prompt tokens (checked before tokenizing)"
        )
    tokens = list(encode(text) if encode is not None else tokenizer.encode(text))
    if len(tokens) > limit:
        raise PromptTooLong(
            f"{what} has {len(tokens):,} tokens: {ctx} and {max_tokens} of them are kept for new "
            f"tokens, so at most {limit:,} prompt tokens fit; shorten it or ask for fewer new tokens"
        )
    return tokens


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
    """The checked row (:mod:`mlx_lora.data.formats`)."""


@dataclass
class EvalSet:
    path: str
    format: str
    rows: list[EvalRow]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) of the rows left out because their prompt does not fit (see :func:`bound_prompt`)."""


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
        raise DataError(
            "chat rows need a chat template and the tokenizer has none; pass --chat-template chatml "
            "(or a path to a .jinja file)",
            path,
            line,
        )
    try:
        return template.render(sample.messages[:last], tools=sample.tools, add_generation_prompt=True)
    except TemplateLimitError as e:
        raise DataError(f"chat template {template.name} {e} (rendering this row)", path, line, sample.key) from None
    except Exception as e:
        raise DataError(
            f"chat template ({template.name}) failed: {type(e).__name__}: {one_line(e)}", path, line, sample.key
        ) from None


def read_eval_set(path, *, fmt: str = "auto", limit: Optional[int] = None) -> EvalSet:
    """The rows of the JSONL file ``path`` (the first ``limit`` of them) with their references
    and tests, checked; no tokenizer needed, so a bad file fails before a model loads. The
    prompts are filled in by :func:`render_prompts`."""

    p = str(Path(path).expanduser())
    rows = read_jsonl_rows(p)
    if limit is not None:
        rows = rows[:limit]
    name, samples = file_samples(p, rows, fmt)
    if any(isinstance(s, TextSample) for s in samples):
        raise DataError(
            "text rows have no reference answer to score; eval --generate needs chat, sharegpt, "
            "completions or alpaca rows (loss and perplexity: eval without --generate)",
            p,
        )
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


def render_prompts(
    data: EvalSet, tokenizer, chat_template: Optional[str] = None, *, context: Optional[int] = None, max_tokens: int = 0
) -> EvalSet:
    """Fill in each row's prompt text and tokens: the chat template (``chat_template``, else the
    tokenizer's) for conversations, and the BOS token where training examples have one.

    A row whose prompt does not fit in ``context`` tokens with room for ``max_tokens`` new ones
    (:func:`bound_prompt`) is moved to ``data.skipped`` with the reason, never generated for."""

    chat = data.format in ("chat", "sharegpt")
    template = resolve_chat_template(chat_template, tokenizer) if chat else None
    enc = _Encoder(tokenizer, template)

    def encode(text: str) -> list[int]:
        tokens = enc.encode_many([text])[0]
        if enc.adds_bos and tokens[:1] != [enc.bos_id]:
            tokens = [enc.bos_id] + tokens  # as training examples start (data_formats.Sample.example)
        return tokens

    kept = []
    for row in data.rows:
        sample = row.sample
        row.prompt = (
            _chat_prompt(sample, template, data.path, row.line) if isinstance(sample, ChatSample) else sample.prompt
        )
        try:
            row.tokens = bound_prompt(tokenizer, row.prompt, context=context, max_tokens=max_tokens, encode=encode)
        except PromptTooLong as e:
            data.skipped.append((row.line, str(e)))
            row.prompt = ""  # a skipped row's text is not kept (it may be megabytes)
            continue
        if not row.tokens:
            raise DataError("the prompt is empty (no tokens)", data.path, row.line)
        kept.append(row)
    data.rows = kept
    return data


def load_eval_set(
    path, tokenizer, *, chat_template: Optional[str] = None, fmt: str = "auto", limit: Optional[int] = None
) -> EvalSet:
    """:func:`read_eval_set` then :func:`render_prompts`."""
    return render_prompts(read_eval_set(path, fmt=fmt, limit=limit), tokenizer, chat_template)


def check_metrics(metrics: Sequence[str], data: EvalSet) -> None:
    """Refuse, before any generation, rows a metric cannot score: ``pass@1`` needs ``tests`` on
    every row, ``json`` a reference that parses as JSON."""
    for row in data.rows:
        if "pass@1" in metrics and not (row.tests or "").strip():
            raise DataError(
                'missing: pass@1 runs each row\'s tests (Python source, e.g. "assert f(2) == 4")',
                data.path,
                row.line,
                M.TESTS_FIELD,
            )
        if "json" in metrics and not M.parse_json(row.reference)[0]:
            raise DataError(
                "the reference is not JSON, so the json metric cannot compare with it",
                data.path,
                row.line,
                row.reference_field,
            )


# ---------------------------------------------------------------------------------------------
# generation


def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    eos: set,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer=None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> list[list[int]]:
    """Continuations (token ids; a token in ``eos`` ends one and is left out) of several token
    prompts, in the order given, from the generation engine (:mod:`mlx_lora.inference.engine`) with at
    most ``batch_size`` rows decoding at once. Greedy when ``temperature`` is 0; otherwise row ``i``
    is sampled from seed ``seed + i``, keeping the smallest set of tokens whose probability reaches
    ``top_p``. ``on_rows(n)`` hears of each finished row (progress)."""
    prompts = [list(p) for p in prompts]
    shared = common_prefix(prompts) if len(prompts) > 1 else []
    warm = len(shared) >= MIN_SHARED_PREFIX
    engine = Engine(
        model, tokenizer, eos=eos, max_batch=batch_size, prompt_cache_bytes=SHARED_PREFIX_CACHE if warm else 0
    )
    try:
        if warm:
            # The prompts' common start (an eval set's system prompt and template) is prefilled
            # once: every row then takes it from the prefix cache and prefills only its own rest.
            engine.generate([shared], [Sampling(max_tokens=1)])
        samplings = [
            Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
            for i in range(len(prompts))
        ]
        return [r.tokens for r in engine.generate(prompts, samplings, on_done=on_rows)]
    finally:
        engine.close()


def common_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of tokens every prompt starts with."""
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = shared_length(first, p, n)
        if not n:
            break
    return list(first[:n])


def eos_ids(tokenizer) -> set:
    return set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_rows: Optional[Callable[[int], None]] = None,
) -> list[str]:
    """:func:`generate_tokens` decoded to text."""
    return [
        tokenizer.decode(g)
        for g in generate_tokens(
            model,
            prompts,
            max_tokens,
            eos_ids(tokenizer),
            batch_size=batch_size,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            tokenizer=tokenizer,
            on_rows=on_rows,
        )
    ]


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


def score(
    metrics: Sequence[str],
    rows: Sequence[EvalRow],
    outputs: Sequence[str],
    *,
    timeout_s: float = 10.0,
    workers: int = 2,
) -> Scores:
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


def generate_and_score(
    model,
    tokenizer,
    data: EvalSet,
    metrics: Sequence[str],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timeout_s: float = 10.0,
    desc: str = "generate",
    progress: bool = True,
) -> Scores:
    """Generate an answer for every row of ``data`` and score it; a run longer than a moment shows
    its rows as they finish (named ``desc``) unless ``progress`` is false."""
    if not data.rows:
        raise MlxLoraError(f"{data.path}: no rows to evaluate")
    t0 = time.perf_counter()
    with Ticker(len(data.rows), desc, unit="row", enabled=progress) as ticker:
        outputs = generate(
            model,
            tokenizer,
            [r.tokens for r in data.rows],
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            on_rows=ticker.update,
        )
    s = score(metrics, data.rows, outputs, timeout_s=timeout_s)
    s.seconds = time.perf_counter() - t0
    return s
