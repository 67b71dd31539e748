"""Prompt templates: chat templates and the Alpaca prompt.

A chat template turns a list of ``{role, content}`` messages into text. It comes from one of three
places, chosen by ``data.chat_template``:

- unset: the tokenizer's own template, through ``tokenizer.apply_chat_template`` (Hugging Face
  tokenizers and mlx-lm's ``TokenizerWrapper`` both provide it);
- ``chatml``: the built-in ``templates/chatml.jinja``;
- a path to a ``.jinja`` file.

Templates of the last two kinds are rendered in a sandboxed Jinja environment that offers what Hub
templates expect (``raise_exception``, ``strftime_now``, a ``tojson`` filter that does not escape
HTML, loop controls, trimmed blocks), so a template copied out of a model's tokenizer_config.json
renders here as it does in transformers.

A template is a program, and one that loops (nearly) forever or builds gigabytes of text would hang
or exhaust memory halfway through tokenizing a data set. Rendering is therefore bounded: every loop
iteration, call, filter and operator counts against a step budget, and no value or output may grow
past a size limit; both scale with the conversation being rendered (see :class:`_Budget`). Going
past either raises :class:`TemplateLimitError`, which the data loader reports with the row.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

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

    def render(
        self, messages: list[dict], *, tools: Optional[list] = None, add_generation_prompt: bool = False
    ) -> str:
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
    """A chat template went past its step budget or size limit while rendering."""


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


class _Budget:
    """What one render may still do; set for the duration of :meth:`ChatTemplate.render`."""

    def __init__(self, items: int, chars: int):
        self.steps = _STEPS_BASE + _STEPS_PER_ITEM * items
        self.max_size = _SIZE_BASE + _SIZE_PER_CHAR * chars
        self.output = 0

    def spend(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise TemplateLimitError("went past its step budget (loop iterations, calls and filters); "
                                     "a template must not loop without end")

    def check_size(self, value: Any, what: str = "a value") -> None:
        try:
            n = len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0
        except TypeError:
            n = 0
        if n > self.max_size:
            raise TemplateLimitError(f"built {what} of {n:,} characters or items, over the limit of "
                                     f"{self.max_size:,}")
        if n >= _CHARS_PER_STEP:
            self.spend(n // _CHARS_PER_STEP)

    def check_args(self, args, kwargs) -> None:
        # Widths and counts (center(10**9), indent(...)) allocate before returning: refuse them first.
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_size:
                raise TemplateLimitError(f"called with the number {a}, over the size limit of {self.max_size:,}")
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
            raise TemplateLimitError(f"{name} would build {size:,} characters, over the size limit of "
                                     f"{self.max_size:,}")


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
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with every call, operator and loop iteration charged to the render's budget."""

        intercepted_binops = frozenset(["+", "*", "**", "%"])

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            b = _budget()
            b.spend()
            b.check_args(args, kwargs)
            # str.replace / str.join / str.format called as methods (the sandbox wraps format)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):
                b.check_result(getattr(__obj, "__name__", ""), (owner, *args), kwargs)
            rv = super().call(__context, __obj, *args, **kwargs)
            b.check_size(rv)
            return rv

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.spend()
            sized = (str, list, tuple)
            if operator == "*":
                seq, n = (left, right) if isinstance(left, sized) else (right, left)
                if isinstance(seq, sized) and isinstance(n, int) and len(seq) * max(n, 0) > b.max_size:
                    raise TemplateLimitError(f"repeated a value {n} times, over the size limit of {b.max_size:,}")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                if len(left) + len(right) > b.max_size:
                    raise TemplateLimitError(f"joined values over the size limit of {b.max_size:,}")
            elif operator == "%" and isinstance(left, str):
                b.check_result("format", (left,), {})
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                # The result has about right * log2|left| bits: refuse numbers no template needs.
                if abs(left) > 1 and right * math.log2(abs(left)) > 4096:
                    raise TemplateLimitError(f"computed {left} ** {right}, a number too large to render")
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

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    contexts = (jinja2.runtime.Context, nodes.EvalContext, jinja2.Environment)
    env.filters = {name: _bounded_filter(name, f, contexts) for name, f in env.filters.items()}
    env.filters[_COUNTED] = jinja2.pass_context(_count_iterations)
    env.filters[_CHECKED] = jinja2.pass_context(_check_value)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) would run for hours inside one call
    return env


def _special_tokens(tokenizer) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, the variables Hub templates read."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            out[name] = value
        elif value is not None and isinstance(getattr(value, "content", None), str):
            out[name] = value.content
    return out


def template_from_source(source: str, name: str, tokenizer=None) -> ChatTemplate:
    """Compile Jinja ``source`` into a ChatTemplate; syntax errors become DataError."""
    import jinja2

    try:
        compiled = _jinja_environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template syntax error at line {e.lineno}: {e.message}", name) from None
    specials = _special_tokens(tokenizer) if tokenizer is not None else {}

    def render(messages, tools, add_generation_prompt):
        budget = _Budget(*_measure([messages, tools]))
        token = _BUDGET.set(budget)
        try:
            parts = []
            for chunk in compiled.generate(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           **specials):
                budget.output += len(chunk)
                if budget.output > budget.max_size:
                    raise TemplateLimitError(f"rendered more than {budget.max_size:,} characters")
                parts.append(chunk)
            return "".join(parts)
        finally:
            _BUDGET.reset(token)

    return ChatTemplate(name, json.dumps([source, specials], sort_keys=True), render)


def _tokenizer_has_template(tokenizer) -> bool:
    # mlx-lm's TokenizerWrapper knows about custom renderers as well as the HF template.
    has = getattr(tokenizer, "has_chat_template", None)
    if isinstance(has, bool):
        return has
    return getattr(tokenizer, "chat_template", None) is not None


def _tokenizer_template(tokenizer) -> ChatTemplate:
    # A custom renderer (mlx-lm) has no Jinja source; its fingerprint rests on what it renders.
    source = json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str)

    def render(messages, tools, add_generation_prompt):
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            kwargs["tools"] = tools
        return tokenizer.apply_chat_template(messages, **kwargs)

    return ChatTemplate("the tokenizer's chat template", source, render)


def _template_file(tokenizer) -> str:
    """Where a tokenizer's chat template was read from, for messages."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the chat template of tokenizer {folder}"


def _check_tokenizer_template(tokenizer) -> None:
    """Render the tokenizer's Jinja template once, bounded, on a short conversation.

    transformers renders it without bounds, so a template that loops (nearly) forever would hang
    on the first row. One that goes past the limits of the bounded sandbox on three short
    messages is refused here. Anything else this sandbox cannot render (transformers' own tags,
    say) is left to transformers, which renders the rows."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        return
    try:
        template = template_from_source(source, "the tokenizer's chat template", tokenizer)
        template.render(_PROBE)
        template.render(_PROBE[:2], add_generation_prompt=True)
    except TemplateLimitError as e:
        raise DataError(f"chat template {e} (rendering a 3-message conversation)", _template_file(tokenizer),
                        field="chat_template") from None
    except Exception:
        return


def resolve_chat_template(spec: Optional[str], tokenizer) -> Optional[ChatTemplate]:
    """The template ``data.chat_template`` asks for, or None when it is unset and the tokenizer
    has none (only an error once a chat row needs it)."""
    if spec is None or spec == "":
        if not _tokenizer_has_template(tokenizer):
            return None
        _check_tokenizer_template(tokenizer)
        return _tokenizer_template(tokenizer)
    if spec in BUILTIN_TEMPLATES:
        return template_from_source(BUILTIN_TEMPLATES[spec].read_text(encoding="utf-8"), spec, tokenizer)
    path = Path(spec).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(BUILTIN_TEMPLATES))
        raise DataError(
            f"not a built-in template ({known}) and no such file", str(path), field="data.chat_template"
        )
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", str(path), field="data.chat_template") from None
    return template_from_source(source, str(path), tokenizer)
