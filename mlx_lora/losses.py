"""Losses. Each returns ``(sum of token losses, number of target tokens)`` so that averages over
micro-batches, accumulation steps and ranks are weighted by tokens, not by batches."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn


class SegmentMask:
    """A stand-in for mlx-lm's KV cache that carries a packed batch's block-diagonal mask.

    mlx-lm models build their attention mask from ``cache.make_mask`` when the cache has one and
    apply RoPE at ``cache.offset``; returning our mask and storing nothing makes every
    architecture honour packing without touching its code. RoPE scores depend only on relative
    positions, so examples packed later in a row see the same attention as if they were alone.
    """

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask  # [B, 1, L, L] bool

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


def model_logits(model: nn.Module, inputs: mx.array, attn_mask: Optional[mx.array] = None) -> mx.array:
    if attn_mask is None:
        return model(inputs)
    cache = [SegmentMask(attn_mask)] * len(model.layers)
    return model(inputs, cache=cache)


def masked_cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array, loss_mask: mx.array,
                         attn_mask: Optional[mx.array] = None) -> tuple[mx.array, mx.array]:
    """Token-level cross-entropy summed over target positions, and the target count."""
    logits = model_logits(model, inputs, attn_mask)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    ce = ce * loss_mask
    return ce.sum(), loss_mask.sum()
