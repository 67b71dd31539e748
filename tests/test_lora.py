"""LoRA / DoRA layers against the formulas, computed independently in numpy.

LoRA:  y = x W^T + b + s * (x A^T) B^T,  s = alpha / r  (alpha / sqrt(r) with rsLoRA)
DoRA:  W' = W + s B A,  y = m * (x W'^T) / ||W'||_row + b,  m initialised to ||W||_row
A quantized base (QLoRA) stands for its dequantized weight, unpacked here by hand.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.model.lora import DoRALinear, LoRALinear, base_dims, dense_weight

IN, OUT, R = 64, 48, 4
ATOL = 2e-5


def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _linear(bias: bool, dtype=mx.float32, seed: int = 0) -> nn.Linear:
    rng = np.random.default_rng(seed)
    layer = nn.Linear(IN, OUT, bias=bias)
    layer.weight = mx.array(rng.standard_normal((OUT, IN)).astype(np.float32) * 0.1).astype(dtype)
    if bias:
        layer.bias = mx.array(rng.standard_normal(OUT).astype(np.float32)).astype(dtype)
    return layer


def _quantized(bias: bool) -> nn.QuantizedLinear:
    return nn.QuantizedLinear.from_linear(_linear(bias), group_size=32, bits=4)


def _base(kind: str):
    return {
        "linear": lambda: _linear(False),
        "linear_bias": lambda: _linear(True),
        "quantized": lambda: _quantized(False),
        "quantized_bias": lambda: _quantized(True),
    }[kind]()


BASES = ["linear", "linear_bias", "quantized", "quantized_bias"]


def numpy_dequantize(q: nn.QuantizedLinear) -> np.ndarray:
    """Affine dequantization by hand: each uint32 packs 32/bits codes, lowest bits first;
    w = scale * code + bias per group of ``group_size`` inputs."""
    packed = np.array(q.weight).astype(np.uint64)
    per_word = 32 // q.bits
    shifts = np.arange(per_word, dtype=np.uint64) * np.uint64(q.bits)
    codes = (packed[..., None] >> shifts) & np.uint64((1 << q.bits) - 1)
    codes = codes.reshape(packed.shape[0], -1).astype(np.float32)
    scales = np.repeat(np.array(q.scales), q.group_size, axis=1)
    biases = np.repeat(np.array(q.biases), q.group_size, axis=1)
    return codes * scales + biases


def base_numpy(layer) -> tuple[np.ndarray, np.ndarray]:
    """(W [out, in], b [out]) of a base layer, independently of the code under test."""
    w = numpy_dequantize(layer) if isinstance(layer, nn.QuantizedLinear) else _np(layer.weight)
    b = _np(layer.bias) if "bias" in layer else np.zeros(w.shape[0], np.float32)
    return w, b


def randomize(layer: LoRALinear, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((layer.r, IN)).astype(np.float32) * 0.2
    b = rng.standard_normal((OUT, layer.r)).astype(np.float32) * 0.2
    layer.lora_a, layer.lora_b = mx.array(a), mx.array(b)
    return a, b


@pytest.fixture(scope="module")
def x() -> mx.array:
    return mx.array(np.random.default_rng(7).standard_normal((2, 5, IN)).astype(np.float32))


# ------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("kind", BASES)
def test_base_dims_and_dense_weight_of_every_base(kind):
    base = _base(kind)
    assert base_dims(base) == (OUT, IN)
    w, _ = base_numpy(base)
    np.testing.assert_allclose(_np(dense_weight(base)), w, atol=1e-6)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("kind", BASES)
def test_wrapped_layer_equals_base_at_init(kind, cls, x):
    base = _base(kind)
    expected = np.array(base(x))
    layer = cls(base, r=R, alpha=8.0)
    assert np.all(np.array(layer.lora_b) == 0), "B starts at zero so training starts from the base model"
    np.testing.assert_allclose(np.array(layer(x)), expected, atol=ATOL)
    if cls is LoRALinear:  # B = 0 makes the LoRA branch exactly zero
        assert np.array_equal(np.array(layer(x)), expected)


def test_init_shapes_dtypes_and_kaiming_bound():
    layer = LoRALinear(_linear(False, dtype=mx.float16), r=R, alpha=8.0)
    assert layer.lora_a.shape == (R, IN) and layer.lora_b.shape == (OUT, R)
    # Adapter weights stay float32 even on a half-precision base (optimizer precision).
    assert layer.lora_a.dtype == mx.float32 and layer.lora_b.dtype == mx.float32
    a = np.array(layer.lora_a)
    bound = 1 / math.sqrt(IN)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    assert (layer.in_features, layer.out_features) == (IN, OUT)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", BASES)
def test_lora_forward_matches_numpy(kind, rslora, x):
    base = _base(kind)
    w, b = base_numpy(base)
    alpha = 6.0
    layer = LoRALinear(base, r=R, alpha=alpha, use_rslora=rslora)
    a, bb = randomize(layer)
    s = alpha / math.sqrt(R) if rslora else alpha / R
    assert layer.scale == pytest.approx(s)
    xn = np.array(x)
    expected = xn @ w.T + b + s * (xn @ a.T) @ bb.T
    np.testing.assert_allclose(np.array(layer(x)), expected, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.array(layer.delta()), s * bb @ a, atol=1e-6)


def test_lora_gradients_match_numpy(x):
    """For L = sum(G * y): dL/dB = s G^T (X A^T), dL/dA = s B^T G^T X (X, G flattened over tokens)."""
    layer = LoRALinear(_linear(True), r=R, alpha=8.0)
    a, b = randomize(layer)
    g = np.random.default_rng(3).standard_normal((2, 5, OUT)).astype(np.float32)
    s = 8.0 / R

    def loss(params):
        layer.update(params)
        return (layer(x) * mx.array(g)).sum()

    grads = dict(tree_flatten(mx.grad(loss)(layer.trainable_parameters())))
    assert set(grads) == {"lora_a", "lora_b"}, "only the adapter trains; the base (and its bias) stays frozen"
    xf, gf = np.array(x).reshape(-1, IN), g.reshape(-1, OUT)
    np.testing.assert_allclose(np.array(grads["lora_b"]), s * gf.T @ (xf @ a.T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(grads["lora_a"]), s * b.T @ gf.T @ xf, rtol=1e-4, atol=1e-4)


def test_dropout_only_in_training_mode(x):
    layer = LoRALinear(_linear(False), r=R, alpha=8.0, dropout=0.5)
    a, b = randomize(layer)
    w, _ = base_numpy(layer.base)
    xn = np.array(x)
    layer.eval()  # generation and evaluation must be deterministic and use the full adapter
    np.testing.assert_allclose(np.array(layer(x)), xn @ w.T + 2.0 * (xn @ a.T) @ b.T, atol=1e-4)
    layer.train()
    mx.random.seed(0)
    assert not np.allclose(np.array(layer(x)), np.array(layer(x)))


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(_linear(False), r=0)


# ------------------------------------------------------------------------------------------
# fuse


@pytest.mark.parametrize("kind", ["linear", "linear_bias"])
def test_fuse_gives_plain_linear_equal_to_adapted_layer(kind, x):
    layer = LoRALinear(_base(kind), r=R, alpha=8.0)
    randomize(layer)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    assert ("bias" in fused) == (kind == "linear_bias")
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-4)


def test_fuse_leaves_original_alone_and_is_repeatable(x):
    layer = LoRALinear(_linear(True), r=R, alpha=8.0)
    randomize(layer)
    before = {k: np.array(v) for k, v in tree_flatten(layer.parameters())}
    out_before = np.array(layer(x))
    first, second = layer.fuse(), layer.fuse()
    after = {k: np.array(v) for k, v in tree_flatten(layer.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert np.array_equal(np.array(layer(x)), out_before)
    assert np.array_equal(np.array(first.weight), np.array(second.weight))
    assert first.weight is not layer.base.weight


def test_fuse_keeps_half_precision_base_dtype():
    base = _linear(True, dtype=mx.float16)
    layer = LoRALinear(base, r=R, alpha=8.0)
    a, b = randomize(layer)
    fused = layer.fuse()
    assert fused.weight.dtype == mx.float16 and fused.bias.dtype == mx.float16
    # Merged in float32, rounded once to float16.
    expected = (np.array(base.weight.astype(mx.float32)) + 2.0 * b @ a).astype(np.float16)
    np.testing.assert_allclose(
        np.array(fused.weight).astype(np.float32), expected.astype(np.float32), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("kind", ["quantized", "quantized_bias"])
def test_quantized_base_fuses_to_dequantized_weights(kind, x):
    base = _base(kind)
    w, bias = base_numpy(base)
    layer = LoRALinear(base, r=R, alpha=8.0)
    a, b = randomize(layer)
    fused = layer.fuse()
    assert type(fused) is nn.Linear, "fusing must not silently re-quantize"
    assert fused.weight.dtype == base.scales.dtype
    np.testing.assert_allclose(np.array(fused.weight), w + 2.0 * b @ a, atol=1e-5)
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-4)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_refuses_to_fuse(cls, bad):
    layer = cls(_linear(False), r=R, alpha=8.0)
    randomize(layer)
    b = np.array(layer.lora_b)
    b[3, 1] = bad
    layer.lora_b = mx.array(b)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.fuse()


# ------------------------------------------------------------------------------------------
# DoRA


def dora_numpy(w, b, a, bb, s, m, xn):
    merged = w + s * bb @ a
    norm = np.linalg.norm(merged, axis=1)
    return (m / norm) * (xn @ merged.T) + b, (m / norm)[:, None] * merged


@pytest.mark.parametrize("kind", BASES)
def test_dora_magnitude_starts_at_row_norms(kind):
    base = _base(kind)
    w, _ = base_numpy(base)
    layer = DoRALinear(base, r=R, alpha=8.0)
    np.testing.assert_allclose(np.array(layer.magnitude), np.linalg.norm(w, axis=1), rtol=1e-5)
    names = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    assert names == {"lora_a", "lora_b", "magnitude"}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", BASES)
def test_dora_forward_and_fuse_match_numpy(kind, rslora, x):
    base = _base(kind)
    w, b = base_numpy(base)
    layer = DoRALinear(base, r=R, alpha=6.0, use_rslora=rslora)
    a, bb = randomize(layer)
    m = np.random.default_rng(5).uniform(0.5, 2.0, OUT).astype(np.float32)
    layer.magnitude = mx.array(m)
    s = 6.0 / (math.sqrt(R) if rslora else R)
    xn = np.array(x)
    expected_y, expected_w = dora_numpy(w, b, a, bb, s, m, xn)
    np.testing.assert_allclose(np.array(layer(x)), expected_y, atol=1e-4, rtol=1e-4)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    np.testing.assert_allclose(np.array(fused.weight), expected_w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-4, rtol=1e-4)


def test_dora_fuse_keeps_half_precision_and_original(x):
    base = _linear(True, dtype=mx.float16)
    layer = DoRALinear(base, r=R, alpha=8.0)
    randomize(layer)
    w_before = np.array(base.weight)
    fused = layer.fuse()
    assert fused.weight.dtype == mx.float16
    assert np.array_equal(np.array(layer.base.weight), w_before)
    assert np.array_equal(np.array(layer.fuse().weight), np.array(fused.weight))


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_low_rank_path_computes_in_the_activations_dtype(cls):
    """bf16 activations (a GPU's compute dtype) give bf16 outputs through the adapter's own matmuls,
    while its weights and their gradients (what the optimizer state is built from) stay float32."""
    layer = cls(_linear(True, dtype=mx.bfloat16), r=R, alpha=8.0)
    layer.lora_b = mx.array(np.random.default_rng(1).standard_normal((OUT, R)).astype(np.float32) * 0.1)
    x = mx.array(np.random.default_rng(2).standard_normal((2, 3, IN)).astype(np.float32)).astype(mx.bfloat16)
    assert layer._lora(x).dtype == mx.bfloat16
    assert layer(x).dtype == mx.bfloat16

    def loss(params):
        layer.update(params)
        return layer(x).astype(mx.float32).sum()

    grads = mx.grad(loss)(layer.trainable_parameters())
    assert grads["lora_a"].dtype == mx.float32 and grads["lora_b"].dtype == mx.float32
    assert layer.lora_a.dtype == mx.float32
    # The bf16 result is the float32 computation rounded: within bf16's precision of it.
    ref = cls(_linear(True, dtype=mx.float32), r=R, alpha=8.0)
    ref.update(layer.trainable_parameters())
    want = np.array(ref(x.astype(mx.float32)))
    np.testing.assert_allclose(np.array(layer(x).astype(mx.float32)), want, rtol=0.05, atol=0.05 * np.abs(want).max())
