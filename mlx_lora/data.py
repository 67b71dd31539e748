"""Training data: JSONL rows -> tokenized examples with a target mask -> padded or packed batches.

An example is ``(tokens, mask)``: ``mask[i]`` is True when token ``i`` is a target, i.e. the loss
includes ``-log p(tokens[i] | tokens[:i])``. ``mask[0]`` is always False (nothing predicts the first
token). A batch row built from an example holds ``inputs = tokens[:-1]``, ``targets = tokens[1:]``
and ``loss_mask = mask[1:]``, so an example of ``n`` tokens fills ``n - 1`` positions.

Formats (detected per file from the first row's keys, or forced with ``data.format``):

==========  ======================================  ==========================================
format      keys                                    targets (``train_on: assistant``)
==========  ======================================  ==========================================
chat        messages: [{role, content}], tools?     every assistant turn, end-of-turn included
sharegpt    conversations: [{from, value}]          as chat (from: human/user/gpt/assistant/system)
completions prompt, completion                      completion + EOS
alpaca      instruction, input?, output             output + EOS, after the Alpaca prompt
text        text                                    every token
==========  ======================================  ==========================================
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .config import DataConfig
from .errors import DataError
from .templates import ChatTemplate, TemplateLimitError, alpaca_prompt, resolve_chat_template, template_from_source

log = logging.getLogger(__name__)

FORMATS = ("chat", "completions", "text", "alpaca", "sharegpt")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Keys that identify a format, in the order detection tries them.
_SIGNATURES = (
    ("chat", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("completions", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)
PAD_MULTIPLE = 32
"""Batches are padded to a multiple of this many positions, so compiled steps see few shapes."""
BUCKET_BATCHES = 50
"""Global batches per length-sorted chunk: larger chunks pad less but make batches less random."""
_CACHE_VERSION = 1
_OK, _TRUNCATED, _SKIPPED = 0, 1, 2
_ENCODE_BLOCK = 512  # rows rendered and tokenized together (one batched tokenizer call)

# Work per row is bounded by what data.max_seq_length can use: a text longer than
# _CHARS_PER_TOKEN * (max_seq_length + _CUT_MARGIN) characters is cut (at a space where it can be)
# before it is tokenized. Tokenizers average 3-5 characters per token on prose and fewer on code or
# other scripts, so 16 leaves the cut several times max_seq_length tokens away; a text that still
# yields too few tokens (long runs of one character, say) is cut again with 4 times the characters,
# so the result never depends on this factor, only the work does. The last _CUT_MARGIN tokens of a
# cut text are not trusted: a word split by the cut may tokenize differently from the whole word.
_CHARS_PER_TOKEN = 16
_CUT_MARGIN = 32
# Keys each format reads: the only values checked for valid Unicode (other keys are never used).
_USED_KEYS = {
    "chat": ("messages", "tools"),
    "sharegpt": ("conversations", "tools"),
    "completions": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
}
_SURROGATE = re.compile("[\ud800-\udfff]")
# Message keys a chat template reads as text, when present.
_TEXT_KEYS = ("name", "tool_call_id")


# ----------------------------------------------------------------------------------------------
# datasets


@dataclass
class DataStats:
    """What became of one file (or split): rows read, examples kept, and why the rest were not."""

    path: str
    format: str
    rows: int
    examples: int
    truncated: int
    """Examples cut to data.max_seq_length (kept)."""
    skipped: int
    """Rows dropped: too long with data.overlong: skip, or no target token left."""
    target_tokens: int
    total_tokens: int

    def summary(self) -> str:
        return (
            f"{self.path} ({self.format}): {self.rows} rows -> {self.examples} examples, "
            f"{self.truncated} truncated, {self.skipped} skipped, "
            f"{self.target_tokens:,} target of {self.total_tokens:,} tokens"
        )


@dataclass
class TokenizedDataset:
    examples: list[tuple[np.ndarray, np.ndarray]]
    """(token ids int32 [n], target mask bool [n]) per example."""
    stats: DataStats
    lines: Optional[np.ndarray] = None
    """1-based source line of each example."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t, _ in self.examples), dtype=np.int64, count=len(self.examples))


@dataclass
class DataSplits:
    train: Optional[TokenizedDataset]
    """None only when "train" was not among the requested splits."""
    valid: Optional[TokenizedDataset]
    test: Optional[TokenizedDataset]


def _tname(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 40) -> str:
    """A value for a one-line message: repr (escapes newlines and surrogates), cut to ``limit``."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _key(k: Any) -> str:
    """A JSON key as part of a field name, escaped when it would not print on one line."""
    return k if isinstance(k, str) and k.isprintable() and not _SURROGATE.search(k) else json.dumps(k)[1:-1]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_unicode(value: Any, path: str, line: int, field: str) -> None:
    """Refuse a lone surrogate (JSON "\\ud800" without its pair) anywhere in ``value``: it is not
    text, and tokenizers and templates fail on it deep inside with no row to blame."""
    stack = [(value, field)]
    while stack:
        v, f = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                raise DataError("not valid Unicode (lone surrogate)", path, line, f)
        elif isinstance(v, dict):
            for k, x in reversed(v.items()):  # reversed onto the stack: reported in file order
                if _SURROGATE.search(k):
                    raise DataError("not valid Unicode (lone surrogate in a key)", path, line, f"{f}.{_key(k)}")
                stack.append((x, f"{f}.{_key(k)}"))
        elif isinstance(v, list):
            stack.extend((x, f"{f}[{i}]") for i, x in reversed(list(enumerate(v))))


# ----------------------------------------------------------------------------------------------
# reading and checking rows


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError("no such file", str(path))
    if not path.is_file():
        raise DataError("not a file", str(path))
    return path.read_bytes()


def _parse_rows(path: Path, data: bytes) -> list[tuple[int, dict]]:
    """(1-based line, JSON object) for every non-blank line."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    rows = []
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", str(path), line
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", str(path), line) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", str(path), line) from None
        except ValueError as e:  # an integer of more digits than Python converts (4300 by default)
            what = "a number with too many digits" if "digits" in str(e) else _one_line(e)
            raise DataError(f"invalid JSON: {what}", str(path), line) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {_tname(obj)}", str(path), line)
        rows.append((line, obj))
    if not rows:
        raise DataError("empty file: no JSON rows", str(path))
    return rows


def detect_format(row: dict) -> Optional[str]:
    """The format whose keys ``row`` has, or None."""
    for fmt, keys in _SIGNATURES:
        if all(k in row for k in keys):
            return fmt
    return None


def _check_messages(msgs: Any, key: str, path: str, line: int, sharegpt: bool) -> list[dict]:
    """Validated messages as fresh {role, content, ...} dicts (sharegpt turns converted)."""
    if not isinstance(msgs, list):
        raise DataError(f"expected a list of messages, got {_tname(msgs)}", path, line, key)
    if not msgs:
        raise DataError("empty conversation", path, line, key)
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = tuple(SHAREGPT_ROLES) if sharegpt else CHAT_ROLES
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"expected an object with '{role_key}' and '{content_key}', got {_tname(m)}", path, line, where)
        if role_key not in m:
            raise DataError("missing key", path, line, f"{where}.{role_key}")
        role = m[role_key]
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"unknown role {_short(role)}; expected one of {', '.join(roles)}", path, line,
                            f"{where}.{role_key}")
        content = m.get(content_key)
        if sharegpt:
            if not isinstance(content, str):
                raise DataError(f"expected a string, got {_tname(content)}", path, line, f"{where}.{content_key}")
            out.append({"role": SHAREGPT_ROLES[role], "content": content})
            continue
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise DataError(f"expected a list of tool calls, got {_tname(calls)}", path, line,
                                f"{where}.tool_calls")
            for j, call in enumerate(calls):
                if not isinstance(call, dict):
                    raise DataError(f"expected a tool call object, got {_tname(call)}", path, line,
                                    f"{where}.tool_calls[{j}]")
        for k in _TEXT_KEYS:
            if m.get(k) is not None and not isinstance(m[k], str):
                raise DataError(f"expected a string, got {_tname(m[k])}", path, line, f"{where}.{k}")
        # An assistant turn that only calls tools may have null or no content.
        if not isinstance(content, str) and not (content is None and role == "assistant" and calls):
            what = "missing key" if content_key not in m else f"expected a string, got {_tname(content)}"
            raise DataError(what, path, line, f"{where}.{content_key}")
        out.append(dict(m))
    return out


def _check_tools(row: dict, path: str, line: int) -> Optional[list]:
    tools = row.get("tools")
    if isinstance(tools, str):  # some datasets store the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError("expected a list of tools (or a JSON string of one)", path, line, "tools") from None
        _check_unicode(tools, path, line, "tools")  # its \uXXXX escapes are decoded only now
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"expected a list of tools, got {_tname(tools)}", path, line, "tools")
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):  # chat templates take JSON schemas (objects) only
            raise DataError(f"expected a tool object (JSON schema), got {_tname(tool)}", path, line, f"tools[{i}]")
    return tools or None


def _sample(row: dict, fmt: str, path: str, line: int, why: str) -> tuple:
    """A checked row as ("chat", messages, tools, key), ("pair", prompt, completion) or ("text", text)."""
    needed = dict(_SIGNATURES)[fmt]
    for k in needed:
        if k not in row:
            other = detect_format(row)
            if other is not None:
                msg = f"row is in {other} format but the file is {fmt} ({why})"
            else:
                msg = f"missing key ({fmt} rows need {', '.join(needed)}; {why})"
            raise DataError(msg, path, line, k)
    for k in _USED_KEYS[fmt]:
        if k in row:
            _check_unicode(row[k], path, line, k)

    def text(key: str, optional: bool = False) -> str:
        v = row.get(key)
        if optional and v is None:
            return ""
        if not isinstance(v, str):
            raise DataError(f"expected a string, got {_tname(v)}", path, line, key)
        return v

    if fmt == "chat":
        msgs = _check_messages(row["messages"], "messages", path, line, False)
        return ("chat", msgs, _check_tools(row, path, line), "messages")
    if fmt == "sharegpt":
        msgs = _check_messages(row["conversations"], "conversations", path, line, True)
        return ("chat", msgs, _check_tools(row, path, line), "conversations")
    if fmt == "completions":
        return ("pair", text("prompt"), text("completion"))
    if fmt == "alpaca":
        return ("pair", alpaca_prompt(text("instruction"), text("input", optional=True)), text("output"))
    return ("text", text("text"))


def _samples(path: Path, rows: list[tuple[int, dict]], fmt_cfg: str) -> tuple[str, list[tuple]]:
    p = str(path)
    first_line, first = rows[0]
    if fmt_cfg == "auto":
        fmt = detect_format(first)
        if fmt is None:
            keys = ", ".join(_key(k) for k in sorted(first)[:20]) or "none"
            expected = "; ".join(f"{f}: {'+'.join(k)}" for f, k in _SIGNATURES)
            raise DataError(f"unknown format: keys {keys} match no format ({expected}); set data.format", p, first_line)
        why = f"detected from line {first_line}"
    elif fmt_cfg in FORMATS:
        fmt, why = fmt_cfg, f"data.format is {fmt_cfg}"
    else:
        raise DataError(f"unknown format '{fmt_cfg}'; expected auto or one of {', '.join(FORMATS)}", p, field="data.format")
    return fmt, [_sample(row, fmt, p, line, why) for line, row in rows]


# ----------------------------------------------------------------------------------------------
# tokenizing and masking


def _int_or_none(v) -> Optional[int]:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


class _Encoder:
    """The tokenizer facts tokenization depends on, plus batched encoding."""

    def __init__(self, tokenizer, template: Optional[ChatTemplate]):
        self.tokenizer, self.template = tokenizer, template
        self.bos_id = _int_or_none(getattr(tokenizer, "bos_token_id", None))
        self.eos_id = _int_or_none(getattr(tokenizer, "eos_token_id", None))
        probe = list(tokenizer.encode("a", add_special_tokens=True))
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        # mlx-lm's TokenizerWrapper forwards attributes but not calls; batch through the HF tokenizer.
        inner = getattr(tokenizer, "_tokenizer", None) if type(tokenizer).__name__ == "TokenizerWrapper" else tokenizer
        self._batch = inner if callable(inner) and hasattr(inner, "convert_ids_to_tokens") else None
        self.size = self._size()  # ids the tokenizer produces are below this (None: it does not say)

    def _size(self) -> Optional[int]:
        for obj in (self.tokenizer, getattr(self.tokenizer, "_tokenizer", None)):
            try:
                return int(len(obj))
            except TypeError:
                continue
        return _int_or_none(getattr(self.tokenizer, "vocab_size", None))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._batch is not None:
            try:
                return [list(ids) for ids in self._batch(texts, add_special_tokens=False)["input_ids"]]
            except Exception:  # not an HF-style tokenizer after all; encode one text at a time
                self._batch = None
        return [list(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    def identity(self) -> dict:
        tok = self.tokenizer
        size = None
        for obj in (tok, getattr(tok, "_tokenizer", None)):
            try:
                size = len(obj)
                break
            except TypeError:
                continue
        probe = "Hello, world! <|im_start|>user\n  tabs\tand ünïcödé 12345<|im_end|></s><s>"
        ids = self.encode_many([probe])[0]
        return {
            "name": str(getattr(tok, "name_or_path", "")),
            "vocab_size": _int_or_none(getattr(tok, "vocab_size", None)),
            "len": size,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "adds_bos": self.adds_bos,
            "probe": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest(),
            "template": self.template.fingerprint if self.template is not None else None,
        }


def _target_turns(msgs: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant messages whose tokens are targets (none needed for ``all``)."""
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return [] if train_on == "all" else assistant[-1:] if train_on == "last" else assistant


def _generation_prompt(enc: _Encoder, tools) -> str:
    """The template's text before an assistant turn that opens the conversation. transformers
    refuses to render an empty conversation, so a tokenizer's Jinja template is rendered here
    directly (the prefix check in _assemble still verifies that it fits the full rendering)."""
    try:
        return enc.template.render([], tools=tools, add_generation_prompt=True)
    except Exception:
        source = getattr(enc.tokenizer, "chat_template", None)
        if not isinstance(source, str):
            raise
        if getattr(enc, "_own_template", None) is None:
            enc._own_template = template_from_source(source, enc.template.name, enc.tokenizer)
        return enc._own_template.render([], tools=tools, add_generation_prompt=True)


def _render_chat(sample: tuple, enc: _Encoder, train_on: str, path: str, line: int) -> Iterator:
    """Texts whose tokens locate the target turns: yields the whole conversation, then for each
    target assistant turn i a pair: the prefix up to its header (messages[:i] + generation prompt)
    and the prefix through its end (messages[:i+1]). A generator, so that a long conversation's
    turns past max_seq_length need not be rendered at all (see _chat_by_turns)."""
    _, msgs, tools, key = sample
    if enc.template is None:
        raise DataError(
            "chat rows need a chat template and the tokenizer has none; set data.chat_template: chatml "
            "(or a path to a .jinja file)",
            path,
            line,
        )
    try:
        whole = enc.template.render(msgs, tools=tools)
        yield whole
        for i in _target_turns(msgs, train_on):
            head = (_generation_prompt(enc, tools) if i == 0 else
                    enc.template.render(msgs[:i], tools=tools, add_generation_prompt=True))
            yield head, (whole if i == len(msgs) - 1 else enc.template.render(msgs[: i + 1], tools=tools))
    except TemplateLimitError as e:
        raise DataError(f"chat template {enc.template.name} {e} (rendering this row)", path, line, key) from None
    except Exception as e:
        raise DataError(f"chat template ({enc.template.name}) failed: {type(e).__name__}: {_one_line(e)}",
                        path, line, key) from None


def _cut(text: str, chars: int) -> tuple[str, bool]:
    """``text`` cut to at most ``chars`` characters, at the last space or newline of the final
    quarter when there is one (a word boundary tokenizes the same cut or not); and whether it was cut."""
    if len(text) <= chars:
        return text, False
    at = max(text.rfind(c, chars * 3 // 4, chars) for c in " \n\t")
    return text[: at if at > 0 else chars], True


def _chat_by_turns(turns: Iterator, whole: str, enc: _Encoder, chars: int, max_len: int):
    """(token ids, cut flags) of a long conversation: the whole conversation (cut), then the
    prefixes of its target turns, each tokenized as soon as it is rendered, up to the first turn
    that ends past ``max_len`` tokens. Later turns start past it too (their prefixes extend that
    one), so they have no target within max_seq_length and are neither rendered nor tokenized:
    rendering and tokenizing the prefixes of every turn costs time quadratic in the length of a
    conversation of many turns."""
    text, cut = _cut(whole, chars)
    ids, cuts = enc.encode_many([text]), [cut]
    for head, end in turns:
        pair = [_cut(head, chars), _cut(end, chars)]
        ids += enc.encode_many([t for t, _ in pair])
        cuts += [c for _, c in pair]
        if len(ids[-1]) - _CUT_MARGIN >= max_len:  # the margin covers a token merged across the boundary
            break
    return ids, cuts


def _row_texts(sample: tuple, enc: _Encoder, cfg: DataConfig, path: str, line: int, chars: int):
    """(texts to tokenize, which of them were cut, token ids or None) for one row, each text at most
    ``chars`` characters. A long conversation comes back tokenized already (see _chat_by_turns):
    one that is cut, or whose prefixes would add up to several times ``chars`` characters."""
    if sample[0] == "chat":
        turns = _render_chat(sample, enc, cfg.train_on, path, line)
        whole = next(turns)
        if len(whole) > chars or len(whole) * len(_target_turns(sample[1], cfg.train_on)) > 4 * chars:
            ids, cuts = _chat_by_turns(turns, whole, enc, chars, cfg.max_seq_length)
            turns.close()
            return None, cuts, ids
        texts = [whole] + [t for pair in turns for t in pair]
    else:
        texts = list(sample[1:])
    cut = [_cut(t, chars) for t in texts]
    if sample[0] == "pair" and cut[0][1]:
        cut[1] = ("", True)  # the completion starts past the cut prompt: nothing of it is needed
    return [t for t, _ in cut], [c for _, c in cut], None


def _trusted(ids: list[int], cut: bool) -> int:
    return len(ids) - _CUT_MARGIN if cut else len(ids)


def _window_known(sample: tuple, ids: list[list[int]], cut: list[bool], max_len: int) -> bool:
    """Whether the tokens of the (cut) texts settle the first ``max_len`` tokens of the example:
    every cut text reaches past them with tokens it can trust."""
    if not any(cut):
        return True
    if sample[0] == "pair":
        if cut[0]:
            return _trusted(ids[0], True) > max_len
        return len(ids[0]) + _trusted(ids[1], True) > max_len
    return all(_trusted(t, True) > max_len for t, c in zip(ids, cut) if c)


def _assemble(sample: tuple, ids: list[list[int]], enc: _Encoder, train_on: str, path: str, line: int,
              cut: Optional[list[bool]] = None):
    """(tokens int32, mask bool) of one row from the encodings of its texts. A text that was cut
    (see _window_known) is compared and used only as far as it can be trusted; the tokens past
    that lie beyond max_seq_length and are truncated away."""
    kind = sample[0]
    cut = cut or [False] * len(ids)
    spans: list[tuple[int, int]] = []
    if kind == "chat":
        tokens = ids[0]
        known = _trusted(tokens, cut[0])
        for k, i in enumerate(_target_turns(sample[1], train_on)):
            if 2 + 2 * k >= len(ids):  # this turn and the rest start past max_seq_length (see _chat_by_turns)
                break
            head, end = ids[1 + 2 * k], ids[2 + 2 * k]
            for part, part_cut in ((head, cut[1 + 2 * k]), (end, cut[2 + 2 * k])):
                n = min(_trusted(part, part_cut), known)
                # A prefix longer than the whole (uncut) conversation cannot be a prefix of it.
                longer = not cut[0] and (part_cut or len(part) > len(tokens))
                if longer or tokens[:n] != part[:n]:
                    raise DataError(
                        "template does not tokenize consistently: the conversation rendered up to this "
                        "assistant turn does not tokenize to a prefix of the whole conversation's tokens, "
                        "so its target tokens cannot be located; use data.train_on: all, or another "
                        "data.chat_template (e.g. chatml)",
                        path,
                        line,
                        f"{sample[3]}[{i}]",
                    )
            spans.append((len(head), len(end)))
    elif kind == "pair":
        prompt, completion = ids
        if cut[0]:  # the completion lies past max_seq_length
            tokens = list(prompt)
            spans.append((len(tokens), len(tokens)))
        else:
            eos = enc.eos_id is not None and not cut[1]
            tokens = prompt + completion
            spans.append((len(prompt), len(tokens) + eos))
            if eos:
                tokens = tokens + [enc.eos_id]
    else:
        eos = enc.eos_id is not None and not cut[0] and ids[0][-1:] != [enc.eos_id]
        tokens = ids[0] + ([enc.eos_id] if eos else [])
    shift = 0
    if enc.adds_bos and tokens[:1] != [enc.bos_id]:
        tokens, shift = [enc.bos_id] + tokens, 1
    mask = np.zeros(len(tokens), dtype=bool)
    if kind == "text" or train_on == "all":
        mask[:] = True
    for a, b in spans:
        mask[a + shift : b + shift] = True
    mask[:1] = False  # nothing predicts the first token
    return np.asarray(tokens, dtype=np.int32), mask


def _why_no_target(sample: tuple, cfg: DataConfig, truncated: bool) -> tuple[Optional[str], str]:
    """(field, reason) for a row that kept no target token."""
    if sample[0] == "chat" and cfg.train_on != "all" and not any(m["role"] == "assistant" for m in sample[1]):
        return sample[3], "the conversation has no assistant turn (data.train_on: all would train on every token)"
    if truncated:
        return None, f"its target tokens lie past data.max_seq_length={cfg.max_seq_length}"
    return None, "it has no target token"


@dataclass
class _FileData:
    """Everything tokenization produced for one file; what the cache stores."""

    path: str
    format: str
    lines: np.ndarray  # int64 [rows] source line of each row
    status: np.ndarray  # int8 [rows] _OK, _TRUNCATED or _SKIPPED
    tokens: np.ndarray  # int32 [total] examples concatenated
    mask: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [examples + 1]
    ex_rows: np.ndarray  # int64 [examples] row index of each example


def _tokenize_file(path: Path, data: bytes, cfg: DataConfig, enc: _Encoder) -> _FileData:
    p = str(path)
    rows = _parse_rows(path, data)
    fmt, samples = _samples(path, rows, cfg.format)
    status = np.zeros(len(rows), dtype=np.int8)
    examples, ex_rows = [], []
    first_skip = None  # (line, field, why) of the first row dropped: says why when nothing is left
    max_len = cfg.max_seq_length
    budget = _CHARS_PER_TOKEN * (max_len + _CUT_MARGIN)
    for start in range(0, len(rows), _ENCODE_BLOCK):
        block = range(start, min(start + _ENCODE_BLOCK, len(rows)))
        texts, rows_texts = [], []
        for r in block:
            t, c, pre = _row_texts(samples[r], enc, cfg, p, rows[r][0], budget)
            texts += t or []
            rows_texts.append((r, len(t or []), c, pre))
        ids = enc.encode_many(texts)
        at = 0
        for r, n, row_cut, pre in rows_texts:
            line = rows[r][0]
            row_ids, chars = (ids[at : at + n] if pre is None else pre), budget
            at += n
            while not _window_known(samples[r], row_ids, row_cut, max_len):
                chars *= 4  # too few tokens before the cut (see _CHARS_PER_TOKEN): cut later
                t, row_cut, pre = _row_texts(samples[r], enc, cfg, p, line, chars)
                row_ids = enc.encode_many(t) if pre is None else pre
            tokens, mask = _assemble(samples[r], row_ids, enc, cfg.train_on, p, line, row_cut)
            if len(tokens) > max_len:
                # A cut row's length is known only to exceed max_seq_length.
                size = f"is {len(tokens)} tokens, longer than" if not any(row_cut) else "is longer than"
                if cfg.overlong == "error":
                    raise DataError(
                        f"example {size} data.max_seq_length={max_len} "
                        "(data.overlong is error; truncate or skip would keep going)",
                        p,
                        line,
                    )
                if cfg.overlong == "skip":
                    status[r] = _SKIPPED
                    first_skip = first_skip or (line, None, f"it {size} data.max_seq_length and data.overlong is skip")
                    continue
                tokens, mask = tokens[:max_len], mask[:max_len]
                status[r] = _TRUNCATED
            if not mask.any():
                first_skip = first_skip or (line, *_why_no_target(samples[r], cfg, status[r] == _TRUNCATED))
                status[r] = _SKIPPED
                continue
            examples.append((tokens, mask))
            ex_rows.append(r)
    if not examples:
        line, field, why = first_skip
        raise DataError(
            f"nothing to learn: none of the {len(rows)} rows has a target token after masking and "
            f"truncation (data.train_on: {cfg.train_on}, data.max_seq_length: {cfg.max_seq_length}); "
            f"the first, line {line}: {why}",
            p,
            line,
            field,
        )
    lengths = np.array([len(t) for t, _ in examples], dtype=np.int64)
    return _FileData(
        path=p,
        format=fmt,
        lines=np.array([line for line, _ in rows], dtype=np.int64),
        status=status,
        tokens=np.concatenate([t for t, _ in examples]),
        mask=np.concatenate([m for _, m in examples]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        ex_rows=np.array(ex_rows, dtype=np.int64),
    )


def _dataset(fd: _FileData, rows: Optional[np.ndarray] = None) -> TokenizedDataset:
    """The examples of ``fd`` whose rows are selected (bool [rows]; all when None)."""
    sel = np.ones(len(fd.lines), dtype=bool) if rows is None else rows
    keep = np.flatnonzero(sel[fd.ex_rows])
    o = fd.offsets
    examples = [(fd.tokens[o[i] : o[i + 1]], fd.mask[o[i] : o[i + 1]]) for i in keep]
    stats = DataStats(
        path=fd.path,
        format=fd.format,
        rows=int(sel.sum()),
        examples=len(examples),
        truncated=int(((fd.status == _TRUNCATED) & sel).sum()),
        skipped=int(((fd.status == _SKIPPED) & sel).sum()),
        target_tokens=int(sum(int(m.sum()) for _, m in examples)),
        total_tokens=int(sum(len(t) for t, _ in examples)),
    )
    return TokenizedDataset(examples, stats, fd.lines[fd.ex_rows[keep]])


# ----------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    """$MLX_LORA_CACHE/data when set, else ~/.cache/mlx-lora/data."""
    root = os.environ.get("MLX_LORA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-lora") / "data"


def _cache_path(cache_dir: Path, path: Path, file_sha: str, cfg: DataConfig, enc: _Encoder) -> Path:
    key = {
        "version": _CACHE_VERSION,
        "file": file_sha,
        "tokenizer": enc.identity(),
        "data": {k: getattr(cfg, k) for k in ("format", "max_seq_length", "train_on", "chat_template", "overlong")},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{path.stem}-{digest[:40]}.npz"


def _write_cache(cpath: Path, fd: _FileData) -> None:
    tmp = None
    try:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=cpath.parent, prefix=f".{cpath.stem}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as f:
            np.savez(
                f,
                format=np.array(fd.format),
                lines=fd.lines,
                status=fd.status,
                tokens=fd.tokens,
                mask=fd.mask,
                offsets=fd.offsets,
                ex_rows=fd.ex_rows,
            )
        os.replace(tmp, cpath)
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("could not write the data cache %s: %s", cpath, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _cache_problem(z, n_lines: int, vocab: Optional[int], max_len: int) -> Optional[str]:
    """What makes the arrays of a cache file unusable, or None. Training indexes the embedding
    with these ids and slices batches by these offsets, so anything out of range or out of shape
    would crash it (or silently train on garbage) instead of failing here."""
    ints = ("lines", "status", "tokens", "offsets", "ex_rows")
    for name in ints + ("mask",):
        a = z[name]
        if a.ndim != 1 or a.dtype.kind not in ("b" if name == "mask" else "iu"):
            return f"'{name}' is not a vector of {'booleans' if name == 'mask' else 'integers'}"
    if z["format"].ndim != 0 or str(z["format"]) not in FORMATS:
        return "unknown format"
    lines, status, tokens, offsets, ex_rows, mask = (z[n] for n in (*ints, "mask"))
    k = len(ex_rows)
    if not (len(status) == len(lines) and 0 < k <= len(lines) and len(offsets) == k + 1):
        return "arrays of inconsistent lengths"
    if not (offsets[0] == 0 and offsets[-1] == len(tokens) == len(mask)):
        return "offsets do not match the tokens"
    lengths = np.diff(offsets)
    if not bool(np.all((lengths >= 2) & (lengths <= max_len))):
        return f"an example shorter than 2 or longer than {max_len} tokens"
    if len(tokens) and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        return f"token ids outside the vocabulary (0..{vocab - 1 if vocab is not None else 'n'})"
    if not (int(lines[0]) >= 1 and int(lines[-1]) <= n_lines and bool(np.all(np.diff(lines) > 0))):
        return "source lines out of order or past the end of the file"
    if not bool(np.all((status >= 0) & (status <= _SKIPPED))):
        return "unknown row status"
    if not (int(ex_rows[0]) >= 0 and int(ex_rows[-1]) < len(lines) and bool(np.all(np.diff(ex_rows) > 0))):
        return "example rows out of order or out of range"
    if k != int(np.sum(status != _SKIPPED)) or bool(np.any(status[ex_rows] == _SKIPPED)):
        return "examples do not match the rows kept"
    if bool(np.any(mask[offsets[:-1]])) or not bool(np.all(np.logical_or.reduceat(mask, offsets[:-1]))):
        return "an example with a target on its first token or with no target"
    return None


def _read_cache(cpath: Path, path: Path, n_lines: int, vocab: Optional[int], max_len: int) -> Optional[_FileData]:
    if not cpath.is_file():
        return None
    try:
        with np.load(cpath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("format", "lines", "status", "tokens", "mask", "offsets", "ex_rows")}
        reason = _cache_problem(arrays, n_lines, vocab, max_len)
        if reason is None:
            return _FileData(
                path=str(path),
                format=str(arrays["format"]),
                lines=arrays["lines"].astype(np.int64),
                status=arrays["status"].astype(np.int8),
                tokens=arrays["tokens"].astype(np.int32),
                mask=arrays["mask"].astype(bool),
                offsets=arrays["offsets"].astype(np.int64),
                ex_rows=arrays["ex_rows"].astype(np.int64),
            )
    except Exception as e:  # any unreadable cache file is rebuilt, never an error
        reason = f"{type(e).__name__}: {_one_line(e)}"
    log.warning("ignoring corrupt data cache %s (%s); rebuilding it", cpath, reason)
    return None


# ----------------------------------------------------------------------------------------------
# loading


def _load_file(path: Path, cfg: DataConfig, enc: _Encoder, cache_dir: Optional[Path]) -> _FileData:
    data = _read_bytes(path)
    if cache_dir is None:
        return _tokenize_file(path, data, cfg, enc)
    cpath = _cache_path(cache_dir, path, hashlib.sha256(data).hexdigest(), cfg, enc)
    fd = _read_cache(cpath, path, data.count(b"\n") + 1, enc.size, cfg.max_seq_length)
    if fd is None:
        fd = _tokenize_file(path, data, cfg, enc)
        _write_cache(cpath, fd)
    return fd


def _encoder(cfg: DataConfig, tokenizer) -> _Encoder:
    return _Encoder(tokenizer, resolve_chat_template(cfg.chat_template, tokenizer))


def _seed_seq(seed: int, *tags: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) % 2**64, *tags])


def load_jsonl_dataset(path, cfg: DataConfig, tokenizer, *, cache_dir: Optional[Path] = None) -> TokenizedDataset:
    """Tokenize one JSONL file as a whole (no split). Uses the cache when ``cfg.cache``."""
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cfg.cache else None
    return _dataset(_load_file(Path(path).expanduser(), cfg, _encoder(cfg, tokenizer), cache))


def split_rows(n_rows: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Bool [n_rows], True for the rows held out for validation: round(valid_fraction * n_rows)
    of them, at least 1 when n_rows >= 2 and valid_fraction > 0, never all; chosen by ``seed``."""
    valid = np.zeros(n_rows, dtype=bool)
    if n_rows < 2 or valid_fraction <= 0:
        return valid
    k = min(max(1, round(valid_fraction * n_rows)), n_rows - 1)
    valid[np.random.default_rng(_seed_seq(seed, 1)).permutation(n_rows)[:k]] = True
    return valid


def load_datasets(
    cfg: DataConfig,
    tokenizer,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    splits: Sequence[str] = ("train", "valid", "test"),
) -> DataSplits:
    """Load ``cfg.path``: a JSONL file (``valid_fraction`` of its rows held out for validation) or a
    folder with train.jsonl and optional valid.jsonl, test.jsonl (without valid.jsonl the
    validation rows are carved out of train.jsonl the same way). The split depends only on the
    file and ``seed``."""
    unknown = set(splits) - {"train", "valid", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}")
    if not cfg.path:
        raise DataError("data.path is not set (a JSONL file or a folder with train.jsonl)")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError("no such file or folder", str(root), field="data.path")
    if root.is_dir():
        train_file = root / "train.jsonl"
        if not train_file.is_file():
            raise DataError("folder has no train.jsonl (expected train.jsonl, optional valid.jsonl and test.jsonl)", str(root))
        valid_file, test_file = root / "valid.jsonl", root / "test.jsonl"
    else:
        train_file, valid_file, test_file = root, None, None
    enc = _encoder(cfg, tokenizer)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cfg.cache else None

    train = valid = test = None
    has_valid_file = valid_file is not None and valid_file.is_file()
    if "train" in splits or ("valid" in splits and not has_valid_file):
        fd = _load_file(train_file, cfg, enc, cache)
        held_out = np.zeros(len(fd.lines), bool) if has_valid_file else split_rows(len(fd.lines), cfg.valid_fraction, seed)
        if "train" in splits:
            train = _dataset(fd, ~held_out)
            if len(train) == 0:
                raise DataError(
                    f"nothing to learn: every row left for training after holding out {int(held_out.sum())} "
                    "for validation was skipped (see data.max_seq_length, data.train_on)",
                    str(train_file),
                )
        if "valid" in splits and held_out.any():
            valid = _dataset(fd, held_out)
            if len(valid) == 0:
                log.warning("%s: all %d validation rows were skipped; no validation split", train_file, valid.stats.rows)
                valid = None
    if "valid" in splits and has_valid_file:
        valid = _dataset(_load_file(valid_file, cfg, enc, cache))
    if "test" in splits and test_file is not None and test_file.is_file():
        test = _dataset(_load_file(test_file, cfg, enc, cache))
    return DataSplits(train, valid, test)


# ----------------------------------------------------------------------------------------------
# batching


@dataclass
class Batch:
    inputs: np.ndarray
    """[B, L] int32: tokens[:-1] of each row, right-padded with 0."""
    targets: np.ndarray
    """[B, L] int32: tokens[1:]."""
    loss_mask: np.ndarray
    """[B, L] float32: 1.0 where targets[b, t] is a target token; 0.0 on padding."""
    segments: Optional[np.ndarray] = None
    """[B, L] int32 when packed: 1..k = which example of the row, 0 = padding; None otherwise."""
    lengths: Optional[np.ndarray] = None
    """[B] int: positions each row fills (the rest is padding); None when not known."""

    @property
    def ntokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(frozen=True)
class BatchPosition:
    """Where a run is in its data: ``index`` is the next global batch of ``epoch``."""

    epoch: int = 0
    index: int = 0


def pack(sizes: np.ndarray, capacity: int, order: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Best-fit decreasing: place items longest first (ties in ``order``) into the fullest row
    that still has room, opening a new row when none has. Returns the item indices of each row."""
    order = np.arange(len(sizes)) if order is None else order
    order = order[np.argsort(-sizes[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) sorted, so bisect finds the best fit
    for i in order:
        s = int(sizes[i])
        if s > capacity:
            raise ValueError(f"item of size {s} exceeds the row capacity {capacity}")
        j = bisect.bisect_left(free, (s, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room - s > 0:
            bisect.insort(free, (room - s, r))
    return [np.array(r, dtype=np.int64) for r in rows]


def epoch_plan(sizes: np.ndarray, global_batch: int, seed: int, epoch: int, shuffle: bool = True,
               bucket_batches: int = BUCKET_BATCHES) -> list[np.ndarray]:
    """Global batches (item indices) of one epoch, by length bucketing.

    Shuffle the items, top them up to a whole number of batches with the first items of that order
    (so every batch is full and every item is seen each epoch), cut into chunks of ``bucket_batches``
    batches, sort each chunk by size, cut it into batches, and shuffle the batch order. Without
    ``shuffle`` the items keep their order and only the within-chunk sort applies. With
    ``bucket_batches=1`` every batch is a random draw (no length bucketing)."""
    n = len(sizes)
    rng = np.random.default_rng(_seed_seq(seed, 2, epoch))
    order = rng.permutation(n) if shuffle else np.arange(n)
    nb = -(-n // global_batch)
    order = np.concatenate([order, order[np.arange(nb * global_batch - n) % n]])
    batches = []
    step = max(1, bucket_batches) * global_batch
    for s in range(0, len(order), step):
        chunk = order[s : s + step]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def num_batches(ds: TokenizedDataset, batch_size: int, *, max_seq_length: int, packing: bool = False, world_size: int = 1) -> int:
    """Global batches per epoch of :func:`iterate_batches`, without building them: ceil(items /
    (batch_size * world_size)), items being examples, or packed rows (best-fit decreasing decides
    by sizes alone, so every epoch packs into the same number of rows)."""
    sizes = ds.lengths - 1
    items = len(pack(sizes, max_seq_length)) if packing else len(sizes)
    return -(-items // (batch_size * world_size))


def _make_batch(ds: TokenizedDataset, rows: list[np.ndarray], length: int, packed: bool) -> Batch:
    B = len(rows)
    inputs = np.zeros((B, length), np.int32)
    targets = np.zeros((B, length), np.int32)
    loss = np.zeros((B, length), np.float32)
    segments = np.zeros((B, length), np.int32) if packed else None
    lengths = np.zeros(B, np.int64)
    for b, members in enumerate(rows):
        at = 0
        for k, e in enumerate(members):
            tokens, mask = ds.examples[e]
            n = len(tokens) - 1
            inputs[b, at : at + n] = tokens[:-1]
            targets[b, at : at + n] = tokens[1:]
            loss[b, at : at + n] = mask[1:]
            if packed:
                segments[b, at : at + n] = k + 1
            at += n
        lengths[b] = at
    return Batch(inputs, targets, loss, segments, lengths)


def padded_length(n, pad_multiple: int, cap: Optional[int] = None):
    """``n`` positions (an int or an array) rounded up to a multiple of ``pad_multiple``, at most ``cap``."""
    padded = -(-n // pad_multiple) * pad_multiple
    return padded if cap is None else np.minimum(padded, cap)


def iterate_batches(
    ds: TokenizedDataset,
    batch_size: int,
    *,
    max_seq_length: int,
    seed: int,
    shuffle: bool = True,
    packing: bool = False,
    start: BatchPosition = BatchPosition(),
    loop: bool = True,
    rank: int = 0,
    world_size: int = 1,
    pad_multiple: int = PAD_MULTIPLE,
    bucketing: bool = False,
) -> Iterator[tuple[Batch, BatchPosition]]:
    """Yield ``(batch for this rank, position after it)``.

    A global batch has ``batch_size * world_size`` rows; rank r gets rows
    ``[r * batch_size, (r + 1) * batch_size)``. The order depends only on ``(seed, epoch)``, so
    starting from a saved position replays exactly the remaining batches. Each batch is padded to
    a multiple of ``pad_multiple`` positions (capped at ``max_seq_length``) so compiled steps see
    few shapes. With ``packing``, examples are packed (best-fit decreasing, per epoch) into rows of
    at most ``max_seq_length`` positions and ``segments`` tells them apart. ``loop=False`` stops at
    the end of ``start.epoch``. ``bucketing=False`` draws batches without regard to length."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or pad_multiple < 1:
        raise ValueError(f"bad batching arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
    if len(ds) == 0:
        raise ValueError(f"no examples to batch in {ds.stats.path}")
    sizes = ds.lengths - 1  # positions each example fills
    if sizes.max() > max_seq_length:
        raise ValueError(
            f"an example of {sizes.max() + 1} tokens exceeds max_seq_length={max_seq_length}; "
            "tokenize with the same data.max_seq_length"
        )
    global_batch = batch_size * world_size
    epoch, index = start.epoch, start.index
    while True:
        if packing:
            members = pack(sizes, max_seq_length, np.random.default_rng(_seed_seq(seed, 3, epoch)).permutation(len(sizes)))
            item_sizes = np.array([sizes[m].sum() for m in members], dtype=np.int64)
        else:
            members, item_sizes = None, sizes
        plan = epoch_plan(item_sizes, global_batch, seed, epoch, shuffle, BUCKET_BATCHES if bucketing else 1)
        for i in range(index, len(plan)):
            items = plan[i][rank * batch_size : (rank + 1) * batch_size]
            rows = [members[j] for j in items] if packing else [[j] for j in items]
            longest = int(item_sizes[items].max())
            length = int(padded_length(longest, pad_multiple, max_seq_length))
            after = BatchPosition(epoch, i + 1) if i + 1 < len(plan) else BatchPosition(epoch + 1, 0)
            yield _make_batch(ds, rows, length, packing), after
        if not loop:
            return
        epoch, index = epoch + 1, 0


def length_groups(lengths: np.ndarray, max_rows: int, *, pad_multiple: int = PAD_MULTIPLE, cap: Optional[int] = None,
                  overhead: int = 0) -> list[tuple[np.ndarray, int]]:
    """Split one batch's rows into groups of similar length, each padded only to its own longest
    row: ``[(row indices, padded length), ...]``, at most ``max_rows`` rows per group.

    Their gradients summed give the step of the whole batch (the loss is a sum over target
    tokens), so this changes how much padding is computed, not what is learned. The split
    minimises ``sum(rows * padded length + overhead)`` over groups of consecutive rows in length
    order (exact, by dynamic programming); ``overhead`` is the fixed cost of one more call, in
    positions (a GPU wants large groups, a CPU barely minds small ones). Lengths are rounded up to
    a multiple of ``pad_multiple`` (capped at ``cap``) so compiled steps see few shapes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    padded = padded_length(np.maximum(lengths[order], 1), pad_multiple, cap)
    best = [0] + [None] * n  # best[j]: cost of the first j rows (in length order)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            c = best[i] + (j - i) * int(padded[j - 1]) + overhead
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        groups.append((order[i:j], int(padded[j - 1])))
        j = i
    return groups[::-1]


def attention_mask_from_segments(segments: np.ndarray) -> np.ndarray:
    """[B, 1, L, L] bool: query t may attend key s when s <= t and both are in the same example
    (segment > 0). A padding query attends only to itself: an all-False row would make softmax
    produce NaN, which the value matmul (0 * NaN) would spread into real positions."""
    seg = np.asarray(segments)
    L = seg.shape[-1]
    causal = np.tril(np.ones((L, L), dtype=bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    mask = causal[None] & same
    pad = seg == 0
    mask |= np.eye(L, dtype=bool)[None] & pad[:, :, None]
    return mask[:, None]
