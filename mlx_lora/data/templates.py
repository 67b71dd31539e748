"""Prompt templates: chat templates and the Alpaca prompt.

A chat template turns a list of ``{role, content}`` messages into text. It comes from one of three
places, chosen by ``data.chat_template``:

- unset: the tokenizer's own template (its Jinja source from ``tokenizer_config.json`` or
  ``chat_template.jinja``; a renderer that mlx-lm itself ships for a model family is called as is);
- ``chatml``: the built-in ``templates/chatml.jinja``;
- a path to a ``.jinja`` file.

Every Jinja template, the tokenizer's own included, is rendered here and never by transformers: in
a sandboxed Jinja environment that offers what Hub templates expect (``raise_exception``,
``strftime_now``, a ``tojson`` filter that does not escape HTML, ``{% generation %}`` blocks, loop
controls, trimmed blocks, the tokenizer's special tokens), so a template renders here as it does
in transformers. :func:`apply_chat_template` is the one replacement for
``tokenizer.apply_chat_template`` everywhere in the tool.

A template is a program, and one that loops (nearly) forever, builds gigabytes of text or a number
of billions of digits would hang or exhaust memory. Rendering is therefore bounded: every loop
iteration, call, filter and operator counts against a step budget; no string, list or output may
grow past a size limit, nor an integer past :data:`MAX_INT_BITS` bits (each operation is refused
*before* it computes a value over the limit, so no single step is slow); macro calls may nest
:data:`MAX_CALL_DEPTH` deep; and the render runs under a wall-clock deadline that is checked at
every step, so it holds in any thread (no signal is involved). Budget, sizes and deadline scale
with the conversation being rendered (see :class:`_Budget`). Going past any of them raises
:class:`TemplateLimitError`, which callers report naming the template's source file.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import jinja2
from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_lora.plumbing.errors import DataError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
BUILTIN_TEMPLATES = {"chatml": TEMPLATE_DIR / "chatml.jinja"}

# The wording of the Stanford Alpaca prompt, the de-facto standard for instruction/input/output rows.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The prompt of an Alpaca row; the row's ``output`` follows it directly."""
    if input:
        return _ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return _ALPACA_NO_INPUT.format(instruction=instruction)


_PROBE = [
    {"role": "system", "content": "probe system"},
    {"role": "user", "content": "probe user"},
    {"role": "assistant", "content": "probe answer"},
]


class ChatTemplate:
    """Renders conversations to text.

    ``name`` says where the template came from; ``fingerprint`` is a sha256 of the template's
    source and of what it renders for a fixed conversation, so it changes whenever the rendering
    can (it keys the tokenized-data cache).
    """

    def __init__(self, name: str, source: str, render: Callable[..., str]):
        self.name = name
        self._source = source
        self._render = render
        self._fingerprint: Optional[str] = None

    def render(self, messages: list[dict], *, tools: Optional[list] = None, add_generation_prompt: bool = False) -> str:
        out = self._render(messages, tools, add_generation_prompt)
        if not isinstance(out, str):
            raise TypeError(f"chat template {self.name} returned {type(out).__name__}, not text")
        return out

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            try:
                probe = [self.render(_PROBE), self.render(_PROBE[:2], add_generation_prompt=True)]
            except Exception as e:  # the template's own failure is reported on the first row using it
                probe = [f"unrenderable: {type(e).__name__}"]
            self._fingerprint = _sha(json.dumps([self._source, probe]))
        return self._fingerprint

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TemplateLimitError(RuntimeError):
    """A chat template went past its step budget, a size limit or its deadline while rendering."""


# Rendering limits. A chat template's work is a handful of steps per message, tool and key, so
# the step budget is a generous constant plus a multiple of the items it is given; text may repeat
# the input a few times (tools rendered into several turns, say), so sizes get the same treatment.
_STEPS_BASE = 1_000_000
_STEPS_PER_ITEM = 64
_SIZE_BASE = 1 << 24
_SIZE_PER_CHAR = 8
_CHARS_PER_STEP = 256
"""A filter, call or operator over N characters or items also costs N / this many steps, so
rebuilding a large value in a loop runs out of steps long before it runs out of time."""
MAX_INT_BITS = 4096
"""The largest integer a template may compute (about 1,200 digits); multiplying two such numbers
takes microseconds, while unbounded ones (``x * x`` twenty times over) take hours."""
MAX_CALL_DEPTH = 64
"""How deep macro calls (and recursive loops) may nest."""
DEADLINE_S = 20.0
DEADLINE_S_PER_MCHAR = 2.0
"""A render's wall-clock deadline: this many seconds, plus this many per million characters of
input. A template that needs longer is refused; the step budget and size limits normally end a
runaway template far sooner, the deadline is the last line."""


class _Budget:
    """What one render may still do; set for the duration of :meth:`ChatTemplate.render`."""

    def __init__(self, items: int, chars: int, deadline_s: Optional[float] = None):
        self.steps = _STEPS_BASE + _STEPS_PER_ITEM * items
        self.max_size = _SIZE_BASE + _SIZE_PER_CHAR * chars
        self.output = 0
        self.depth = 0
        self.seconds = DEADLINE_S + DEADLINE_S_PER_MCHAR * chars / 1e6 if deadline_s is None else deadline_s
        self.deadline = time.monotonic() + self.seconds

    def spend(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise TemplateLimitError(
                "went past its step budget (loop iterations, calls and filters); a template must not loop without end"
            )
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"ran past its deadline of {self.seconds:.0f} s")

    def check_int(self, bits: int, what: str) -> None:
        if bits > MAX_INT_BITS:
            raise TemplateLimitError(
                f"{what} would be a number of about {bits:,} bits, over the limit of {MAX_INT_BITS:,} bits"
            )

    def check_size(self, value: Any, what: str = "a value") -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            self.check_int(value.bit_length(), what)
            return
        try:
            n = len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0
        except TypeError:
            n = 0
        if n > self.max_size:
            raise TemplateLimitError(f"built {what} of {n:,} characters or items, over the limit of {self.max_size:,}")
        if n >= _CHARS_PER_STEP:
            self.spend(n // _CHARS_PER_STEP)

    def check_args(self, args, kwargs) -> None:
        # Widths and counts (center(10**9), indent(...)) allocate before returning: refuse them first.
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_size:
                shown = f"{a}" if a.bit_length() <= 64 else f"of {a.bit_length():,} bits"
                raise TemplateLimitError(f"called with the number {shown}, over the size limit of {self.max_size:,}")
            self.check_size(a, "an argument")

    def check_result(self, name: str, args: tuple, kwargs: dict) -> None:
        """Refuse, before it runs, an operation whose result would be over the size limit: the
        ones whose result can be far larger than their inputs (replace, join, %-formatting)."""
        size = None
        if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
            text, old, new = args[:3]
            hits = len(text) + 1 if old == "" else text.count(old)
            size = len(text) + hits * (len(new) - len(old))
        elif name == "join" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], (list, tuple)):
            size = len(args[0]) * len(args[1]) + sum(len(x) for x in args[1] if isinstance(x, str))
        elif name == "format" and args and isinstance(args[0], str):
            size = _format_width(args[0])
        if size is not None and size > self.max_size:
            raise TemplateLimitError(
                f"{name} would build {size:,} characters, over the size limit of {self.max_size:,}"
            )


def _format_width(fmt: str) -> int:
    """The largest width or precision a %- or {}-format string asks for (0 when none)."""
    specs = re.findall(r"%[#0\- +]*(\d*)(?:\.(\d*))?", fmt) + re.findall(r"\{[^{}:]*:[^{}\d]*(\d*)(?:\.(\d*))?", fmt)
    return max((int(d) for pair in specs for d in pair if d), default=0)


_BUDGET: contextvars.ContextVar[Optional[_Budget]] = contextvars.ContextVar("template_budget", default=None)


def _budget() -> _Budget:
    # Outside a render (Jinja's compile-time constant folding) nothing is being spent.
    return _BUDGET.get() or _Budget(0, 0)


def _measure(value: Any) -> tuple[int, int]:
    """(items, characters) of the JSON-like data a template is given."""
    items = chars = 0
    stack = [value]
    while stack:
        v = stack.pop()
        items += 1
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return items, chars


def _bounded_filter(name: str, fn: Callable, contexts: tuple) -> Callable:
    @functools.wraps(fn)  # keeps Jinja's pass_context / pass_eval_context markers
    def wrapper(*args, **kwargs):
        b = _budget()
        b.spend()
        b.check_args(args, kwargs)
        # The filter's own arguments, after the context Jinja may pass first.
        value, *rest = [a for a in args if not isinstance(a, contexts)] or [None]
        if name == "join":
            b.check_result("join", (rest[0] if rest else kwargs.get("d", ""), value), {})
        elif name in ("replace", "format"):
            b.check_result(name, (value, *rest), kwargs)
        rv = fn(*args, **kwargs)
        b.check_size(rv)
        return rv

    return wrapper


def _count_iterations(_context, iterable):
    """Wraps the sequence of every ``{% for %}`` loop: each iteration is a step."""
    b = _budget()
    for item in iterable:
        b.spend()
        yield item


def _check_value(_context, value):
    _budget().check_size(value)
    return value


_COUNTED, _CHECKED = "mlx_lora_counted_loop", "mlx_lora_checked_value"


def _jinja_environment():

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with every call, operator and loop iteration charged to the render's budget."""

        intercepted_binops = frozenset(["+", "-", "*", "/", "//", "**", "%"])

        def call(__self, __context, __obj, *args, **kwargs):
            b = _budget()
            b.spend()
            b.check_args(args, kwargs)
            # str.replace / str.join / str.format called as methods (the sandbox wraps format)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):
                b.check_result(getattr(__obj, "__name__", ""), (owner, *args), kwargs)
            nests = isinstance(__obj, (jinja2.runtime.Macro, jinja2.runtime.LoopContext))
            if nests:
                if b.depth >= MAX_CALL_DEPTH:
                    raise TemplateLimitError(
                        f"nested macro calls more than {MAX_CALL_DEPTH} deep (a macro calling itself without end?)"
                    )
                b.depth += 1
            try:
                rv = super().call(__context, __obj, *args, **kwargs)
            finally:
                if nests:
                    b.depth -= 1
            b.check_size(rv)
            return rv

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.spend()
            sized = (str, list, tuple)
            if operator == "*":
                seq, n = (left, right) if isinstance(left, sized) else (right, left)
                if isinstance(seq, sized) and isinstance(n, int) and len(seq) * max(n, 0) > b.max_size:
                    shown = f"{n}" if n.bit_length() <= 64 else f"a number of {n.bit_length():,} bits"
                    raise TemplateLimitError(f"repeated a value {shown} times, over the size limit of {b.max_size:,}")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                if len(left) + len(right) > b.max_size:
                    raise TemplateLimitError(f"joined values over the size limit of {b.max_size:,}")
            elif operator == "%" and isinstance(left, str):
                b.check_result("format", (left,), {})
            ints = isinstance(left, int) and isinstance(right, int)
            if operator == "*" and ints:
                b.check_int(left.bit_length() + right.bit_length(), "a product")
            elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, int) and right > 0:
                # The result has about right * log2|left| bits: refuse it before computing it.
                if abs(left) > 1:
                    b.check_int(int(min(right * math.log2(abs(left)), 1e18)), "a power")
            elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, float):
                if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 1024:
                    raise TemplateLimitError("computed a power too large to render")
            for side in (left, right):  # operands that came from elsewhere (a filter, a literal)
                if isinstance(side, int) and not isinstance(side, bool):
                    b.check_int(side.bit_length(), "an operand")
            rv = super().call_binop(context, operator, left, right)
            b.check_size(rv)
            return rv

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.lineno)
            # `a ~ b` is not an operator the sandbox intercepts: check what each one builds.
            for concat in list(tree.find_all(nodes.Concat)):
                checked = nodes.Filter(nodes.Concat(concat.nodes), _CHECKED, [], [], None, None, lineno=concat.lineno)
                concat.nodes = [checked]
            return tree

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the rendered prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %} ... {% endgeneration %}`` (transformers marks assistant text with
        it): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = tojson
    contexts = (jinja2.runtime.Context, nodes.EvalContext, jinja2.Environment)
    env.filters = {name: _bounded_filter(name, f, contexts) for name, f in env.filters.items()}
    env.filters[_COUNTED] = jinja2.pass_context(_count_iterations)
    env.filters[_CHECKED] = jinja2.pass_context(_check_value)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) would run for hours inside one call
    return env


def _special_tokens(tokenizer) -> dict[str, Any]:
    """bos_token, eos_token, ... as strings, the variables Hub templates read (transformers
    passes the tokenizer's ``special_tokens_map``)."""
    out: dict[str, Any] = {}
    mapping = getattr(tokenizer, "special_tokens_map", None)
    if isinstance(mapping, dict):
        for name, value in mapping.items():
            if isinstance(name, str) and (
                isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                out[name] = value
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            out[name] = value
        elif value is not None and isinstance(getattr(value, "content", None), str):
            out[name] = value.content
    return out


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(messages: list) -> list:
    """As transformers does: a message's reasoning, under any of its names, is also
    ``thinking`` and ``reasoning_content`` (the names templates read)."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _limit_error(e: BaseException) -> Optional[TemplateLimitError]:
    """The limit a Python error inside a render stands for (None: the template's own error)."""
    if isinstance(e, TemplateLimitError):
        return e
    if isinstance(e, RecursionError):
        return TemplateLimitError("recursed too deeply (a macro calling itself without end?)")
    if isinstance(e, MemoryError):
        return TemplateLimitError("ran out of memory")
    if isinstance(e, OverflowError):  # the sandbox's range() limit, or a float past its range
        return TemplateLimitError(f"computed a value too large: {' '.join(str(e).split())[:200]}")
    return None


def template_from_source(source: str, name: str, tokenizer=None, *, hub: bool = False) -> ChatTemplate:
    """Compile Jinja ``source`` into a ChatTemplate; syntax errors become DataError naming
    ``name`` (the template's file). ``hub``: the tokenizer's own template, given the messages as
    transformers gives them (reasoning fields aliased)."""

    try:
        compiled = _jinja_environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template syntax error at line {e.lineno}: {e.message}", name) from None
    except RecursionError:
        raise DataError("chat template nested too deeply to compile", name) from None
    specials = _special_tokens(tokenizer) if tokenizer is not None else {}

    def render(messages, tools, add_generation_prompt):
        budget = _Budget(*_measure([messages, tools]))
        token = _BUDGET.set(budget)
        try:
            parts = []
            for chunk in compiled.generate(
                messages=_alias_reasoning(messages) if hub else messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **specials,
            ):
                budget.output += len(chunk)
                if budget.output > budget.max_size:
                    raise TemplateLimitError(f"rendered more than {budget.max_size:,} characters")
                if time.monotonic() > budget.deadline:
                    raise TemplateLimitError(f"ran past its deadline of {budget.seconds:.0f} s")
                parts.append(chunk)
            return "".join(parts)
        except (RecursionError, MemoryError, OverflowError) as e:
            raise _limit_error(e) from None
        finally:
            _BUDGET.reset(token)

    return ChatTemplate(name, json.dumps([source, specials], sort_keys=True), render)


def _tokenizer_has_template(tokenizer) -> bool:
    # mlx-lm's TokenizerWrapper knows about custom renderers as well as the HF template.
    has = getattr(tokenizer, "has_chat_template", None)
    if isinstance(has, bool):
        return has
    return getattr(tokenizer, "chat_template", None) is not None


def _jinja_source(tokenizer, tools=None) -> Optional[str]:
    """The tokenizer's Jinja template source (a named set picks ``tool_use`` when there are tools,
    as transformers does), or None when it has none or renders with mlx-lm's own code."""
    if getattr(tokenizer, "_chat_template", None) is not None:  # mlx-lm's renderer for this family
        return None
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("tool_use") if tools and "tool_use" in source else source.get("default")
    return source if isinstance(source, str) else None


def _tokenizer_template(tokenizer) -> ChatTemplate:
    """The tokenizer's own template. Its Jinja source renders in the bounded sandbox; only a
    renderer that mlx-lm ships for a model family (Python code of the installed mlx-lm, never
    of the model folder) is called through ``apply_chat_template``."""
    name = _template_file(tokenizer)
    raw = getattr(tokenizer, "chat_template", None)
    if _jinja_source(tokenizer) is not None or isinstance(raw, dict):
        compiled: dict[Optional[str], ChatTemplate] = {}

        def render(messages, tools, add_generation_prompt):
            source = _jinja_source(tokenizer, tools)
            if source is None:
                raise TemplateLimitError("has no template for this conversation")
            if source not in compiled:
                compiled[source] = template_from_source(source, name, tokenizer, hub=True)
            return compiled[source]._render(messages, tools, add_generation_prompt)

        source_key = json.dumps([raw, _special_tokens(tokenizer)], sort_keys=True, default=str)
        return ChatTemplate(name, source_key, render)

    source = json.dumps(raw, sort_keys=True, default=str)

    def render_with_mlx_lm(messages, tools, add_generation_prompt):
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            kwargs["tools"] = tools
        return tokenizer.apply_chat_template(messages, **kwargs)

    return ChatTemplate(name, source, render_with_mlx_lm)


def _template_file(tokenizer) -> str:
    """Where a tokenizer's chat template was read from, for messages."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the chat template of tokenizer {folder}"


def _check_template(template: ChatTemplate, field: Optional[str] = None) -> None:
    """Render a template once on a short conversation, so that one that goes past the limits
    even there is refused before any work starts, naming its file. (A template that merely
    refuses the probe, e.g. one without a system role, is judged on real rows.)"""
    try:
        template.render(_PROBE)
        template.render(_PROBE[:2], add_generation_prompt=True)
    except TemplateLimitError as e:
        raise DataError(f"chat template {e} (rendering a 3-message conversation)", template.name, field=field) from None
    except Exception:
        return


def apply_chat_template(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: Optional[list] = None,
    template: Optional[ChatTemplate] = None,
) -> str:
    """The bounded replacement of ``tokenizer.apply_chat_template(..., tokenize=False)``: the
    text of ``messages`` through ``template`` (default: the tokenizer's own). Any limit it goes
    past is a :class:`DataError` naming the template's file. Raises DataError when the tokenizer
    has no template."""
    template = template or resolve_chat_template(None, tokenizer)
    if template is None:
        raise DataError("the tokenizer has no chat template", _template_file(tokenizer), field="chat_template")
    try:
        return template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    except TemplateLimitError as e:
        raise DataError(f"chat template {e}", template.name) from None


def resolve_chat_template(spec: Optional[str], tokenizer) -> Optional[ChatTemplate]:
    """The template ``data.chat_template`` asks for, or None when it is unset and the tokenizer
    has none (only an error once a chat row needs it)."""
    if spec is None or spec == "":
        if not _tokenizer_has_template(tokenizer):
            return None
        template = _tokenizer_template(tokenizer)
        _check_template(template, field="chat_template")
        return template
    if spec in BUILTIN_TEMPLATES:
        return template_from_source(BUILTIN_TEMPLATES[spec].read_text(encoding="utf-8"), spec, tokenizer)
    path = Path(spec).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(BUILTIN_TEMPLATES))
        raise DataError(f"not a built-in template ({known}) and no such file", str(path), field="data.chat_template")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", str(path), field="data.chat_template") from None
    return template_from_source(source, str(path), tokenizer)
