"""LoRA and DoRA layers that wrap an existing ``nn.Linear`` or ``nn.QuantizedLinear``, and
per-expert LoRA and DoRA on the expert layers of mixture-of-experts blocks (:class:`LoRASwitchLinear`,
:class:`DoRASwitchLinear`).

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

from mlx_lora.plumbing.mlx_lm_compat import switch_linear_classes

Base = Union[nn.Linear, nn.QuantizedLinear]


def _is_quantized(layer) -> bool:
    return hasattr(layer, "bits") and "scales" in layer


def base_dims(layer) -> tuple[int, int]:
    """(out_features, in_features) of a linear or quantized linear layer; of each expert for an
    expert layer (``SwitchLinear`` / ``QuantizedSwitchLinear``, weight [experts, out, in])."""
    out_dims, in_dims = layer.weight.shape[-2:]
    if _is_quantized(layer):
        in_dims = in_dims * 32 // layer.bits
    return out_dims, in_dims


def dense_weight(layer) -> mx.array:
    """The layer's weight as a dense [out, in] (experts: [experts, out, in]) array, dequantized
    when quantized."""
    if not _is_quantized(layer):
        return layer.weight
    kw = dict(group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    global_scale = layer.get("global_scale")
    if global_scale is not None and layer.weight.ndim == 3:  # nvfp4 experts: one tensor scale each
        return mx.stack(
            [
                mx.dequantize(layer.weight[e], layer.scales[e], None, global_scale=global_scale[e], **kw)
                for e in range(layer.weight.shape[0])
            ]
        )
    if global_scale is not None:
        kw["global_scale"] = global_scale
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), **kw)


def check_lora_args(r, alpha, dropout, out_dims: int, in_dims: int) -> None:
    """ValueError unless r, alpha and dropout suit a layer with ``in_dims`` inputs and ``out_dims`` outputs."""
    # Checked before lora_a / lora_b are allocated: r x in floats for a mistyped r can take the
    # whole memory. The rank of B A cannot exceed min(out, in), so a larger r adds nothing.
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= min(out_dims, in_dims):
        raise ValueError(
            f"LoRA rank must be an integer in [1, {min(out_dims, in_dims)}] for a layer with "
            f"{in_dims} inputs and {out_dims} outputs, got {r!r}"
        )
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")


def _init_low_rank(layer, base, r, alpha, dropout, use_rslora, experts: tuple = ()) -> None:
    """The frozen base, scale, dropout and the A (PEFT's uniform init) / B (zeros) factors of a
    LoRA layer; ``experts`` = ``(E,)`` gives every expert its own pair."""
    out_dims, in_dims = base_dims(base)
    check_lora_args(r, alpha, dropout, out_dims, in_dims)
    layer.base = base
    layer.base.freeze()
    layer.r, layer.alpha, layer.use_rslora = r, float(alpha), use_rslora
    layer.scale = layer.alpha / (math.sqrt(r) if use_rslora else r)
    layer.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
    bound = 1.0 / math.sqrt(in_dims)
    layer.lora_a = mx.random.uniform(-bound, bound, (*experts, r, in_dims), dtype=mx.float32)
    layer.lora_b = mx.zeros((*experts, out_dims, r), dtype=mx.float32)


class LoRALinear(nn.Module):
    """A LoRA adapter around a frozen base layer (QLoRA when the base is quantized)."""

    adapter_off = False
    """When True (see :func:`adapters_off`) the layer is exactly its base layer."""

    def __init__(self, base: Base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        _init_low_rank(self, base, r, alpha, dropout, use_rslora)

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

    def __init__(self, base: Base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False):
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
    return isinstance(m, (LoRALinear, LoRASwitchLinear))


# ---------------------------------------------------------------------------------------------
# Experts


def is_expert_layer(m) -> bool:
    """Whether ``m`` is an mlx-lm expert layer (``SwitchLinear`` / ``QuantizedSwitchLinear``)."""

    return isinstance(m, switch_linear_classes())


class LoRASwitchLinear(nn.Module):
    """Per-expert LoRA around a frozen expert layer (mlx-lm's ``SwitchLinear`` or
    ``QuantizedSwitchLinear``, weight [E, out, in], called with the expert indices of each token):

        y_e = W_e x + b_e + s * B_e (A_e dropout(x)),    A: [E, r, in], B: [E, out, r]

    Each token goes through the adapters of the experts it was routed to only, with the gather
    the base layer uses (``mx.gather_mm`` on the same indices), so an expert no token was routed
    to gets exactly zero gradient. ``A`` and ``B`` are initialised per expert as in
    :class:`LoRALinear` (B = 0: equal to the base at step 0)."""

    def __init__(self, base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        _init_low_rank(self, base, r, alpha, dropout, use_rslora, experts=(base.weight.shape[0],))

    adapter_off = False  # see adapters_off(): the base layer alone

    @property
    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.base(x, indices, sorted_indices=sorted_indices)
        if self.adapter_off:
            return y
        h = self.dropout(x) if self.dropout is not None else x
        a = self.lora_a.astype(x.dtype).swapaxes(-1, -2)
        b = self.lora_b.astype(x.dtype).swapaxes(-1, -2)
        z = mx.gather_mm(h, a, rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + z * self.scale

    def delta(self) -> mx.array:
        """s * B_e @ A_e for every expert, [E, out, in], in float32."""
        return self.scale * (self.lora_b @ self.lora_a)

    def fuse(self):
        """A new ``SwitchLinear`` with every expert's adapter merged, in the base weight's
        precision (a quantized base is dequantized to its scales' dtype, as in :meth:`LoRALinear.fuse`)."""
        w = dense_weight(self.base)
        merged = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        mx.eval(merged)
        if not bool(mx.all(mx.isfinite(merged)).item()):
            raise ValueError("fused weight has NaN or inf values; the adapter is broken, refusing to fuse")
        return make_switch_linear(merged, self.base.get("bias"))


def make_switch_linear(weight: mx.array, bias: Optional[mx.array]):
    """A ``SwitchLinear`` holding ``weight`` [E, out, in] (and ``bias`` [E, out]), built without
    drawing random initial weights."""

    cls = switch_linear_classes()[0]
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


class DoRASwitchLinear(LoRASwitchLinear):
    """DoRA per expert: a trainable magnitude per expert and output row, [E, out], times the
    adapted direction of that expert, the row norm detached as in :class:`DoRALinear`:

        W'_e = W_e + s B_e A_e,   y_e = m_e * (W'_e x) / ||W'_e||_row + b_e,   m_e initialised to ||W_e||_row

    The norms of all experts come from ``||W'||^2 = ||W||^2 + 2 s <W, B A>_row + s^2 ||B A||^2``
    with ``<W, B A>_row = sum_k B[:, k] (W A^T)[:, k]``: one pass of the (possibly quantized) base
    over the rank-r rows of A, never a dense copy of the experts' weights."""

    def __init__(self, base, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        w = dense_weight(base).astype(mx.float32)
        self.base_norm_sq = mx.sum(w * w, axis=-1)  # [E, out], a constant of the frozen base
        self.magnitude = mx.sqrt(self.base_norm_sq)
        mx.eval(self.base_norm_sq, self.magnitude)  # one layer's dense copy at a time
        self.freeze(keys=["base_norm_sq"], recurse=False)

    def _base_rows(self, x: mx.array, experts: mx.array) -> mx.array:
        """W_e x for every expert e (x: [E, M, in]) -> [E, M, out], without the base's bias."""
        y = self.base(x, experts)
        if "bias" in self.base:
            y = y - mx.expand_dims(self.base["bias"], -2)
        return y

    def row_norms(self) -> mx.array:
        """||W_e + s B_e A_e|| per expert and output row, [E, out], in float32."""
        experts = mx.arange(self.num_experts)
        a, b, s = self.lora_a, self.lora_b, self.scale
        wa = self._base_rows(a.astype(mx.float32), experts).swapaxes(-1, -2)  # W A^T: [E, out, r]
        cross = mx.sum(b * wa, axis=-1)
        gram = a @ a.swapaxes(-1, -2)  # A A^T: [E, r, r]
        lora_sq = mx.sum((b @ gram) * b, axis=-1)
        return mx.sqrt(mx.maximum(self.base_norm_sq + 2 * s * cross + s * s * lora_sq, 0.0))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self.adapter_off:
            return self.base(x, indices, sorted_indices=sorted_indices)
        bias = self.base.get("bias")
        out = super().__call__(x, indices, sorted_indices=sorted_indices)
        if bias is not None:
            out = out - mx.expand_dims(bias[indices], -2)
        norm = mx.stop_gradient(self.row_norms())  # detached (DoRA section 4.3)
        factor = (self.magnitude / norm).astype(x.dtype)
        out = mx.expand_dims(factor[indices], -2) * out
        return out + mx.expand_dims(bias[indices], -2) if bias is not None else out

    def fuse(self):
        w = dense_weight(self.base)
        merged = w.astype(mx.float32) + self.delta()
        merged = (self.magnitude / mx.linalg.norm(merged, axis=-1))[..., None] * merged
        merged = merged.astype(w.dtype)
        mx.eval(merged)
        if not bool(mx.all(mx.isfinite(merged)).item()):
            raise ValueError("fused weight has NaN or inf values; the adapter is broken, refusing to fuse")
        return make_switch_linear(merged, self.base.get("bias"))


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
