"""Losses. Each returns ``(sum of token losses, number of target tokens)`` so that averages over
micro-batches, accumulation steps and ranks are weighted by tokens, not by batches.

Two ways to compute the same token-level cross-entropy
``sum_t m_t * (logsumexp(z_t) - z_t[y_t])`` with logits ``z_t = head(h_t)``:

- :func:`masked_cross_entropy` runs the whole model and materialises the ``[tokens, vocab]``
  logits (plus the same-sized softmax and gradient arrays in the backward pass). With a 49k or
  150k vocabulary that is the largest activation of a LoRA step.
- :func:`chunked_cross_entropy` runs the model up to its final hidden states ``h`` and applies the
  output layer and the loss ``chunk_tokens`` rows at a time. In training the gradient with
  respect to ``h`` is computed in the same pass (``dL/dh_t = head^T (softmax(z_t) - e_{y_t}) m_t``,
  via the head's own VJP, so tied embeddings, quantized heads and Gemma-2's logit soft-capping
  all work), and each chunk's logits are freed before the next chunk starts. The backward pass
  then just scales the stored ``dL/dh``. No extra matmul over plain autodiff, and only one
  chunk of logits exists at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.plumbing.mlx_lm_compat import SegmentMask

log = logging.getLogger(__name__)


def _cache(model: nn.Module, attn_mask: Optional[mx.array]):
    return None if attn_mask is None else [SegmentMask(attn_mask)] * len(model.layers)


def model_logits(model: nn.Module, inputs: mx.array, attn_mask: Optional[mx.array] = None) -> mx.array:
    cache = _cache(model, attn_mask)
    return model(inputs) if cache is None else model(inputs, cache=cache)


def _token_ce(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32: logsumexp(z) - z[y]."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.stop_gradient(targets)[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def masked_cross_entropy(
    model: nn.Module, inputs: mx.array, targets: mx.array, loss_mask: mx.array, attn_mask: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """Token-level cross-entropy summed over target positions, and the target count."""
    logits = model_logits(model, inputs, attn_mask)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    ce = ce * loss_mask
    return ce.sum(), loss_mask.sum()


# ----------------------------------------------------------------------------------------------
# splitting a model into body and output layer


@dataclass
class HeadSplit:
    """``model(x) == head(body(x, cache))`` for a model whose output layer we can run alone."""

    body: Callable  # (inputs [B, L], cache or None) -> final hidden states [B, L, D]
    head: Callable  # hidden [..., D] -> logits [..., V]
    head_module: nn.Module  # the module holding the output weights (lm_head or tied embedding)


def split_head(model: nn.Module) -> Optional[HeadSplit]:
    """Find the final-hidden-state function and the output layer of an mlx-lm model.

    mlx-lm causal LMs keep the transformer in ``model.model`` and finish with either ``lm_head``
    or the tied embedding's ``as_linear`` (``args.tie_word_embeddings``, and always for Gemma),
    Gemma-2 then soft-caps the logits: ``c * tanh(z / c)``. Returns None when the model does not
    have that shape; :func:`verify_split` checks the result numerically.
    """
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    args = getattr(model, "args", None)
    tied = bool(getattr(args, "tie_word_embeddings", False))
    lm_head = getattr(model, "lm_head", None) if "lm_head" in model else None
    if lm_head is not None and not tied:
        head_module, linear = lm_head, lm_head
    else:
        emb = getattr(inner, "embed_tokens", None)
        if emb is None or not hasattr(emb, "as_linear"):
            return None
        head_module, linear = emb, emb.as_linear
    cap = getattr(model, "final_logit_softcapping", None)
    if cap is None and args is not None:
        cap = getattr(args, "final_logit_softcapping", None)

    def body(inputs, cache=None):
        return inner(inputs, cache)

    if cap:
        cap = float(cap)

        def head(h):
            return mx.tanh(linear(h) / cap) * cap
    else:
        head = linear
    return HeadSplit(body, head, head_module)


def verify_split(model: nn.Module, split: HeadSplit) -> bool:
    """True when ``head(body(x))`` reproduces ``model(x)`` on a short input (eval mode, so LoRA
    dropout does not interfere). Architectures that scale or post-process logits in ways
    :func:`split_head` does not know fail here and keep the plain loss."""
    training = model.training
    model.eval()
    try:
        x = mx.array([[0, 1, 0]], dtype=mx.int32)
        ref = model(x)
        got = split.head(split.body(x, None))
        mx.eval(ref, got)
        ok = ref.shape == got.shape and bool(
            mx.allclose(ref.astype(mx.float32), got.astype(mx.float32), rtol=1e-3, atol=1e-3).item()
        )
    except Exception as e:  # an unknown architecture may reject the call itself
        log.info("chunked loss: cannot run the model without its output layer (%s: %s)", type(e).__name__, e)
        ok = False
    finally:
        model.train(training)
    return ok


# ----------------------------------------------------------------------------------------------
# the chunked loss


def _fused_head_ce(head: Callable, chunk_tokens: int):
    """A differentiable ``(h [N, D], targets [N], mask [N]) -> (loss sum, dL/dh)`` that computes
    the gradient in the forward pass, one chunk of rows at a time."""

    def forward(h, targets, mask):
        losses, grads = [], []
        n = h.shape[0]
        for s in range(0, n, chunk_tokens):
            hc, tc, mc = h[s : s + chunk_tokens], targets[s : s + chunk_tokens], mask[s : s + chunk_tokens]
            if grads:
                # Finish the previous chunk (loss and gradient) before this one's logits exist;
                # without the edge the evaluator may compute every chunk's logits first.
                hc = mx.depends(hc, [losses[-1], grads[-1]])

            def chunk_loss(x, tc=tc, mc=mc):
                return (_token_ce(head(x), tc) * mc).sum()

            (loss,), (dh,) = mx.vjp(chunk_loss, [hc], [mx.array(1.0, mx.float32)])
            losses.append(loss)
            grads.append(dh.astype(h.dtype))
        return mx.stack(losses).sum(), mx.concatenate(grads, axis=0)

    fused = mx.custom_function(forward)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets, mask = primals
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        return (g.astype(h.dtype) * outputs[1]), mx.zeros_like(targets), mx.zeros_like(mask)

    return fused


def _chunked_forward_ce(head: Callable, h, targets, mask, chunk_tokens: int):
    """Loss only (evaluation): each chunk's logits are freed once its sum is taken."""
    total = mx.array(0.0, mx.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        z = head(h[s : s + chunk_tokens])
        total = total + (_token_ce(z, targets[s : s + chunk_tokens]) * mask[s : s + chunk_tokens]).sum()
    return total


@dataclass
class Loss:
    """The loss functions a trainer uses: ``train`` for value_and_grad, ``eval`` without grads.
    Both have the signature of :func:`masked_cross_entropy`."""

    train: Callable
    eval: Callable
    chunk_tokens: Optional[int]
    """Rows per chunk when the chunked loss is in use, None for the plain loss."""
    note: str = ""
    """Why the plain loss is used although chunking was asked for (empty otherwise)."""

    def positions(self, loss_mask) -> Optional[mx.array]:
        """The extra ``positions`` argument ``train`` takes for this mask, or None when it takes
        none (the plain loss)."""
        return None if self.chunk_tokens is None else target_positions(loss_mask)


POSITION_QUANTUM = 32  # the smallest step between gathered-row counts


def target_positions(loss_mask) -> mx.array:
    """Flat indices of the target positions of a ``[B, L]`` mask, padded with -1.

    The count is rounded up to a multiple of ``max(32, B*L/8)`` so a batch shape is traced
    (compiled) at most 8 ways, whatever its number of targets, while a small batch with few
    targets still runs the output layer on few rows (the loss's chunk size only splits the rows
    into chunks). Computed on the host from the mask the batch was built with.
    """
    m = np.asarray(loss_mask).reshape(-1)
    idx = np.flatnonzero(m > 0).astype(np.int32)
    n = m.shape[0]
    quantum = max(POSITION_QUANTUM, -(-n // 8))
    size = min(max(-(-len(idx) // quantum), 1) * quantum, max(n, 1))
    out = np.full(max(size, len(idx)), -1, dtype=np.int32)
    out[: len(idx)] = idx
    return mx.array(out)


def chunked_cross_entropy(split: HeadSplit, chunk_tokens: int) -> tuple[Callable, Callable]:
    """(train, eval) loss functions with the signature of :func:`masked_cross_entropy` that never
    materialise more than ``chunk_tokens`` rows of logits.

    ``train`` takes an optional last argument ``positions`` (:func:`target_positions`): then the
    output layer and the loss run only at those positions. Prompt and padding positions carry no
    loss, and the output layer (vocab x hidden weights) is a large share of a small model's
    matmuls, so this skips real work; the result is the same.
    """
    fused = _fused_head_ce(split.head, chunk_tokens)

    def flat(model, inputs, targets, loss_mask, attn_mask):
        h = split.body(inputs, _cache(model, attn_mask))
        d = h.shape[-1]
        return h.reshape(-1, d), targets.reshape(-1), loss_mask.reshape(-1).astype(mx.float32)

    def train(model, inputs, targets, loss_mask, attn_mask=None, positions=None):
        h, t, m = flat(model, inputs, targets, loss_mask, attn_mask)
        if positions is not None:
            valid = positions >= 0
            idx = mx.where(valid, positions, 0)
            h, t, m = h[idx], t[idx], m[idx] * valid
        loss, _ = fused(h, t, m)
        return loss, loss_mask.sum()

    def evaluate(model, inputs, targets, loss_mask, attn_mask=None):
        h, t, m = flat(model, inputs, targets, loss_mask, attn_mask)
        return _chunked_forward_ce(split.head, h, t, m, chunk_tokens), loss_mask.sum()

    return train, evaluate


def make_loss(model: nn.Module, chunk_tokens: Optional[int], *, training: bool = True) -> Loss:
    """The chunked loss when ``chunk_tokens`` is set and the model can be split (checked
    numerically), else the plain loss, with the reason in ``note`` (also logged).

    ``training=False`` (evaluation only): no gradient is taken, so the output layer's trainable
    parameters (every parameter of a base model loaded for inference is) do not matter."""
    plain = Loss(masked_cross_entropy, masked_cross_entropy, None)
    if not chunk_tokens:
        return plain
    split = split_head(model)
    reason = ""
    if split is None:
        reason = f"{type(model).__module__}.{type(model).__name__} has no separable output layer"
    elif training and tree_flatten(split.head_module.trainable_parameters()):
        reason = "the output layer has trainable parameters"
    elif not verify_split(model, split):
        reason = "running the output layer alone does not reproduce the model's logits"
    if reason:
        note = f"chunked loss unavailable ({reason}); using the plain loss"
        log.warning(note)
        plain.note = note
        return plain
    train, evaluate = chunked_cross_entropy(split, chunk_tokens)
    return Loss(train, evaluate, chunk_tokens)
