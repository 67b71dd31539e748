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
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import DataError

TEMPLATE_DIR = Path(__file__).parent / "templates"
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


def _jinja_environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the rendered prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
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
        return compiled.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **specials)

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


def resolve_chat_template(spec: Optional[str], tokenizer) -> Optional[ChatTemplate]:
    """The template ``data.chat_template`` asks for, or None when it is unset and the tokenizer
    has none (only an error once a chat row needs it)."""
    if spec is None or spec == "":
        return _tokenizer_template(tokenizer) if _tokenizer_has_template(tokenizer) else None
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
