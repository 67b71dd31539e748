"""Preference tuning (train.method dpo / orpo): the losses on hand-derived numbers, the data format,
pairs as the unit of batching, the reference model, training that learns a preference, and
exact resume. TRL's losses on the same log-probs are in test_preference_reference.py."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from cli_harness import assert_refused, cli_env, rows, write

import mlx_lora
from mlx_lora.config import DataConfig, LoraConfig, build
from mlx_lora.data.batching import iterate_batches
from mlx_lora.data.mixture import load_datasets
from mlx_lora.model import adapters
from mlx_lora.model.loading import load_model
from mlx_lora.model.lora import adapters_off
from mlx_lora.plumbing.errors import ConfigError, DataError
from mlx_lora.training.losses import split_head
from mlx_lora.training.preference import Objective, SequenceLogps, pair_losses
from mlx_lora.training.trainer import batch_arrays, micro_batches

_cli_env = pytest.fixture(scope="module")(cli_env)


# ----------------------------------------------------------------------------------------------
# the losses, by hand


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# policy chosen/rejected sums, reference sums, target-token counts
PC, PR, RC, RR, NC, NR = -5.0, -7.0, -6.0, -6.5, 4.0, 5.0


def _losses(obj, ref=True):
    a = lambda v: mx.array([v])
    losses, stats = pair_losses(obj, a(PC), a(PR), a(NC), a(NR), a(RC) if ref else None, a(RR) if ref else None)
    return float(losses[0]), np.array(stats[0])


def test_dpo_sigmoid_loss_rewards_and_label_smoothing_by_hand():
    # d = (c - c0) - (r - r0) = 1 - (-0.5) = 1.5; beta d = 0.75
    loss, stats = _losses(Objective("dpo", "sigmoid", beta=0.5))
    assert loss == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-6)
    correct, r_c, r_r, lp_c, lp_r, _, tokens = stats
    assert tokens == NC + NR
    assert (correct, r_c, r_r, lp_c, lp_r) == pytest.approx((1.0, 0.5, -0.25, PC, PR))
    # conservative DPO: -(1 - e) log s(0.75) - e log s(-0.75)
    loss, _ = _losses(Objective("dpo", "sigmoid", beta=0.5, label_smoothing=0.2))
    want = -0.8 * math.log(_sig(0.75)) - 0.2 * math.log(_sig(-0.75))
    assert loss == pytest.approx(want, rel=1e-6)


def test_ipo_loss_uses_per_token_log_ratios():
    # d = 1/4 - (-0.5)/5 = 0.35; (0.35 - 1/(2*0.5))^2 = 0.4225
    loss, stats = _losses(Objective("dpo", "ipo", beta=0.5))
    assert loss == pytest.approx(0.4225, rel=1e-6)
    assert stats[1:3] == pytest.approx((0.5, -0.25))


def test_orpo_loss_is_nll_plus_odds_ratio_term():
    loss, stats = _losses(Objective("orpo", orpo_lambda=0.25), ref=False)
    a_c, a_r = PC / NC, PR / NR  # -1.25, -1.4
    log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
    assert loss == pytest.approx(-a_c - 0.25 * math.log(_sig(log_odds)), rel=1e-6)
    correct, r_c, r_r, lp_c, lp_r, nll, _ = stats
    assert (correct, r_c, r_r, lp_c, lp_r, nll) == pytest.approx((1.0, 0.25 * a_c, 0.25 * a_r, a_c, a_r, 1.25))


def test_dpo_without_reference_log_probs_is_a_bug_not_a_silent_zero():
    with pytest.raises(ValueError, match="reference"):
        _losses(Objective("dpo"), ref=False)


# ----------------------------------------------------------------------------------------------
# data


WORDS = "river stone green blue small large quick slow bird tree light water".split()


def pref_rows(n: int, seed: int) -> list[dict]:
    """Chosen answers start with "yes", rejected ones with "no" (else the same words): a rule
    that holds for unseen prompts and bodies."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        out.append({"prompt": f"Q: {prompt}\nA:", "chosen": f" yes {body}", "rejected": f" no {body}"})
    return out


def _jsonl(path: Path, rs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return path


@pytest.fixture(scope="module")
def tok(tiny_llama):
    _, tokenizer, _ = load_model(str(tiny_llama))
    return tokenizer


def _load(path, tokenizer, **kw):
    return load_datasets(DataConfig(path=str(path), valid_fraction=0.0, cache=False, **kw), tokenizer).train


def test_string_pairs_share_the_prompt_and_mask_only_the_responses(tok, tmp_path):
    ds = _load(
        _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: river\nA:", "chosen": " yes", "rejected": " no tree"}]), tok
    )
    assert ds.per_item == 2 and len(ds) == 2 and ds.stats.format == "preference"
    (tc, mc), (tr, mr) = ds.examples
    enc = lambda t: tok.encode(t, add_special_tokens=False)
    bos = len(tc) - len(enc("Q: river\nA:")) - len(enc(" yes")) - 1  # 1 when the tokenizer adds BOS, else 0
    assert bos in (0, 1) and len(tr) == bos + len(enc("Q: river\nA:")) + len(enc(" no tree")) + 1
    p = bos + len(enc("Q: river\nA:"))
    assert list(tc[:p]) == list(tr[:p]) and not mc[:p].any() and not mr[:p].any()
    assert mc[p:].all() and mr[p:].all()  # the response and EOS
    assert tc[-1] == tok.eos_token_id and tr[-1] == tok.eos_token_id


def test_chat_pairs_continuation_full_conversation_and_implicit_prompt_are_one_thing(tok, tmp_path):
    prompt = [{"role": "user", "content": "Which is green?"}]
    good, bad = [{"role": "assistant", "content": "The tree."}], [{"role": "assistant", "content": "The stone."}]
    forms = [
        {"prompt": prompt, "chosen": good, "rejected": bad},
        {"prompt": prompt, "chosen": prompt + good, "rejected": prompt + bad},
        {"chosen": prompt + good, "rejected": prompt + bad},
        {
            "prompt": "Which is green?",
            "chosen": "The tree.",
            "rejected": [{"role": "assistant", "content": "The stone."}],
        },
    ]
    got = [
        _load(_jsonl(tmp_path / f"f{i}.jsonl", [row]), tok, chat_template="chatml").examples
        for i, row in enumerate(forms)
    ]
    for other in got[1:]:
        for (t1, m1), (t2, m2) in zip(got[0], other):
            assert list(t1) == list(t2) and list(m1) == list(m2)
    (tc, mc), _ = got[0]
    # only the assistant turn (and its end) is a target: the prompt's text is not
    first = int(np.argmax(mc))
    assert "Which is green?" in tok.decode(list(tc[:first])) and "tree" in tok.decode(list(tc[mc]))


@pytest.mark.parametrize(
    "row, field, fragment",
    [
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected a string or a list of messages"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing key"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "bot", "content": "a"}],
                "rejected": "b",
            },
            "chosen[0].role",
            "unknown role",
        ),
        (
            {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
            "rejected",
            "same conversation",
        ),
        ({"prompt": "q", "chosen": "a"}, None, "unknown format"),
    ],
)
def test_bad_rows_name_file_line_and_field(tok, tmp_path, row, field, fragment):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        _load(path, tok, format="preference" if field is None else "auto")
    if field is None:  # forced format: the row lacks a key of it
        assert e.value.line == 2 and e.value.field == "rejected"
        return
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)
    assert fragment in str(e.value)


def test_overlong_pairs_are_truncated_or_skipped_as_a_pair(tok, tmp_path):
    long = " ".join(["water"] * 80)
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Q:", "chosen": " yes", "rejected": long}, {"prompt": "Q:", "chosen": " yes", "rejected": " no"}],
    )
    ds = _load(path, tok, max_seq_length=16, overlong="skip")
    assert len(ds) == 2 and ds.stats.skipped == 1
    ds = _load(path, tok, max_seq_length=16, overlong="truncate")
    assert len(ds) == 4 and ds.stats.truncated == 1 and max(ds.lengths) == 16


# ----------------------------------------------------------------------------------------------
# pairs travel together


def _pair_of(ds, batch, b) -> int:
    """Index of the pair whose chosen example is row ``b`` of ``batch`` (row b+1 must be its rejected)."""
    n = int(batch.lengths[b]) + 1
    for j in range(len(ds) // 2):
        t, _ = ds.examples[2 * j]
        if len(t) == n and list(t[:-1]) == list(batch.inputs[b, : n - 1]):
            r, _ = ds.examples[2 * j + 1]
            m = int(batch.lengths[b + 1])
            assert m == len(r) - 1 and list(r[:-1]) == list(batch.inputs[b + 1, :m]), "rows of different pairs"
            return j
    raise AssertionError(f"row {b} is no pair's chosen example")


def test_pairs_are_the_unit_of_batches_ranks_accumulation_and_length_groups(tok, tmp_path):
    ds = _load(_jsonl(tmp_path / "p.jsonl", pref_rows(22, seed=1)), tok)
    cfg = build(
        extra={
            "model": {"path": "m"},
            "data": {"path": "d"},
            "train": {"batch_size": 2, "grad_accum": 2, "length_groups": True},
        }
    )
    seen = []
    for rank in (0, 1):
        it = iterate_batches(ds, 4, max_seq_length=64, seed=0, loop=False, rank=rank, world_size=2)
        for batch, _ in it:
            assert batch.per_item == 2 and batch.inputs.shape[0] == 8  # 4 pairs per rank
            seen += [_pair_of(ds, batch, b) for b in range(0, 8, 2)]
            for overhead in (0.0, 1e9):  # each pair alone, or batch_size pairs per call
                calls = micro_batches(batch, cfg.train, gpu=False, overhead=overhead)
                rows_ = np.concatenate([r for r, _ in calls])
                assert sorted(rows_) == list(range(8))
                for r, length in calls:
                    assert set(r) == {x ^ 1 for x in r}, "a call holds a chosen row without its rejected"
                    assert length >= int(batch.lengths[r].max())
    assert set(seen) == set(range(22))  # every pair, each epoch, across the two ranks


# ----------------------------------------------------------------------------------------------
# the reference model and the log-probs


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_reference_model_is_exactly_the_base(tiny_llama, dora):
    base, _, _ = load_model(str(tiny_llama))
    model, _, _ = load_model(str(tiny_llama))
    adapters.apply_lora(model, LoraConfig(r=4, use_dora=dora))
    for _, m in model.named_modules():  # a trained adapter: B no longer zero
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.5
            if dora:
                m.magnitude = m.magnitude * 1.5
    x = mx.array([[1, 5, 9, 13, 17, 21]])
    want = base(x)
    assert not np.allclose(np.array(model(x)), np.array(want), atol=1e-3)
    with adapters_off(model):
        got = model(x)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert not np.allclose(np.array(model(x)), np.array(want), atol=1e-3)  # switched back on


def test_chunked_sequence_log_probs_and_gradients_equal_full_logits(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    adapters.apply_lora(model, LoraConfig(r=4))
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    rng = np.random.default_rng(0)
    inputs = mx.array(rng.integers(1, 300, (4, 24)).astype(np.int32))
    targets = mx.array(rng.integers(1, 300, (4, 24)).astype(np.int32))
    mask = mx.array((rng.random((4, 24)) < 0.5).astype(np.float32))
    weights = mx.array([1.0, -2.0, 0.5, 3.0])
    # numpy from the full logits
    logits = np.array(model(inputs)).astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = (np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0] * np.array(mask)).sum(-1)
    full, chunked = SequenceLogps(None, None), SequenceLogps(split_head(model), 7)
    from mlx_lora.training.losses import target_positions

    grads = []
    for seq, pos in ((full, None), (chunked, target_positions(mask))):
        f = lambda m: (seq(m, inputs, targets, mask, None, pos) * weights).sum()
        value, g = nn.value_and_grad(model, f)(model)
        got = seq(model, inputs, targets, mask, None, pos, grad=False)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)
        assert float(value) == pytest.approx(float((want * np.array(weights)).sum()), rel=1e-4)
        grads.append(dict(mlx_lora_flat(g)))
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-5, err_msg=k)


def mlx_lora_flat(tree):
    from mlx.utils import tree_flatten

    return [(k, np.array(v)) for k, v in tree_flatten(tree)]


# ----------------------------------------------------------------------------------------------
# training


def _cfg(model, data, out, **sets):
    base = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "valid_fraction": 0.0},
        "out": str(out),
        "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000, "method": "dpo"},
    }
    return build(extra=base, overrides=[f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def memo_model(tiny_model_dir):
    # init_std 0.2 gives the random lm_head enough range to express a confident answer
    return tiny_model_dir("llama", init_std=0.2)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    _jsonl(d / "train.jsonl", pref_rows(48, seed=0))
    _jsonl(d / "valid.jsonl", pref_rows(16, seed=99))  # prompts and bodies never trained on
    return d


def _held_out(model_path, adapter, data, tokenizer_model=None):
    """(reward accuracy, share of pairs whose chosen has the higher log-prob) on valid.jsonl."""
    model, tokenizer, _ = load_model(str(model_path))
    if adapter is not None:
        adapters.load_adapter(model, str(adapter))
    model.eval()
    ds = load_datasets(DataConfig(path=str(data), cache=False), tokenizer, splits=("valid",)).valid
    seq = SequenceLogps(None, None)
    policy, ref = [], []
    for batch, _ in iterate_batches(ds, 8, max_seq_length=64, seed=0, shuffle=False, loop=False):
        inputs, targets, mask, _ = batch_arrays(batch)
        policy.append(np.array(seq(model, inputs, targets, mask)))
        with adapters_off(model):
            ref.append(np.array(seq(model, inputs, targets, mask)))
    p, r = np.concatenate(policy).reshape(-1, 2), np.concatenate(ref).reshape(-1, 2)
    rewards = p - r
    return float(np.mean(rewards[:, 0] > rewards[:, 1])), float(np.mean(p[:, 0] > p[:, 1]))


def test_dpo_learns_the_preference_and_generalises_to_held_out_pairs(memo_model, pref_data, tmp_path):
    _, prefers_before = _held_out(memo_model, None, pref_data)
    run = tmp_path / "run"
    cfg = _cfg(
        memo_model,
        pref_data,
        run,
        **{"train.iters": 20, "train.lr": 3e-3, "train.batch_size": 4, "train.eval_every": 20, "lora.r": 8},
    )
    result = mlx_lora.train(cfg, progress=False)
    assert result.stopped == "completed"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "chosen_logp", "rejected_logp"):
        assert key in steps[0] and "val_" + key in evals[-1], key
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # policy == reference at step 1
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    # throughput and trained_tokens count the target tokens of both responses, not pairs
    assert steps[0]["tokens"] > 8 * 4 and result.trained_tokens == sum(r["tokens"] for r in steps)
    assert evals[-1]["val_reward_accuracy"] >= 0.9 and evals[-1]["val_reward_margin"] > 0
    accuracy, prefers = _held_out(memo_model, run, pref_data)
    assert accuracy >= 0.9 and accuracy == pytest.approx(evals[-1]["val_reward_accuracy"])
    assert prefers >= 0.9 and prefers > prefers_before
    # mlx-lora eval on preference pairs reports the same reward accuracy
    got = mlx_lora.commands.api.evaluate(str(memo_model), str(pref_data / "valid.jsonl"), str(run))
    assert got["pairs"] == 16 and got["reward_accuracy"] == pytest.approx(accuracy)
    assert got["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-4)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_interrupt_and_resume_matches_uninterrupted_run(tiny_llama, pref_data, tmp_path, method):
    sets = {
        "train.iters": 6,
        "train.lr": 3e-3,
        "train.batch_size": 2,
        "train.grad_accum": 2,
        "lora.dropout": 0.1,
        "train.save_every": 3,
        "train.seed": 5,
        "train.method": method,
    }
    full, part = tmp_path / "full", tmp_path / "part"
    mlx_lora.train(_cfg(tiny_llama, pref_data / "train.jsonl", full, **sets), progress=False)
    r1 = mlx_lora.train(
        _cfg(tiny_llama, pref_data / "train.jsonl", part, **sets), progress=False, callbacks=[StopAt(4)]
    )
    assert r1.stopped == "interrupted" and r1.steps == 4
    r2 = mlx_lora.train(build(str(part / "config.yaml")), resume=True, progress=False)
    assert r2.steps == 6 and r2.stopped == "completed"
    a = {k: np.array(v) for k, v in mx.load(str(full / "adapter_model.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(part / "adapter_model.safetensors")).items()}
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    rec = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rec(full), rec(part)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logp"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])


def test_precomputed_reference_gives_the_same_run_and_is_reused_on_resume(memo_model, pref_data, tmp_path, monkeypatch):
    from mlx_lora.training import preference

    sets = {"train.iters": 4, "train.lr": 3e-3, "train.batch_size": 2, "train.save_every": 2, "train.seed": 2}
    live, pre = tmp_path / "live", tmp_path / "pre"
    mlx_lora.train(_cfg(memo_model, pref_data / "train.jsonl", live, **sets), progress=False)
    r1 = mlx_lora.train(
        _cfg(memo_model, pref_data / "train.jsonl", pre, **sets, **{"train.dpo_precompute_ref": True}),
        progress=False,
        callbacks=[StopAt(2)],
    )
    assert r1.stopped == "interrupted"
    cache = pre / preference.REFERENCE_FILE
    with np.load(cache) as z:
        assert z["logps"].shape == (96,) and np.all(z["logps"] < 0)

    def no_second_pass(*a, **k):
        raise AssertionError("the cached reference log-probs were computed again")

    monkeypatch.setattr(preference, "reference_logps", no_second_pass)
    monkeypatch.setattr(preference, "adapters_off", no_second_pass)  # and no step computes them either
    mlx_lora.train(build(str(pre / "config.yaml")), resume=True, progress=False)
    rec = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(rec(live), rec(pre), strict=True):
        for key in ("loss", "reward_margin", "chosen_reward"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (key, x["step"])
    a = {k: np.array(v) for k, v in mx.load(str(live / "adapter_model.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(pre / "adapter_model.safetensors")).items()}
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_two_ranks_take_the_step_of_one_rank_with_the_same_pairs(memo_model, pref_data, tmp_path):
    """mlx.launch -n 2: 1 pair per rank equals 2 pairs in one process (loss, rewards, adapter)."""
    import subprocess
    import sys

    from test_distributed import LAUNCH, _assert_same_adapter, _env, _free_port_pair

    args = [
        "--model",
        str(memo_model),
        "--data",
        str(pref_data / "train.jsonl"),
        "--iters",
        "4",
        "--lr",
        "3e-3",
        "--seed",
        "1",
        "--set",
        "train.method=dpo",
        "--set",
        "data.valid_fraction=0",
        "--set",
        "train.log_every=1",
        "--set",
        "train.save_every=100",
        "--quiet",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    mlx_lora.train(
        _cfg(
            memo_model,
            pref_data / "train.jsonl",
            one,
            **{"train.iters": 4, "train.lr": 3e-3, "train.seed": 1, "train.batch_size": 2},
        ),
        progress=False,
    )
    cmd = [
        str(LAUNCH),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(_free_port_pair()),
        "--python",
        sys.executable,
        "-m",
        "mlx_lora",
        "train",
        *args,
        "--batch-size",
        "1",
        "--out",
        str(two),
        "--distributed",
        "--dist-timeout",
        "300",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rec(one), rec(two)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for key in ("loss", "reward_margin", "chosen_logp", "tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])
    _assert_same_adapter(
        {k: np.array(v) for k, v in mx.load(str(two / "adapter_model.safetensors")).items()},
        {k: np.array(v) for k, v in mx.load(str(one / "adapter_model.safetensors")).items()},
    )


# ----------------------------------------------------------------------------------------------
# configuration and the command line


@pytest.mark.parametrize(
    "sets, fragment",
    [
        ({"train.method": "kto"}, "train.method: 'kto' is not one of sft, dpo, orpo"),
        ({"train.dpo_loss": "hinge"}, "train.dpo_loss: 'hinge' is not one of sigmoid, ipo"),
        ({"train.dpo_beta": 0}, "train.dpo_beta: must be > 0"),
        ({"train.dpo_label_smoothing": 0.5}, "train.dpo_label_smoothing: must be in [0, 0.5)"),
        ({"train.orpo_lambda": -1}, "train.orpo_lambda: must be >= 0"),
        ({"train.method": "dpo", "data.packing": True}, "data.packing: not available with train.method dpo"),
        (
            {"train.method": "orpo", "train.dpo_precompute_ref": True},
            "train.dpo_precompute_ref: applies to train.method dpo",
        ),
        (
            {"train.method": "dpo", "train.dpo_loss": "ipo", "train.dpo_label_smoothing": 0.1},
            "train.dpo_label_smoothing: applies to train.method dpo with train.dpo_loss sigmoid only",
        ),
    ],
)
def test_config_errors_name_the_key(sets, fragment):
    with pytest.raises(ConfigError) as e:
        build(extra={"model": {"path": "m"}, "data": {"path": "d"}}, overrides=[f"{k}={v}" for k, v in sets.items()])
    assert fragment in str(e.value)


def test_method_and_data_must_match_on_the_command_line(_cli_env, tiny_llama, tmp_path, capsys):
    chat = write(
        tmp_path / "chat.jsonl",
        rows({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    )
    pairs = _jsonl(tmp_path / "pairs.jsonl", pref_rows(4, seed=0))
    base = ["train", "--model", str(tiny_llama), "--iters", "1", "--quiet"]
    assert_refused(
        capsys,
        base + ["--data", str(chat), "--out", str(tmp_path / "a"), "--set", "train.method=dpo"],
        [str(chat), "train.method dpo needs preference rows", "chat format"],
        [tmp_path],
        code=2,
    )
    assert_refused(
        capsys,
        base + ["--data", str(pairs), "--out", str(tmp_path / "b")],
        [str(pairs), "train.method: dpo or orpo"],
        [tmp_path],
        code=2,
    )
    bad = write(
        tmp_path / "bad.jsonl",
        rows({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}),
    )
    assert_refused(
        capsys,
        base + ["--data", str(bad), "--out", str(tmp_path / "c"), "--set", "train.method=orpo"],
        [f"{bad}:2", "field 'rejected'", "expected a string or a list of messages"],
        [tmp_path],
        code=2,
    )
