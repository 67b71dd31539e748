"""Generation for ``generate``, ``chat`` and ``serve``: chat prompts, sampling limits and streamed
text that honours stop strings.

Tokens come from the one generation engine (:mod:`mlx_lora.inference.engine`). What is here:

- :func:`chat_prompt` renders messages with the model's chat template, or the one
  ``--chat-template`` names (see :mod:`mlx_lora.data.templates`), and tokenizes the text without adding
  special tokens (the template writes them, as ``apply_chat_template(tokenize=True)`` does);
- :func:`stream` yields text pieces and ends in a :class:`Result` (finish reason, token counts).
  A stop string ends the text before it; text that could be the start of a stop string is held
  back until the next piece says whether it is, so a streamed reply equals the whole one.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from mlx_lora.config import MAX_SEED, MAX_SEQ_LENGTH, Bound
from mlx_lora.data.templates import BUILTIN_TEMPLATES, apply_chat_template, resolve_chat_template
from mlx_lora.inference.engine import Engine, Result, Sampling
from mlx_lora.inference.evaluation import bound_prompt
from mlx_lora.plumbing.errors import MlxLoraError

__all__ = ["LIMITS", "MAX_STOPS", "Result", "chat_prompt", "chat_template_for", "encode", "sampling_checks", "stream"]

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
    return [
        (f"--{k.replace('_', '-')}", v, LIMITS[k])
        for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed))
    ]


def chat_template_for(tokenizer, spec: Optional[str], model_name: str):
    """The ChatTemplate that ``spec`` (None, ``chatml`` or a ``.jinja`` path) selects. A tokenizer
    without a template needs ``spec``. With the built-in ChatML template, ``<|im_end|>`` (when the
    vocabulary has it) also ends a reply."""

    if spec is not None and (not isinstance(spec, str) or not spec.strip()):
        raise MlxLoraError("--chat-template must be 'chatml' or the path of a .jinja file")
    template = resolve_chat_template(spec, tokenizer)
    if template is None:
        raise MlxLoraError(
            f"{model_name}: the tokenizer has no chat template; pass --chat-template "
            f"{'|'.join(BUILTIN_TEMPLATES)} or --chat-template FILE.jinja"
        )
    if spec == "chatml":
        end = "<|im_end|>"
        vocab = getattr(tokenizer, "get_vocab", lambda: {})()
        if end in vocab and hasattr(tokenizer, "add_eos_token"):
            tokenizer.add_eos_token(end)
    return template


def chat_prompt(
    tokenizer,
    template,
    messages: list[dict],
    tools: Optional[list] = None,
    *,
    context: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> list[int]:
    """Token ids of ``messages`` (and the ``tools`` the model may call) followed by the
    assistant's generation prompt, rendered bounded (see
    :func:`mlx_lora.data.templates.apply_chat_template`). With ``max_tokens``, a prompt that leaves
    no room for them in ``context`` is refused (:func:`mlx_lora.inference.evaluation.bound_prompt`)."""

    text = apply_chat_template(tokenizer, messages, add_generation_prompt=True, tools=tools, template=template)
    if max_tokens is None:
        return encode(tokenizer, text)
    return bound_prompt(
        tokenizer,
        text,
        context=context,
        max_tokens=max_tokens,
        what="the conversation",
        encode=lambda t: encode(tokenizer, t),
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (a template or the user wrote them)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer whose encode takes no such argument
        return list(tokenizer.encode(text))


def stream(
    model,
    tokenizer,
    prompt_tokens: list[int],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    result: Optional[Result] = None,
) -> Iterator[str]:
    """Yield the reply to ``prompt_tokens`` piece by piece through a one-request
    :class:`mlx_lora.inference.engine.Engine`; ``result`` (when given) is filled in once the iterator ends.
    Greedy at temperature 0; otherwise seeded by ``seed``, so equal requests give equal replies."""
    engine = Engine(model, tokenizer, max_batch=1, prompt_cache_bytes=0)
    try:
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop))
        for token in engine.stream(prompt_tokens, None, sampling, result):
            if token.text:
                yield token.text
    finally:
        engine.close()
