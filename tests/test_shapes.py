"""Batch shape policies (train.shapes): the ladder, packing a batch into fixed-length rows, the
GPU cost model, and that every policy trains the same step (same examples, same summed loss)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_lora
from mlx_lora.config import build
from mlx_lora.data.batching import PAD_MULTIPLE, Batch
from mlx_lora.data.shapes import ShapePolicy, ladder, plan_costs, repack, resolve, rung
from mlx_lora.plumbing.errors import ConfigError


def _varied_chat(path: Path, n: int = 12) -> Path:
    """Chat rows whose answers run from 1 to 48 words, so batches have very different lengths."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for i in range(n):
        k = 1 + (i * 37) % 48
        answer = " ".join(words[(i + j) % len(words)] for j in range(k))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Say {k} words, number {i}."},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ladder_rungs_are_padded_multiples_a_bounded_ratio_apart():
    rungs = ladder(2048)
    assert rungs[0] == PAD_MULTIPLE and rungs[-1] == 2048
    assert all(r % PAD_MULTIPLE == 0 for r in rungs)
    assert all(b > a for a, b in zip(rungs, rungs[1:]))
    # at most ~1.5x apart once past the first rungs, so a row is never padded by more than half
    assert all(b <= 1.5 * a for a, b in zip(rungs[2:], rungs[3:]))
    assert len(rungs) <= 14  # few shapes: 32 .. 2048 in a dozen rungs, not 64 multiples of 32
    assert ladder(100)[-1] == 100 and rung(101, ladder(100)) == 100
    assert [rung(n, rungs) for n in (1, 32, 33, 129, 2048)] == [32, 32, 64, 192, 2048]


def _batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    L = int(-(-max(lengths) // 32) * 32)
    B = len(lengths)
    inputs = np.zeros((B, L), np.int32)
    targets = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.float32)
    for b, n in enumerate(lengths):
        inputs[b, :n] = rng.integers(1, 500, n)
        targets[b, :n] = rng.integers(1, 500, n)
        mask[b, :n] = rng.integers(0, 2, n)
    return Batch(inputs, targets, mask, None, np.array(lengths))


def test_repack_keeps_every_example_whole_and_apart():
    batch = _batch([70, 20, 45, 100, 30])
    packed = repack(batch, 128)
    assert packed.inputs.shape[1] == 128 and packed.segments is not None
    assert packed.inputs.shape[0] < 5  # fewer rows than examples
    assert packed.ntokens == batch.ntokens
    found = []
    for r in range(packed.inputs.shape[0]):
        for s in range(1, packed.segments[r].max() + 1):
            at = np.flatnonzero(packed.segments[r] == s)
            assert np.all(np.diff(at) == 1)  # contiguous
            match = [
                e
                for e, n in enumerate(batch.lengths)
                if n == len(at)
                and np.array_equal(batch.inputs[e, :n], packed.inputs[r, at])
                and np.array_equal(batch.targets[e, :n], packed.targets[r, at])
                and np.array_equal(batch.loss_mask[e, :n], packed.loss_mask[r, at])
            ]
            assert len(match) == 1
            found += match
    assert sorted(found) == list(range(5))
    with pytest.raises(ValueError, match="exceeds the packed row length"):
        repack(batch, 64)


def test_policies_lay_out_a_batch():
    batch = _batch([70, 20, 45, 100])
    rungs = ladder(512)
    assert ShapePolicy("exact", rungs, 192).apply(batch) is batch
    lad = ShapePolicy("ladder", rungs, 192).apply(batch)
    assert lad.inputs.shape == (4, 128) and np.array_equal(lad.inputs[:, :128][:, :100], batch.inputs[:, :100])
    assert lad.ntokens == batch.ntokens
    packed = ShapePolicy("packed", rungs, 192).apply(batch)
    assert packed.inputs.shape == (2, 192) and packed.ntokens == batch.ntokens


def test_cost_model_trades_padding_against_compiles():
    rng = np.random.default_rng(0)
    sizes = np.clip(np.exp(rng.normal(np.log(140), 0.8, 256)), 45, 512).astype(np.int64)
    batches = [sizes[i : i + 4] for i in range(0, 256, 4)]
    dims = (1_000_000_000, 2048, 16)
    costs = plan_costs(batches, 2048, 3.0, dims)
    assert costs["ladder"][1] < costs["exact"][1]  # fewer shapes
    assert costs["packed"][1] <= 4  # a shape per row count at most
    assert costs["exact"][2] < costs["ladder"][2]  # at the price of more padding
    # Compiling nothing: the least padding wins; compiling dearly: the fewest shapes win.
    free = plan_costs(batches, 2048, 3.0, dims, compile_s=0.0)
    assert min(free, key=lambda k: free[k][0]) in ("exact", "packed")
    dear = plan_costs(batches, 2048, 3.0, dims, compile_s=100.0)
    assert min(dear, key=lambda k: dear[k][0]) == min(dear, key=lambda k: dear[k][1])
    cpu = resolve(
        "auto", gpu=False, sizes=sizes, batch_rows=4, max_seq_length=2048, seed=0, bucketing=False, steps=64, dims=dims
    )
    assert cpu.name == "exact"
    gpu = resolve(
        "auto", gpu=True, sizes=sizes, batch_rows=4, max_seq_length=2048, seed=0, bucketing=False, steps=64, dims=dims
    )
    assert gpu.name in ("ladder", "packed") and "predicted" in gpu.chosen
    assert (
        resolve(
            "ladder",
            gpu=False,
            sizes=sizes,
            batch_rows=4,
            max_seq_length=2048,
            seed=0,
            bucketing=False,
            steps=64,
            dims=dims,
        ).name
        == "ladder"
    )


def test_bad_shape_and_memory_keys_are_refused(tmp_path):
    base = {"model": {"path": "m"}, "data": {"path": "d"}}
    with pytest.raises(ConfigError, match=r"train.shapes: 'square' is not one of auto, exact, ladder, packed"):
        build(extra=base, overrides=["train.shapes=square"])
    with pytest.raises(ConfigError, match=r"train.cache_limit_gb: must be >= 0"):
        build(extra=base, overrides=["train.cache_limit_gb=-1"])
    with pytest.raises(ConfigError, match=r"train.wired_limit_gb: must be a finite number"):
        build(extra=base, overrides=["train.wired_limit_gb=.nan"])
    cfg = build(extra=base, overrides=["train.cache_limit_gb=0.5", "train.wired_limit_gb=null"])
    assert cfg.train.cache_limit_gb == 0.5 and cfg.train.wired_limit_gb is None


def _run(model, data, out, **sets):
    base = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "valid_fraction": 0.0},
        "out": str(out),
        "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000},
    }
    cfg = build(extra=base, overrides=[f"{k}={v}" for k, v in sets.items()])
    banner = io.StringIO()
    result = mlx_lora.train(cfg, progress=False, stream=banner)
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    adapter = {k: np.array(v) for k, v in mx.load(str(Path(out) / "adapter_model.safetensors")).items()}
    line = next(l for l in banner.getvalue().splitlines() if l.startswith("shapes "))
    return result, [r for r in rows if "loss" in r], adapter, line


def test_every_policy_trains_the_same_steps(tiny_llama, tmp_path):
    data = _varied_chat(tmp_path / "varied.jsonl")
    common = {
        "train.iters": 3,
        "train.batch_size": 4,
        "train.lr": 1e-2,
        "train.optimizer": "adam",
        "train.max_grad_norm": "null",
        "data.max_seq_length": 512,
    }
    runs = {}
    for policy in ("exact", "ladder", "packed"):
        runs[policy] = _run(
            tiny_llama, data, tmp_path / policy, **common, **{"train.shapes": policy, "train.length_groups": "false"}
        )
    runs["auto"] = _run(tiny_llama, data, tmp_path / "auto", **common)  # CPU: rows at their own length
    ref_result, ref_rows, ref_adapter, _ = runs["exact"]
    for policy, (result, rows, adapter, line) in runs.items():
        # the banner names the policy and predicts the shapes and padding the epoch then met
        assert line.startswith(f"shapes    {'exact (auto: the CPU backend)' if policy == 'auto' else policy}"), line
        n = rows[-1]["shapes"]
        assert (
            f"first epoch: {n} distinct call shape{'s' if n != 1 else ''}, {100 * rows[-1]['padding']:.1f}% padding"
            in line
        ), (line, rows[-1])
        assert result.trained_tokens == ref_result.trained_tokens, policy
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=2e-5, err_msg=policy)
        for k in ref_adapter:
            np.testing.assert_allclose(adapter[k], ref_adapter[k], rtol=1e-3, atol=5e-5, err_msg=f"{policy} {k}")
    shapes = {p: runs[p][1][-1]["shapes"] for p in runs}
    padding = {p: runs[p][1][-1]["padding"] for p in runs}
    assert shapes["packed"] <= 3 and shapes["ladder"] <= shapes["exact"]
    assert padding["ladder"] >= padding["exact"] > padding["auto"] >= 0  # rows alone pad least
    assert all(0 <= p < 1 for p in padding.values())


def test_packed_rows_get_per_example_logits_through_the_fast_attention_kernel(tiny_llama, monkeypatch):
    """A batch packed by the ``packed`` policy gives each example the logits and loss it gets alone,
    and its attention goes through mx.fast.scaled_dot_product_attention with a one-byte mask
    broadcast over the heads ([B, 1, L, L] bool), not a float32 mask per head."""
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.losses import masked_cross_entropy, model_logits
    from mlx_lora.training.trainer import batch_arrays

    model, _, _ = load_model(str(tiny_llama), dtype="float32", with_tokenizer=False)
    batch = _batch([30, 12, 50, 7, 21], seed=3)
    packed = repack(batch, 64)
    assert packed.inputs.shape[0] < 5
    seen = []
    fast = mx.fast.scaled_dot_product_attention

    def spy(q, k, v, *args, mask=None, **kwargs):
        seen.append(mask if isinstance(mask, str) or mask is None else (mask.dtype, tuple(mask.shape), q.shape))
        return fast(q, k, v, *args, mask=mask, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    inputs, targets, mask, attn = batch_arrays(packed)
    logits = np.array(model_logits(model, inputs, attn))
    B, L = packed.inputs.shape
    assert seen and all(s[0] == mx.bool_ and s[1] == (B, 1, L, L) and s[2][1] > 1 for s in seen), seen
    for r in range(B):
        for s in range(1, packed.segments[r].max() + 1):
            at = np.flatnonzero(packed.segments[r] == s)
            alone = np.array(model(mx.array(packed.inputs[r, at][None])))[0]
            np.testing.assert_allclose(logits[r, at], alone, rtol=1e-4, atol=1e-4)
    # The summed-token loss of the packed batch is the unpacked batch's.
    got, n = masked_cross_entropy(model, inputs, targets, mask, attn)
    ref, m = masked_cross_entropy(model, *batch_arrays(batch)[:3])
    assert float(n.item()) == float(m.item()) == batch.ntokens
    np.testing.assert_allclose(got.item(), ref.item(), rtol=1e-5)
