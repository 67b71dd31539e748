"""Everything mlx-lora uses of mlx-lm beyond its public API, in one place.

mlx-lm's public entry points (``mlx_lm.load``, ``generate.stream_generate``,
``sample_utils.make_sampler``, ``utils.load_model``, ``utils.load_tokenizer``) are used where they
are needed. What is private or a submodule's internals lives here, so that a new mlx-lm release
means checking this one file:

- ``mlx_lm.utils._get_classes``: the model and argument classes of an architecture;
- ``mlx_lm.models.cache.BatchKVCache``: a KV cache for left-padded batches;
- ``mlx_lm.models.switch_layers``: the expert layers of mixture-of-experts blocks;
- the KV cache objects of ``mlx_lm.models.cache`` (``make_prompt_cache``, each cache's ``merge``,
  ``extend``, ``filter``, ``extract``, ``trim``, ``nbytes`` and ``KVCache``'s ``keys`` / ``values`` /
  ``offset``), which :mod:`mlx_lora.inference.engine` joins into and splits out of a running batch;
- the layout of mlx-lm's causal language models (an inner ``model`` returning the final hidden
  states, then ``lm_head`` or the tied embedding's ``as_linear``), which :func:`last_position_head`
  relies on after checking it on the model at hand;
- the cache protocol of ``mlx_lm.models.base.create_attention_mask`` (``make_mask``, ``offset``,
  ``update_and_fetch``), which :class:`SegmentMask` implements to carry a packed batch's mask.

mlx-lm is imported only when one of these is called: importing it takes seconds, and commands
that never build a model (``mlx-lora --help``) must not pay for it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes


def model_classes(config: dict) -> tuple[type, type]:
    """(model class, model-args class) of ``config["model_type"]`` (ValueError or ImportError
    when the installed mlx-lm has no such architecture)."""

    return _get_classes(config)


def batch_kv_cache(left_padding: list[int]):
    """A KV cache for one layer of a batch whose rows are left-padded by ``left_padding`` tokens:
    it masks the padding and offsets each row's positions."""

    return BatchKVCache(left_padding)


class SegmentMask:
    """A stand-in for mlx-lm's KV cache that carries a packed batch's block-diagonal mask.

    mlx-lm models build their attention mask from ``cache.make_mask`` when the cache has one and
    apply RoPE at ``cache.offset``; returning our mask and storing nothing makes every
    architecture honour packing without touching its code. RoPE scores depend only on relative
    positions, so examples packed later in a row see the same attention as if they were alone.
    """

    offset = 0

    def __init__(self, mask):
        self.mask = mask  # [B, 1, L, L] bool mx.array

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):

        mask = self.mask
        if window_size is not None and window_size < N:
            i = mx.arange(N)
            mask = mask & ((i[:, None] - i[None]) < window_size)
        return mask

    def update_and_fetch(self, keys, values):
        return keys, values

    def __bool__(self):  # some models test `if cache` before asking for a mask
        return True


def switch_linear_classes() -> tuple[type, type]:
    """(``SwitchLinear``, ``QuantizedSwitchLinear``): the expert layers of mlx-lm's mixture-of-experts
    blocks (``SwitchGLU`` / ``SwitchMLP``), one [experts, out, in] weight called with expert indices."""

    return SwitchLinear, QuantizedSwitchLinear


# ----------------------------------------------------------------------------------------------
# KV caches for the generation engine (mlx_lora.inference.engine)


def new_row_cache(model) -> list:
    """A fresh cache for one sequence (one entry per layer, of the kinds the model asks for)."""

    return make_prompt_cache(model)


def batch_of_rows(row_caches: list[list]) -> list:
    """One batch cache per layer holding the given single-row caches, left-padded to one length."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*row_caches)]


def extend_batch(batch: Optional[list], more: list) -> list:
    """``batch`` with the rows of ``more`` appended (``batch`` None: ``more`` itself)."""
    if not batch:
        return more
    for c, m in zip(batch, more):
        c.extend(m)
    return batch


def keep_rows(batch: list, keep: list[int]) -> Optional[list]:
    """``batch`` holding only the rows ``keep`` (None when no row is left)."""
    if not keep:
        return None
    for c in batch:
        c.filter(keep)
    return batch


def row_of_batch(batch: list, i: int) -> list:
    """Row ``i`` of a batch as a single-row cache (a copy)."""
    return [c.extract(i) for c in batch]


def cache_nbytes(caches: list) -> int:
    return sum(int(c.nbytes) for c in caches)


def is_plain_kv(caches: list) -> bool:
    """Whether every layer's cache is a plain ``KVCache`` (its keys and values can be cut to a prefix)."""

    return all(type(c) is KVCache for c in caches)


def kv_prefix(caches: list, n: int) -> list:
    """New plain KV caches holding the first ``n`` positions of ``caches`` (which are left as they are)."""

    out = []
    for c in caches:
        k = KVCache()
        if c.keys is not None and n > 0:
            k.keys = c.keys[..., :n, :]
            k.values = c.values[..., :n, :]
            k.offset = n
        out.append(k)
    return out


def kv_arrays(caches: list) -> list:
    """The arrays a list of caches holds (to evaluate them)."""
    return [a for c in caches for a in (getattr(c, "keys", None), getattr(c, "values", None)) if a is not None]


# Model-argument names of transforms applied to the logits after the output layer (soft-capping,
# scaling): a model with one keeps the whole forward pass.
_AFTER_HEAD = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def last_position_head(model):
    """``(inner, head)`` such that ``head(inner(tokens, cache=cache)[:, -1:, :])[:, -1, :]`` are the
    logits of the last position, which ``model(tokens, cache=cache)[:, -1, :]`` gives at the cost of
    the output layer over every position (for a prompt of n tokens, n times a decode step's output
    layer: 49152 x 576 multiply-adds per position for SmolLM2). None when the model is not laid out
    that way, as checked on a three-token input against the whole forward pass (an output scale or
    soft-capping after the head, a multimodal wrapper: these keep the whole forward pass)."""

    inner = getattr(model, "model", None)
    if not callable(inner):
        return None
    args = getattr(model, "args", None)
    if any(getattr(args, k, None) for k in _AFTER_HEAD):  # a transform of the logits the check may not see
        return None
    if "lm_head" in model and callable(model["lm_head"]):
        head = model["lm_head"]
    elif callable(getattr(getattr(inner, "embed_tokens", None), "as_linear", None)):
        head = inner.embed_tokens.as_linear
    else:
        return None
    try:
        x = mx.array([[1, 2, 3]], dtype=mx.int32)
        full = model(x)[:, -1, :]
        part = head(inner(x)[:, -1:, :])[:, -1, :]
        mx.eval(full, part)
    except Exception:
        return None
    full, part = full.astype(mx.float32), part.astype(mx.float32)
    if full.shape != part.shape or not mx.allclose(full, part, rtol=1e-4, atol=1e-4):
        return None
    return inner, head


def detokenizer(tokenizer):
    """A fresh streaming detokenizer of an mlx-lm ``TokenizerWrapper`` (``add_token``,
    ``last_segment``, ``finalize``)."""
    return tokenizer.detokenizer
