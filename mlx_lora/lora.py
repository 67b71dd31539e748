"""LoRA and DoRA layers that wrap an existing ``nn.Linear`` or ``nn.QuantizedLinear``.

LoRA (Hu et al. 2021, arXiv:2106.09685):

    y = W x + b + s * B (A dropout(x)),     A: [r, in], B: [out, r], s = alpha / r

with ``s = alpha / sqrt(r)`` for rsLoRA (Kalajdzievski 2023, arXiv:2312.03732). ``A`` is initialised
like PEFT's default (Kaiming-uniform, bound 1/sqrt(in)) and ``B`` to zero, so the wrapped layer
equals the base layer at step 0. Shapes follow PEFT's ``lora_A.weight`` / ``lora_B.weight`` so
adapters save without transposes.

DoRA (Liu et al. 2024, arXiv:2402.09353) re-parameterises the merged weight as magnitude times
direction, with the row norm treated as a constant in the backward pass (paper section 4.3):

    W' = W + s B A,   y = m * (W' x) / ||W'||_row + b,   m initialised to ||W||_row

The base layer is never modified; :meth:`fuse` returns a new plain layer.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn

Base = Union[nn.Linear, nn.QuantizedLinear]


def base_dims(layer: Base) -> tuple[int, int]:
    """(out_features, in_features) of a linear or quantized linear layer."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return out_dims, in_dims


def dense_weight(layer: Base) -> mx.array:
    """The layer's weight as a dense [out, in] array (dequantized when quantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return layer.weight


class LoRALinear(nn.Module):
    """A LoRA adapter around a frozen base layer (QLoRA when the base is quantized)."""

    adapter_off = False
    """When True (see :func:`adapters_off`) the layer is exactly its base layer."""

    def __init__(self, base: Base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        out_dims, in_dims = base_dims(base)
        # Checked before lora_a / lora_b are allocated: r x in floats for a mistyped r can take the
        # whole memory. The rank of B A cannot exceed min(out, in), so a larger r adds nothing.
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= min(out_dims, in_dims):
            raise ValueError(f"LoRA rank must be an integer in [1, {min(out_dims, in_dims)}] for a layer with "
                             f"{in_dims} inputs and {out_dims} outputs, got {r!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
        self.base = base
        self.base.freeze()
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (r, in_dims), dtype=mx.float32)
        self.lora_b = mx.zeros((out_dims, r), dtype=mx.float32)

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    def _lora(self, x: mx.array) -> mx.array:
        # The adapter's math runs in the activations' dtype (bf16 on GPU); its weights and the
        # optimizer state stay float32.
        h = self.dropout(x) if self.dropout is not None else x
        a = self.lora_a.astype(x.dtype)
        b = self.lora_b.astype(x.dtype)
        return ((h @ a.T) @ b.T) * self.scale

    def __call__(self, x: mx.array) -> mx.array:
        if self.adapter_off:
            return self.base(x)
        return self.base(x) + self._lora(x)

    def delta(self) -> mx.array:
        """s * B @ A, the [out, in] change this adapter makes to the weight, in float32."""
        return self.scale * (self.lora_b @ self.lora_a)

    def fuse(self) -> nn.Linear:
        """A new ``nn.Linear`` with the adapter merged, in the base weight's precision.

        A quantized base is dequantized (to its scales' dtype); re-quantizing is an explicit,
        separate step because it can round a small fine-tune away.
        """
        w = dense_weight(self.base)
        merged = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        return _make_linear(merged, self.base.get("bias"))


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: a trainable per-output magnitude times the adapted direction."""

    def __init__(self, base: Base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        w = dense_weight(base).astype(mx.float32)
        self.magnitude = mx.linalg.norm(w, axis=1)

    def _merged_weight(self) -> mx.array:
        return dense_weight(self.base).astype(mx.float32) + self.delta()

    def __call__(self, x: mx.array) -> mx.array:
        if self.adapter_off:
            return self.base(x)
        bias = self.base.get("bias")
        base_out = self.base(x)
        if bias is not None:
            base_out = base_out - bias
        w = self._merged_weight()
        # Detached norm (DoRA section 4.3): saves memory, same fixed point.
        norm = mx.stop_gradient(mx.linalg.norm(w, axis=1))
        factor = (self.magnitude / norm).astype(x.dtype)
        out = factor * (base_out + self._lora(x))
        return out + bias if bias is not None else out

    def fuse(self) -> nn.Linear:
        base_w = dense_weight(self.base)
        w = self._merged_weight()
        w = (self.magnitude / mx.linalg.norm(w, axis=1))[:, None] * w
        return _make_linear(w.astype(base_w.dtype), self.base.get("bias"))


def _make_linear(weight: mx.array, bias: Optional[mx.array]) -> nn.Linear:
    mx.eval(weight)
    if not bool(mx.all(mx.isfinite(weight)).item()):
        raise ValueError("fused weight has NaN or inf values; the adapter is broken, refusing to fuse")
    out_dims, in_dims = weight.shape
    layer = nn.Linear(in_dims, out_dims, bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def is_adapter_layer(m) -> bool:
    return isinstance(m, LoRALinear)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within this block every LoRA/DoRA layer of ``model`` computes its base layer alone: the
    model is its base model, from the same weights (no copy). Used for DPO's reference model; a
    Python flag, so inside a traced (compiled) function the trace takes the base path."""
    layers = [m for _, m in model.named_modules() if is_adapter_layer(m)]
    for m in layers:
        m.adapter_off = True
    try:
        yield
    finally:
        for m in layers:
            m.adapter_off = False
