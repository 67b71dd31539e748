"""The chunked cross-entropy equals the plain one (loss and LoRA gradients) on every architecture,
packed or not, compiled or not, and never holds the full [tokens x vocab] logits."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import LoraConfig
from mlx_lora.data.examples import attention_mask_from_segments
from mlx_lora.model import adapters
from mlx_lora.model.loading import load_model
from mlx_lora.testing import ARCHITECTURES
from mlx_lora.training.losses import make_loss, masked_cross_entropy, split_head, verify_split


def _lora_model(folder, seed=0):
    mx.random.seed(seed)
    model, _, _ = load_model(str(folder), dtype="float32", with_tokenizer=False)
    adapters.apply_lora(model, LoraConfig(r=4, alpha=8.0))
    # B starts at zero; give it values so the gradient of A is not zero too.
    for _, layer in adapters.adapter_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    mx.eval(model.parameters())
    return model


def _batch(vocab, B=3, L=37, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (B, L)).astype(np.int32)
    targets = rng.integers(0, vocab, (B, L)).astype(np.int32)
    mask = (rng.random((B, L)) < 0.7).astype(np.float32)
    mask[0, 30:] = 0  # a padded tail
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def _grads(model, fn, *args):
    (loss, n), g = nn.value_and_grad(model, fn)(model, *args)
    mx.eval(loss, n, g)
    return loss.item(), n.item(), dict(tree_flatten(g))


def _step_peak(model, fn, inputs, targets, mask) -> tuple[int, float]:
    """(peak bytes above the resident arrays, loss) of one compiled loss+gradient step, compiled
    outside the measurement."""
    state = [model.state]
    step = mx.compile(lambda *a: nn.value_and_grad(model, fn)(model, *a), inputs=state, outputs=state)
    mx.eval(step(inputs, targets, mask))
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = step(inputs, targets, mask)
    mx.eval(out)
    return mx.get_peak_memory() - base, out[0][0].item()


def _assert_same(ref, got):
    (l0, n0, g0), (l1, n1, g1) = ref, got
    assert n0 == n1
    assert math.isclose(l0, l1, rel_tol=1e-5), (l0, l1)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=2e-4, atol=1e-6, err_msg=k)


# Granite divides its logits by logits_scaling after the output layer: the split check sees that the
# head is not the whole output and the loss falls back (test below).
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "granite"])
def test_chunked_loss_equals_plain_loss_and_gradients(tiny_models, arch):
    model = _lora_model(tiny_models[arch])
    assert split_head(model) is not None and verify_split(model, split_head(model))
    vocab = model.args.vocab_size
    inputs, targets, mask = _batch(vocab)
    # 3 x 37 = 111 rows in chunks of 16: several full chunks and a ragged last one.
    loss = make_loss(model, 16)
    assert loss.chunk_tokens == 16 and not loss.note
    ref = _grads(model, masked_cross_entropy, inputs, targets, mask)
    _assert_same(ref, _grads(model, loss.train, inputs, targets, mask))
    # The output layer applied at the target positions only: same loss and gradients.
    _assert_same(ref, _grads(model, loss.train, inputs, targets, mask, None, loss.positions(mask)))
    # Evaluation gives the same value without gradients.
    ev, n = loss.eval(model, inputs, targets, mask)
    assert math.isclose(ev.item(), ref[0], rel_tol=1e-5) and n.item() == ref[1]
    # And under mx.compile, as the trainer runs it.
    state = [model.state]
    step = mx.compile(lambda *a: nn.value_and_grad(model, loss.train)(model, *a), inputs=state, outputs=state)
    (l, _), g = step(inputs, targets, mask)
    mx.eval(l, g)
    assert math.isclose(l.item(), ref[0], rel_tol=1e-5)
    (l, _), g = step(inputs, targets, mask, None, loss.positions(mask))
    mx.eval(l, g)
    assert math.isclose(l.item(), ref[0], rel_tol=1e-5)


def test_target_positions_are_the_mask_padded_to_few_sizes():
    from mlx_lora.training.losses import target_positions

    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        mask = (rng.random((4, 64)) < rng.random()).astype(np.float32)
        pos = np.array(target_positions(mx.array(mask)))
        k = int(mask.sum())
        np.testing.assert_array_equal(pos[:k], np.flatnonzero(mask.reshape(-1)))
        assert (pos[k:] == -1).all() and len(pos) >= max(k, 1) and len(pos) % 32 == 0  # 4 x 64 / 8 = 32
        sizes.add(len(pos))
    assert len(sizes) <= 8  # at most 8 traced variants per batch shape
    # a small batch with few targets runs the output layer on few rows, whatever the chunk size
    few = np.zeros((2, 64), np.float32)
    few[0, 50:60] = few[1, 40:52] = 1
    assert len(np.array(target_positions(mx.array(few)))) == 32


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_chunked_loss_with_packing_mask(tiny_models, arch):
    model = _lora_model(tiny_models[arch], seed=1)
    inputs, targets, mask = _batch(model.args.vocab_size, B=2, L=24, seed=1)
    segments = np.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 24], dtype=np.int32)
    attn = mx.array(attention_mask_from_segments(segments))
    mask = mask * mx.array((segments > 0).astype(np.float32))
    ref = _grads(model, masked_cross_entropy, inputs, targets, mask, attn)
    _assert_same(ref, _grads(model, make_loss(model, 7).train, inputs, targets, mask, attn))


def test_gemma2_soft_capping_is_part_of_the_head(tiny_models):
    model = _lora_model(tiny_models["gemma2"])
    cap = model.final_logit_softcapping
    assert cap, "the tiny gemma2 model should soft-cap its logits"
    split = split_head(model)
    h = split.body(mx.array([[0, 1, 2]]), None)
    raw = model.model.embed_tokens.as_linear(h)
    np.testing.assert_allclose(np.array(split.head(h)), np.array(mx.tanh(raw / cap) * cap), rtol=1e-5, atol=1e-6)


def test_unknown_output_scaling_falls_back_to_plain_loss(tiny_models, caplog):
    model = _lora_model(tiny_models["llama"])

    class ScaledLogits(type(model)):
        """An architecture that post-processes logits in a way the splitter does not know."""

        def __call__(self, inputs, cache=None):
            return super().__call__(inputs, cache) * 0.5

    model.__class__ = ScaledLogits
    with caplog.at_level("WARNING"):
        loss = make_loss(model, 16)
    assert loss.chunk_tokens is None and loss.train is masked_cross_entropy
    assert "does not reproduce" in loss.note and "does not reproduce" in caplog.text


def test_disabled_chunking_is_the_plain_loss(tiny_models):
    model = _lora_model(tiny_models["llama"])
    loss = make_loss(model, None)
    assert loss.train is masked_cross_entropy and loss.eval is masked_cross_entropy and loss.chunk_tokens is None


def test_chunked_loss_never_holds_the_full_logits():
    """Peak memory of one compiled loss+gradient step with a large vocabulary. The plain loss holds
    the float32 logits [N, V] (and more of that size); the chunked loss holds a few [chunk, V]
    blocks (MLX's evaluator runs some operations ahead), so its peak does not grow with N."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=8192,
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    adapters.apply_lora(model, LoraConfig(r=4))
    mx.eval(model.parameters())
    chunked = make_loss(model, 32).train

    def peak(fn, B, L):
        return _step_peak(model, fn, *_batch(args.vocab_size, B=B, L=L))

    small, big = (16, 64), (64, 64)  # 1024 and 4096 rows; short rows keep attention memory small
    logits = {shape: shape[0] * shape[1] * args.vocab_size * 4 for shape in (small, big)}
    plain_peak, plain_loss = peak(masked_cross_entropy, *big)
    chunked_peak, chunked_loss = peak(chunked, *big)
    chunked_small, _ = peak(chunked, *small)
    assert math.isclose(plain_loss, chunked_loss, rel_tol=1e-5)
    assert plain_peak >= logits[big]
    assert chunked_peak < logits[big] / 2, (chunked_peak, logits[big])
    # 4x the rows: the plain loss needs >= 3 * logits[small] more; the chunked one only the
    # body's own activations (hidden size 32 here, so a small fraction of that).
    assert chunked_peak - chunked_small < (logits[big] - logits[small]) / 5, (chunked_small, chunked_peak)


# ----------------------------------------------------------------------------------------------
# recomputing attention in the backward pass (trainer.enable_attention_checkpoint)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_checkpoint_keeps_loss_and_gradients(tiny_models, arch):
    from mlx_lora.training.trainer import enable_attention_checkpoint

    model = _lora_model(tiny_models[arch], seed=2)
    other = _lora_model(tiny_models[arch], seed=2)
    inputs, targets, mask = _batch(model.args.vocab_size, seed=2)
    ref = _grads(model, masked_cross_entropy, inputs, targets, mask)
    assert enable_attention_checkpoint(model) == len(model.layers)
    _assert_same(ref, _grads(model, masked_cross_entropy, inputs, targets, mask))
    _assert_same(ref, _grads(model, make_loss(model, 16).train, inputs, targets, mask))
    # Per instance: another model of the same architecture is left alone.
    assert type(other.layers[0].self_attn) is not type(model.layers[0].self_attn)
    assert not getattr(type(other.layers[0].self_attn), "_mlx_lora_checkpointed", False)


def test_attention_checkpoint_frees_the_attention_probabilities():
    """Blocks with many heads and long rows, where the [B, heads, L, L] probabilities dominate.
    Plain autodiff keeps them for every block; recomputing attention needs them for one block at
    a time (its backward pass), so the peak drops by at least two blocks' worth; below
    ``min_length`` nothing changes."""
    from mlx_lm.models import llama

    from mlx_lora.training.trainer import attention_checkpoint_length, enable_attention_checkpoint

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=16,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=256,
    )
    # heads x L >= intermediate: L >= ceil(128 / 16) = 8; and at least 3/4 of the longest row
    assert attention_checkpoint_length(llama.Model(args), longest=8) == 8
    assert attention_checkpoint_length(llama.Model(args), longest=1000) == 750

    def peak(min_length=None):
        mx.random.seed(0)
        model = llama.Model(args)
        adapters.apply_lora(model, LoraConfig(r=4))
        if min_length is not None:
            enable_attention_checkpoint(model, min_length)
        mx.eval(model.parameters())
        return _step_peak(model, masked_cross_entropy, *_batch(args.vocab_size, B=4, L=256))

    probs_bytes = 4 * 16 * 256 * 256 * 4  # one block's probabilities
    plain, loss = peak()
    ckpt, loss_ckpt = peak(0)
    skipped, _ = peak(257)  # rows shorter than min_length keep the plain attention
    assert loss_ckpt == pytest.approx(loss, rel=1e-5)
    assert plain > 4 * probs_bytes
    assert ckpt < plain - 2 * probs_bytes, (plain, ckpt, probs_bytes)
    assert skipped > ckpt + 2 * probs_bytes


def test_a_scaled_head_falls_back_to_the_plain_loss_with_a_note(tiny_models):
    model = _lora_model(tiny_models["granite"])
    assert not verify_split(model, split_head(model))
    loss = make_loss(model, 16)
    assert "plain loss" in loss.note
    inputs, targets, mask = _batch(model.args.vocab_size)
    _assert_same(
        _grads(model, masked_cross_entropy, inputs, targets, mask), _grads(model, loss.train, inputs, targets, mask)
    )
