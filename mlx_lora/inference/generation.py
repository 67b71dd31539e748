"""Generation for ``chat`` and ``serve``: chat prompts, sampling limits, streamed text that honours
stop strings, and one base model that serves several adapters in turn.

Tokens come from mlx-lm's public ``stream_generate`` with a ``make_sampler`` sampler (the same
calls ``generate`` uses). What is added here:

- :func:`chat_prompt` renders messages with the model's chat template, or the one
  ``--chat-template`` names (see :mod:`mlx_lora.data.templates`), and tokenizes the text without adding
  special tokens (the template writes them, as ``apply_chat_template(tokenize=True)`` does);
- :func:`stream` yields text pieces and ends in a :class:`Result` (finish reason, token counts).
  A stop string ends the text before it; text that could be the start of a stop string is held
  back until the next piece says whether it is, so a streamed reply equals the whole one;
- :class:`AdapterSet` keeps each adapter's LoRA/DoRA layers, built by
  :func:`mlx_lora.model.adapters.load_adapter` (every check of a loaded adapter applies), around the
  one base model's own layers: activating an adapter swaps its wrapper layers into the model and
  deactivating puts the base layers back. The base weights exist once whatever the number of
  adapters, and adapters may differ in rank, targets and LoRA/DoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from mlx_lora.config import MAX_SEED, MAX_SEQ_LENGTH, Bound
from mlx_lora.plumbing.errors import AdapterError, MlxLoraError

# The limits a request or a command line may ask for; the names are those of the OpenAI API.
LIMITS = {
    "max_tokens": Bound(int, 1, MAX_SEQ_LENGTH),
    "temperature": Bound(float, 0, 100),
    "top_p": Bound(float, 0, 1, lo_open=True, cap=False),
    "seed": Bound(int, 0, MAX_SEED),
}
MAX_STOPS = 4
"""Stop strings per request, as the OpenAI API allows."""


def sampling_checks(max_tokens, temperature, top_p, seed) -> list[tuple]:
    """The command-line checks of the sampling options, for :func:`mlx_lora.config.check_options`
    (which names every bad one in one message)."""
    return [(f"--{k.replace('_', '-')}", v, LIMITS[k]) for k, v in
            (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed))]


def chat_template_for(tokenizer, spec: Optional[str], model_name: str):
    """The ChatTemplate that ``spec`` (None, ``chatml`` or a ``.jinja`` path) selects. A tokenizer
    without a template needs ``spec``. With the built-in ChatML template, ``<|im_end|>`` (when the
    vocabulary has it) also ends a reply."""
    from mlx_lora.data.templates import BUILTIN_TEMPLATES, resolve_chat_template

    if spec is not None and (not isinstance(spec, str) or not spec.strip()):
        raise MlxLoraError("--chat-template must be 'chatml' or the path of a .jinja file")
    template = resolve_chat_template(spec, tokenizer)
    if template is None:
        raise MlxLoraError(f"{model_name}: the tokenizer has no chat template; pass --chat-template "
                           f"{'|'.join(BUILTIN_TEMPLATES)} or --chat-template FILE.jinja")
    if spec == "chatml":
        end = "<|im_end|>"
        vocab = getattr(tokenizer, "get_vocab", lambda: {})()
        if end in vocab and hasattr(tokenizer, "add_eos_token"):
            tokenizer.add_eos_token(end)
    return template


def chat_prompt(tokenizer, template, messages: list[dict], *, context: Optional[int] = None,
                max_tokens: Optional[int] = None) -> list[int]:
    """Token ids of ``messages`` followed by the assistant's generation prompt (rendered bounded,
    see :func:`mlx_lora.data.templates.apply_chat_template`). With ``max_tokens``, a prompt that leaves
    no room for them in ``context`` is refused (:func:`mlx_lora.inference.evaluation.bound_prompt`)."""
    from mlx_lora.inference.evaluation import bound_prompt
    from mlx_lora.data.templates import apply_chat_template

    text = apply_chat_template(tokenizer, messages, add_generation_prompt=True, template=template)
    if max_tokens is None:
        return encode(tokenizer, text)
    return bound_prompt(tokenizer, text, context=context, max_tokens=max_tokens, what="the conversation",
                        encode=lambda t: encode(tokenizer, t))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (a template or the user wrote them)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer whose encode takes no such argument
        return list(tokenizer.encode(text))


@dataclass
class Result:
    """How a generation ended: ``finish_reason`` is ``stop`` (end of turn or a stop string) or
    ``length`` (``max_tokens`` reached); ``text`` is everything yielded."""

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may yet become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream(model, tokenizer, prompt_tokens: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), result: Optional[Result] = None
           ) -> Iterator[str]:
    """Yield the reply to ``prompt_tokens`` piece by piece; ``result`` (when given) is filled in
    as it goes and is complete once the iterator ends. Greedy at temperature 0; otherwise seeded
    by ``seed``, so equal requests give equal replies."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    result = result if result is not None else Result()
    result.prompt_tokens = len(prompt_tokens)
    stops = [s for s in stop if s]
    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    text, sent = "", 0
    for r in stream_generate(model, tokenizer, prompt_tokens, max_tokens=max_tokens, sampler=sampler):
        result.completion_tokens = r.generation_tokens
        text += r.text
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
        if hits:
            end = min(hits)
            if end > sent:
                yield _emit(result, text[sent:end])
            result.finish_reason = "stop"
            return
        if r.finish_reason is not None:
            result.finish_reason = r.finish_reason
            if len(text) > sent:
                yield _emit(result, text[sent:])
            return
        ready = len(text) - _held_back(text, stops)
        if ready > sent:
            piece, sent = text[sent:ready], ready
            yield _emit(result, piece)
    result.finish_reason = result.finish_reason or "stop"


def _emit(result: Result, piece: str) -> str:
    result.text += piece
    return piece


class AdapterSet:
    """Several adapters on one base model, one active at a time (see the module docstring).

    ``adapters`` maps a name to an adapter or run folder. Each is loaded onto the plain base (so
    a misfit, a bad file or, with ``strict``, another base model is refused before any request),
    its wrapper layers are kept, and the base layers go back in. ``warn`` receives the warnings
    of adapters trained on another base."""

    def __init__(self, model, base_path, adapters: dict[str, str], *, strict: bool = False, warn=None):
        from mlx.utils import tree_unflatten

        from mlx_lora.model import adapters as adapters_mod
        from mlx_lora.model.integrity import check_adapter_base

        self.model = model
        self._layers: dict[str, list] = {}
        self._active: Optional[str] = None
        self._unflatten = tree_unflatten
        for name, folder in adapters.items():
            try:
                ainfo = adapters_mod.load_adapter(model, folder)
                wrapped = adapters_mod.adapter_layers(model)
            finally:
                self._restore_base(adapters_mod.adapter_layers(model))
            msg = check_adapter_base(ainfo, base_path, strict=strict, adapter_name=str(folder))
            if msg and warn is not None:
                warn(msg)
            self._layers[name] = wrapped
        model.eval()

    @property
    def names(self) -> list[str]:
        return list(self._layers)

    def _restore_base(self, wrapped) -> None:
        if wrapped:
            self.model.update_modules(self._unflatten([(p, m.base) for p, m in wrapped]))

    def activate(self, name: Optional[str]) -> None:
        """Make the model compute with adapter ``name`` (None: the base alone)."""
        if name == self._active:
            return
        if name is not None and name not in self._layers:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self._layers) or 'none'}")
        if self._active is not None:
            self._restore_base(self._layers[self._active])
            self._active = None
        if name is not None:
            self.model.update_modules(self._unflatten(list(self._layers[name])))
            self._active = name
