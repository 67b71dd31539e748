"""Everything mlx-lora uses of mlx-lm beyond its public API, in one place.

mlx-lm's public entry points (``mlx_lm.load``, ``generate.stream_generate``,
``sample_utils.make_sampler``, ``utils.load_model``, ``utils.load_tokenizer``) are used where they
are needed. What is private or a submodule's internals lives here, so that a new mlx-lm release
means checking this one file:

- ``mlx_lm.utils._get_classes``: the model and argument classes of an architecture;
- ``mlx_lm.models.cache.BatchKVCache``: a KV cache for left-padded batches;
- ``mlx_lm.models.switch_layers``: the expert layers of mixture-of-experts blocks;
- the cache protocol of ``mlx_lm.models.base.create_attention_mask`` (``make_mask``, ``offset``,
  ``update_and_fetch``), which :class:`SegmentMask` implements to carry a packed batch's mask.

mlx-lm is imported only when one of these is called: importing it takes seconds, and commands
that never build a model (``mlx-lora --help``) must not pay for it.
"""

from __future__ import annotations

from typing import Optional


def model_classes(config: dict) -> tuple[type, type]:
    """(model class, model-args class) of ``config["model_type"]`` (ValueError or ImportError
    when the installed mlx-lm has no such architecture)."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def batch_kv_cache(left_padding: list[int]):
    """A KV cache for one layer of a batch whose rows are left-padded by ``left_padding`` tokens:
    it masks the padding and offsets each row's positions."""
    from mlx_lm.models.cache import BatchKVCache

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
        import mlx.core as mx

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
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return SwitchLinear, QuantizedSwitchLinear
