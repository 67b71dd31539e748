"""Data formats: which rows a format takes (detection), what it requires of them (validation), and
the texts whose tokens make an example, with the spans of target tokens (rendering).

A :class:`Format` turns a row into a :class:`Sample`; formats that render alike share one sample
class: chat and sharegpt make a :class:`ChatSample`, completions and alpaca a :class:`PairSample`,
text a :class:`TextSample`. The formats :mod:`mlx_lora.data.examples` knows are :data:`REGISTRY`; a new
format is one more class there.

A sample renders in two halves around the tokenizer, so that the tokenizer sees a whole block of
rows in one call: :meth:`Sample.texts` gives the texts to tokenize, :meth:`Sample.example` builds
``(tokens, mask)`` from their token ids. Texts longer than the data can use are cut first (see
:mod:`mlx_lora.data.examples`); a cut text's last :data:`CUT_MARGIN` tokens are not trusted.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Iterator, Optional

import numpy as np

from mlx_lora.data.templates import TemplateLimitError, alpaca_prompt, template_from_source
from mlx_lora.plumbing.errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The last CUT_MARGIN tokens of a cut text are not trusted: a word split by the cut may tokenize
# differently from the whole word.
CUT_MARGIN = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
# Message keys a chat template reads as text, when present.
_TEXT_KEYS = ("name", "tool_call_id")


# ----------------------------------------------------------------------------------------------
# one-line descriptions of values, for messages


def tname(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def short(value: Any, limit: int = 40) -> str:
    """A value for a one-line message: repr (escapes newlines and surrogates), cut to ``limit``."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def key_name(k: Any) -> str:
    """A JSON key as part of a field name, escaped when it would not print on one line."""
    return k if isinstance(k, str) and k.isprintable() and not _SURROGATE.search(k) else json.dumps(k)[1:-1]


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_unicode(value: Any, path: str, line: int, field: str) -> None:
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
                    raise DataError("not valid Unicode (lone surrogate in a key)", path, line, f"{f}.{key_name(k)}")
                stack.append((x, f"{f}.{key_name(k)}"))
        elif isinstance(v, list):
            stack.extend((x, f"{f}[{i}]") for i, x in reversed(list(enumerate(v))))


# ----------------------------------------------------------------------------------------------
# rendering


def cut_text(text: str, chars: int) -> tuple[str, bool]:
    """``text`` cut to at most ``chars`` characters, at the last space or newline of the final
    quarter when there is one (a word boundary tokenizes the same cut or not); and whether it was cut."""
    if len(text) <= chars:
        return text, False
    at = max(text.rfind(c, chars * 3 // 4, chars) for c in " \n\t")
    return text[: at if at > 0 else chars], True


def _trusted(ids: list[int], cut: bool) -> int:
    return len(ids) - CUT_MARGIN if cut else len(ids)


class Sample:
    """A checked row, ready to render.

    Rendering gives token ids and target spans ``[a, b)``; :meth:`example` adds the BOS token the
    tokenizer would add and turns the spans into the mask (with ``train_on: all``, or for a
    sample whose every token is a target, the mask is all True), never a target on token 0."""

    every_token: ClassVar[bool] = False
    """Whether every token is a target whatever ``train_on`` says."""

    def plain_texts(self) -> list[str]:
        raise NotImplementedError

    def texts(self, enc, train_on: str, max_len: int, path: str, line: int, chars: int):
        """(texts to tokenize, which of them were cut, token ids or None) for this row, each text
        at most ``chars`` characters; token ids instead of texts when rendering had to tokenize
        as it went (see :meth:`ChatSample.texts`)."""
        cut = [cut_text(t, chars) for t in self.plain_texts()]
        return [t for t, _ in cut], [c for _, c in cut], None

    def window_known(self, ids: list[list[int]], cut: list[bool], max_len: int) -> bool:
        """Whether the tokens of the (cut) texts settle the first ``max_len`` tokens of the
        example: every cut text reaches past them with tokens it can trust."""
        return not any(cut) or all(_trusted(t, True) > max_len for t, c in zip(ids, cut) if c)

    def spans(
        self, ids: list[list[int]], enc, train_on: str, path: str, line: int, cut: list[bool]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """(token ids, target spans) of the example, from the encodings of :meth:`texts`."""
        raise NotImplementedError

    def example(
        self, ids: list[list[int]], enc, train_on: str, path: str, line: int, cut: Optional[list[bool]] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, mask bool) of this row. A text that was cut (see :meth:`window_known`)
        is compared and used only as far as it can be trusted; the tokens past that lie beyond
        max_seq_length and are truncated away."""
        tokens, spans = self.spans(ids, enc, train_on, path, line, cut or [False] * len(ids))
        shift = 0
        if enc.adds_bos and tokens[:1] != [enc.bos_id]:
            tokens, shift = [enc.bos_id] + tokens, 1
        mask = np.zeros(len(tokens), dtype=bool)
        if self.every_token or train_on == "all":
            mask[:] = True
        for a, b in spans:
            mask[a + shift : b + shift] = True
        mask[:1] = False  # nothing predicts the first token
        return np.asarray(tokens, dtype=np.int32), mask

    def examples(
        self, ids: list[list[int]], enc, train_on: str, path: str, line: int, cut: Optional[list[bool]] = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The examples this row makes: one (:meth:`example`); a preference pair makes two."""
        return [self.example(ids, enc, train_on, path, line, cut)]

    def no_target(self, train_on: str) -> Optional[tuple[Optional[str], str]]:
        """(field, reason) when the row itself explains why it has no target token, else None."""
        return None


class TextSample(Sample):
    """Every token is a target; EOS is appended unless the text already ends with it."""

    every_token = True

    def __init__(self, text: str):
        self.text = text

    def plain_texts(self) -> list[str]:
        return [self.text]

    def spans(self, ids, enc, train_on, path, line, cut):
        eos = enc.eos_id is not None and not cut[0] and ids[0][-1:] != [enc.eos_id]
        return ids[0] + ([enc.eos_id] if eos else []), []


class PairSample(Sample):
    """A prompt and its completion: the completion and EOS are the targets."""

    def __init__(self, prompt: str, completion: str):
        self.prompt, self.completion = prompt, completion

    def plain_texts(self) -> list[str]:
        return [self.prompt, self.completion]

    def texts(self, enc, train_on, max_len, path, line, chars):
        texts, cuts, _ = super().texts(enc, train_on, max_len, path, line, chars)
        if cuts[0]:
            texts[1], cuts[1] = "", True  # the completion starts past the cut prompt: nothing of it is needed
        return texts, cuts, None

    def window_known(self, ids, cut, max_len):
        if not any(cut):
            return True
        if cut[0]:
            return _trusted(ids[0], True) > max_len
        return len(ids[0]) + _trusted(ids[1], True) > max_len

    def spans(self, ids, enc, train_on, path, line, cut):
        prompt, completion = ids
        if cut[0]:  # the completion lies past max_seq_length
            return list(prompt), [(len(prompt), len(prompt))]
        eos = enc.eos_id is not None and not cut[1]
        tokens = prompt + completion
        return tokens + ([enc.eos_id] if eos else []), [(len(prompt), len(tokens) + eos)]


class ChatSample(Sample):
    """A conversation rendered by the chat template. The targets are the tokens of the assistant
    turns ``train_on`` names, located by rendering the conversation up to each one: the tokens of
    ``messages[:i]`` + generation prompt and of ``messages[:i+1]`` must be prefixes of the whole
    conversation's tokens, and the target span lies between them."""

    def __init__(self, messages: list[dict], tools: Optional[list], key: str):
        self.messages, self.tools, self.key = messages, tools, key

    def target_turns(self, train_on: str) -> list[int]:
        """Indices of the assistant messages whose tokens are targets (none needed for ``all``)."""
        assistant = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        return [] if train_on == "all" else assistant[-1:] if train_on == "last" else assistant

    def _generation_prompt(self, enc) -> str:
        """The template's text before an assistant turn that opens the conversation. transformers
        refuses to render an empty conversation, so a tokenizer's Jinja template is rendered here
        directly (the prefix check in spans() still verifies that it fits the full rendering)."""
        try:
            return enc.template.render([], tools=self.tools, add_generation_prompt=True)
        except Exception:
            source = getattr(enc.tokenizer, "chat_template", None)
            if not isinstance(source, str):
                raise
            if getattr(enc, "_own_template", None) is None:
                enc._own_template = template_from_source(source, enc.template.name, enc.tokenizer)
            return enc._own_template.render([], tools=self.tools, add_generation_prompt=True)

    def _render(self, enc, train_on: str, path: str, line: int) -> Iterator:
        """Texts whose tokens locate the target turns: yields the whole conversation, then for
        each target assistant turn i a pair: the prefix up to its header (messages[:i] +
        generation prompt) and the prefix through its end (messages[:i+1]). A generator, so that a
        long conversation's turns past max_seq_length need not be rendered at all (see _by_turns)."""
        msgs, tools = self.messages, self.tools
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
            for i in self.target_turns(train_on):
                head = (
                    self._generation_prompt(enc)
                    if i == 0
                    else enc.template.render(msgs[:i], tools=tools, add_generation_prompt=True)
                )
                yield head, (whole if i == len(msgs) - 1 else enc.template.render(msgs[: i + 1], tools=tools))
        except TemplateLimitError as e:
            raise DataError(
                f"chat template {enc.template.name} {e} (rendering this row)", path, line, self.key
            ) from None
        except Exception as e:
            raise DataError(
                f"chat template ({enc.template.name}) failed: {type(e).__name__}: {one_line(e)}", path, line, self.key
            ) from None

    @staticmethod
    def _by_turns(turns: Iterator, whole: str, enc, chars: int, max_len: int):
        """(token ids, cut flags) of a long conversation: the whole conversation (cut), then the
        prefixes of its target turns, each tokenized as soon as it is rendered, up to the first
        turn that ends past ``max_len`` tokens. Later turns start past it too (their prefixes
        extend that one), so they have no target within max_seq_length and are neither rendered
        nor tokenized: rendering and tokenizing the prefixes of every turn costs time quadratic
        in the length of a conversation of many turns."""
        text, cut = cut_text(whole, chars)
        ids, cuts = enc.encode_many([text]), [cut]
        for head, end in turns:
            pair = [cut_text(head, chars), cut_text(end, chars)]
            ids += enc.encode_many([t for t, _ in pair])
            cuts += [c for _, c in pair]
            if len(ids[-1]) - CUT_MARGIN >= max_len:  # the margin covers a token merged across the boundary
                break
        return ids, cuts

    def texts(self, enc, train_on, max_len, path, line, chars):
        """A long conversation comes back tokenized already (see _by_turns): one that is cut, or
        whose prefixes would add up to several times ``chars`` characters."""
        turns = self._render(enc, train_on, path, line)
        whole = next(turns)
        if len(whole) > chars or len(whole) * len(self.target_turns(train_on)) > 4 * chars:
            ids, cuts = self._by_turns(turns, whole, enc, chars, max_len)
            turns.close()
            return None, cuts, ids
        cut = [cut_text(t, chars) for t in [whole] + [t for pair in turns for t in pair]]
        return [t for t, _ in cut], [c for _, c in cut], None

    def spans(self, ids, enc, train_on, path, line, cut):
        tokens = ids[0]
        known = _trusted(tokens, cut[0])
        spans = []
        for k, i in enumerate(self.target_turns(train_on)):
            if 2 + 2 * k >= len(ids):  # this turn and the rest start past max_seq_length (see _by_turns)
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
                        f"{self.key}[{i}]",
                    )
            spans.append((len(head), len(end)))
        return tokens, spans

    def no_target(self, train_on):
        if train_on != "all" and not any(m["role"] == "assistant" for m in self.messages):
            return self.key, "the conversation has no assistant turn (data.train_on: all would train on every token)"
        return None


class ContinuationChatSample(ChatSample):
    """A conversation whose targets are the assistant turns from message ``first`` on: a
    preference pair's continuation of its shared prompt conversation."""

    def __init__(self, messages: list[dict], tools: Optional[list], key: str, first: int):
        super().__init__(messages, tools, key)
        self.first = first

    def target_turns(self, train_on: str) -> list[int]:
        turns = [i for i in super().target_turns("assistant") if i >= self.first]
        return [] if train_on == "all" else turns[-1:] if train_on == "last" else turns

    def no_target(self, train_on):
        if train_on != "all" and not self.target_turns(train_on):
            return self.key, "the continuation has no assistant turn"
        return None


class PreferenceSample(Sample):
    """A preference pair: two samples (chosen, rejected) of one prompt, rendered together and
    kept together (two examples, chosen first). Each renders, masks and is cut exactly as the
    sample of its kind does in supervised training."""

    def __init__(self, chosen: Sample, rejected: Sample):
        self.chosen, self.rejected = chosen, rejected
        self._split = 0  # how many of the texts (token id lists) are the chosen one's, from texts()

    def texts(self, enc, train_on, max_len, path, line, chars):
        tc, cc, pc = self.chosen.texts(enc, train_on, max_len, path, line, chars)
        tr, cr, pr = self.rejected.texts(enc, train_on, max_len, path, line, chars)
        if pc is None and pr is None:
            self._split = len(tc)
            return tc + tr, cc + cr, None
        # One of them came back tokenized (a long conversation): tokenize the other too.
        ids_c = pc if pc is not None else enc.encode_many(tc)
        ids_r = pr if pr is not None else enc.encode_many(tr)
        self._split = len(ids_c)
        return None, cc + cr, ids_c + ids_r

    def window_known(self, ids, cut, max_len):
        k = self._split
        return self.chosen.window_known(ids[:k], cut[:k], max_len) and self.rejected.window_known(
            ids[k:], cut[k:], max_len
        )

    def examples(self, ids, enc, train_on, path, line, cut=None):
        k, cut = self._split, cut or [False] * len(ids)
        return [
            self.chosen.example(ids[:k], enc, train_on, path, line, cut[:k]),
            self.rejected.example(ids[k:], enc, train_on, path, line, cut[k:]),
        ]

    def example(self, ids, enc, train_on, path, line, cut=None):
        raise TypeError("a preference pair makes two examples; use examples()")

    def no_target(self, train_on):
        return self.chosen.no_target(train_on) or self.rejected.no_target(train_on)


# ----------------------------------------------------------------------------------------------
# formats: detection and validation


def _string(row: dict, key: str, path: str, line: int, optional: bool = False) -> str:
    v = row.get(key)
    if optional and v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {tname(v)}", path, line, key)
    return v


def _check_tools(row: dict, path: str, line: int) -> Optional[list]:
    tools = row.get("tools")
    if isinstance(tools, str):  # some datasets store the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError("expected a list of tools (or a JSON string of one)", path, line, "tools") from None
        check_unicode(tools, path, line, "tools")  # its \uXXXX escapes are decoded only now
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"expected a list of tools, got {tname(tools)}", path, line, "tools")
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):  # chat templates take JSON schemas (objects) only
            raise DataError(f"expected a tool object (JSON schema), got {tname(tool)}", path, line, f"tools[{i}]")
    return tools or None


def _check_list(msgs: Any, key: str, path: str, line: int) -> None:
    if not isinstance(msgs, list):
        raise DataError(f"expected a list of messages, got {tname(msgs)}", path, line, key)
    if not msgs:
        raise DataError("empty conversation", path, line, key)


def _check_turn(m: Any, where: str, role_key: str, content_key: str, roles, path: str, line: int) -> str:
    """The role of message ``m``, checked to be an object with a known role."""
    if not isinstance(m, dict):
        raise DataError(f"expected an object with '{role_key}' and '{content_key}', got {tname(m)}", path, line, where)
    if role_key not in m:
        raise DataError("missing key", path, line, f"{where}.{role_key}")
    role = m[role_key]
    if not isinstance(role, str) or role not in roles:
        raise DataError(
            f"unknown role {short(role)}; expected one of {', '.join(roles)}", path, line, f"{where}.{role_key}"
        )
    return role


class Format:
    """One data format: the keys that identify its rows, the keys it reads, and how a row
    becomes a :class:`Sample`."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    """A row with all of these is in this format (detection tries :data:`REGISTRY` in order)."""
    reads: ClassVar[tuple[str, ...]]
    """The keys it uses: the only values checked for valid Unicode (other keys are never used)."""
    listed: ClassVar[int]
    """Its place where the formats are listed for a user (data.format's choices)."""
    per_row: ClassVar[int] = 1
    """Examples each row makes, which travel together (a preference pair: 2)."""

    @classmethod
    def matches(cls, row: dict) -> bool:
        return all(k in row for k in cls.keys)

    @classmethod
    def sample(cls, row: dict, path: str, line: int, why: str) -> Sample:
        """The checked row; ``why`` says how this file's format was chosen, for the messages."""
        for k in cls.keys:
            if k not in row:
                other = detect_format(row)
                if other is not None:
                    msg = f"row is in {other} format but the file is {cls.name} ({why})"
                else:
                    msg = f"missing key ({cls.name} rows need {', '.join(cls.keys)}; {why})"
                raise DataError(msg, path, line, k)
        for k in cls.reads:
            if k in row:
                check_unicode(row[k], path, line, k)
        return cls.parse(row, path, line)

    @classmethod
    def parse(cls, row: dict, path: str, line: int) -> Sample:
        raise NotImplementedError


class Chat(Format):
    """``messages: [{role, content}]``, optional ``tools``; an assistant turn that only calls
    tools may have null or no content."""

    name, keys, reads = "chat", ("messages",), ("messages", "tools")
    listed = 0

    @classmethod
    def parse(cls, row, path, line):
        return ChatSample(
            chat_messages(row["messages"], "messages", path, line), _check_tools(row, path, line), "messages"
        )


def chat_messages(msgs: Any, key: str, path: str, line: int) -> list[dict]:
    """The checked messages of the conversation in field ``key`` (chat format)."""
    _check_list(msgs, key, path, line)
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        role = _check_turn(m, where, "role", "content", CHAT_ROLES, path, line)
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise DataError(f"expected a list of tool calls, got {tname(calls)}", path, line, f"{where}.tool_calls")
            for j, call in enumerate(calls):
                if not isinstance(call, dict):
                    raise DataError(
                        f"expected a tool call object, got {tname(call)}", path, line, f"{where}.tool_calls[{j}]"
                    )
        for k in _TEXT_KEYS:
            if m.get(k) is not None and not isinstance(m[k], str):
                raise DataError(f"expected a string, got {tname(m[k])}", path, line, f"{where}.{k}")
        if not isinstance(content, str) and not (content is None and role == "assistant" and calls):
            what = "missing key" if "content" not in m else f"expected a string, got {tname(content)}"
            raise DataError(what, path, line, f"{where}.content")
        out.append(dict(m))
    return out


class ShareGPT(Format):
    """``conversations: [{from, value}]``, turns renamed to chat roles (human -> user, gpt -> assistant)."""

    name, keys, reads = "sharegpt", ("conversations",), ("conversations", "tools")
    listed = 4

    @classmethod
    def parse(cls, row, path, line):
        msgs = row["conversations"]
        _check_list(msgs, "conversations", path, line)
        out = []
        for i, m in enumerate(msgs):
            where = f"conversations[{i}]"
            role = _check_turn(m, where, "from", "value", tuple(SHAREGPT_ROLES), path, line)
            content = m.get("value")
            if not isinstance(content, str):
                raise DataError(f"expected a string, got {tname(content)}", path, line, f"{where}.value")
            out.append({"role": SHAREGPT_ROLES[role], "content": content})
        return ChatSample(out, _check_tools(row, path, line), "conversations")


class Completions(Format):
    name, keys, reads = "completions", ("prompt", "completion"), ("prompt", "completion")
    listed = 1

    @classmethod
    def parse(cls, row, path, line):
        return PairSample(_string(row, "prompt", path, line), _string(row, "completion", path, line))


class Alpaca(Format):
    """``instruction``, optional ``input``, ``output``: the prompt is the Alpaca prompt."""

    name, keys, reads = "alpaca", ("instruction", "output"), ("instruction", "input", "output")
    listed = 3

    @classmethod
    def parse(cls, row, path, line):
        prompt = alpaca_prompt(
            _string(row, "instruction", path, line), _string(row, "input", path, line, optional=True)
        )
        return PairSample(prompt, _string(row, "output", path, line))


class Text(Format):
    name, keys, reads = "text", ("text",), ("text",)
    listed = 2

    @classmethod
    def parse(cls, row, path, line):
        return TextSample(_string(row, "text", path, line))


def _as_messages(v: Any, key: str, path: str, line: int, role: str) -> list[dict]:
    """A preference field as messages: a string is one message of ``role``."""
    return [{"role": role, "content": v}] if isinstance(v, str) else chat_messages(v, key, path, line)


class Preference(Format):
    """``prompt``, ``chosen``, ``rejected``: a prompt and two responses, the first preferred.

    Strings (rendered as completions: prompt, then the response and EOS as targets), or chat
    messages: ``prompt`` a conversation (or a string: one user turn), ``chosen`` and ``rejected``
    its assistant continuations (a string is one assistant turn), or whole conversations that
    start with the prompt's messages. Without ``prompt`` both must be conversations, and their
    longest common prefix of messages is the prompt. Either way the targets are the assistant
    turns of the continuation (``train_on`` as for chat)."""

    name, keys, reads = "preference", ("chosen", "rejected"), ("prompt", "chosen", "rejected", "tools")
    listed = 5
    per_row = 2

    @classmethod
    def parse(cls, row, path, line):
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        for key, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(v, (str, list)) and not (key == "prompt" and v is None):
                raise DataError(f"expected a string or a list of messages, got {tname(v)}", path, line, key)
        if all(isinstance(v, str) for v in (chosen, rejected)) and not isinstance(prompt, list):
            if prompt is None:
                raise DataError("missing key (string chosen and rejected need a prompt string)", path, line, "prompt")
            return PreferenceSample(PairSample(prompt, chosen), PairSample(prompt, rejected))
        tools = _check_tools(row, path, line)
        c = _as_messages(chosen, "chosen", path, line, "assistant")
        r = _as_messages(rejected, "rejected", path, line, "assistant")
        if prompt is None:
            k = 0
            while k < min(len(c), len(r)) and c[k] == r[k]:
                k += 1
            if k == len(c) or k == len(r):
                raise DataError(
                    "chosen and rejected are the same conversation (or one extends the other); "
                    "nothing tells them apart",
                    path,
                    line,
                    "rejected",
                )
            p, c, r = c[:k], c[k:], r[k:]
        else:
            p = _as_messages(prompt, "prompt", path, line, "user")
            # Whole conversations that repeat the prompt: keep their continuations.
            c = c[len(p) :] if len(c) > len(p) and c[: len(p)] == p else c
            r = r[len(p) :] if len(r) > len(p) and r[: len(p)] == p else r
        return PreferenceSample(
            ContinuationChatSample(p + c, tools, "chosen", len(p)),
            ContinuationChatSample(p + r, tools, "rejected", len(p)),
        )


REGISTRY: tuple[type[Format], ...] = (Chat, ShareGPT, Preference, Completions, Alpaca, Text)
"""Every format, in the order detection tries them (a row with the keys of two is the first's)."""
BY_NAME = {f.name: f for f in REGISTRY}
FORMATS = tuple(f.name for f in sorted(REGISTRY, key=lambda f: f.listed))


def examples_per_row(fmt: str) -> int:
    """How many examples each row of format ``fmt`` makes (they travel together in batches)."""
    return BY_NAME[fmt].per_row


def detect_format(row: dict) -> Optional[str]:
    """The format whose keys ``row`` has, or None."""
    return next((f.name for f in REGISTRY if f.matches(row)), None)


def file_samples(path: str, rows: list[tuple[int, dict]], fmt_cfg: str) -> tuple[str, list[Sample]]:
    """The format of a file (``fmt_cfg``, or detected from its first row when ``auto``) and its
    rows as samples."""
    first_line, first = rows[0]
    if fmt_cfg == "auto":
        fmt = detect_format(first)
        if fmt is None:
            keys = ", ".join(key_name(k) for k in sorted(first)[:20]) or "none"
            expected = "; ".join(f"{f.name}: {'+'.join(f.keys)}" for f in REGISTRY)
            grpo = (
                "; prompt/answer rows train with train.method grpo" if "prompt" in first and "answer" in first else ""
            )
            raise DataError(
                f"unknown format: keys {keys} match no format ({expected}); set data.format{grpo}", path, first_line
            )
        why = f"detected from line {first_line}"
    elif fmt_cfg in BY_NAME:
        fmt, why = fmt_cfg, f"data.format is {fmt_cfg}"
    else:
        raise DataError(
            f"unknown format '{fmt_cfg}'; expected auto or one of {', '.join(FORMATS)}", path, field="data.format"
        )
    cls = BY_NAME[fmt]
    return fmt, [cls.sample(row, path, line, why) for line, row in rows]
