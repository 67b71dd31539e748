"""GRPO (train.method grpo): the loss against TRL's published formulas on hand-built log-probs and
rewards, the rewards one by one, configuration, sampling, the CLI run and its metrics, exact
resume, and bad input refused before anything is written. TRL's own loss code on the same numbers
is in test_grpo_reference.py; the learning run on SmolLM2 is marked slow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_harness import assert_refused, cli_env, rows, run_main, write

import mlx_lora
from mlx_lora.config import build
from mlx_lora.plumbing.errors import ConfigError, DataError
from mlx_lora.training import rewards as R
from mlx_lora.training.grpo import (
    Objective,
    TokenLogps,
    advantages,
    completion_batch,
    sample_group,
    sample_key,
    token_loss,
)
from mlx_lora.training.losses import split_head
from mlx_lora.training.trainer import batch_arrays

_cli_env = pytest.fixture(scope="module")(cli_env)


# ----------------------------------------------------------------------------------------------
# the loss, against TRL's formulas computed here in numpy


def _trl_loss(logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    """TRL GRPOTrainer._compute_loss, transcribed to numpy: k3 KL, clipped ratio, the three reductions."""
    kl = np.exp(ref - logps) - (ref - logps) - 1
    coef_1 = np.exp(logps - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta != 0.0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / max(mask.sum(), 1.0)
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_len)
    mean_kl = (kl * mask).sum() / mask.sum()
    low = ((coef_1 < 1 - eps_low) & (adv[:, None] < 0)) * mask
    high = ((coef_1 > 1 + eps_high) & (adv[:, None] > 0)) * mask
    return loss, mean_kl, low.sum(), high.sum()


def _trl_advantages(rewards, G, scale=True):
    r = rewards.reshape(-1, G)
    mean = np.repeat(r.mean(1), G)
    std = np.repeat(r.std(1, ddof=1), G)  # torch.std: Bessel's correction
    adv = rewards - mean
    return adv / (std + 1e-4) if scale else adv


def _case(seed=0, B=6, T=7):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        mask[b, : rng.integers(1, T + 1)] = 1  # completions of different lengths, right-padded
    logps = -rng.gamma(2.0, 0.5, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.4, (B, T))).astype(np.float32)  # ratios well outside [0.8, 1.2]
    ref = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    rewards = np.array([1, 0, 0, 1, 0.5, 0], np.float32)[:B]
    return logps, old, ref, rewards, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps, eps_high", [(0.04, 0.2, None), (0.0, 0.2, 0.28), (0.1, 0.1, 0.3)])
def test_loss_matches_trl_formulas(loss_type, beta, eps, eps_high):
    logps, old, ref, rewards, mask = _case()
    adv = _trl_advantages(rewards.astype(np.float64), 3)
    np.testing.assert_allclose(advantages(rewards, 3), adv, rtol=1e-5, atol=1e-6)
    obj = Objective(loss_type, beta, eps, eps_high, max_completion_length=9)
    num, den, stats = token_loss(
        obj, mx.array(logps), mx.array(mask), mx.array(adv.astype(np.float32)), mx.array(old), mx.array(ref)
    )
    want, kl, low, high = _trl_loss(
        logps.astype(np.float64), old, ref, adv, mask, loss_type, beta, eps, eps if eps_high is None else eps_high, 9
    )
    assert float(num) / float(den) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert low + high > 0  # the case exercises clipping on both sides
    kl_sum, tokens, got_low, got_high, n = np.array(stats).tolist()
    assert (tokens, got_low, got_high, n) == (mask.sum(), low, high, 6)
    if beta:
        assert kl_sum / tokens == pytest.approx(kl, rel=1e-5)


def test_gradient_is_the_policy_gradient_when_old_is_the_policy():
    """One update per sampling (old = policy, detached): d loss / d logp_t = -A_i / n_i (grpo),
    plus beta * (1 - exp(ref - logp)) from the KL term."""
    logps, _, ref, rewards, mask = _case(1)
    adv = advantages(rewards, 3)
    obj = Objective("grpo", 0.04, 0.2)

    def f(lp):
        num, den, _ = token_loss(obj, lp, mx.array(mask), mx.array(adv), None, mx.array(ref))
        return num / den

    g = np.array(mx.grad(f)(mx.array(logps)))
    n = mask.sum(-1, keepdims=True)
    want = (-adv[:, None] + 0.04 * (1 - np.exp(ref - logps))) * mask / n / len(mask)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)

    # TRL's use_bias_correction_kl weights KL_t by rho_t: on policy the loss is the same, and the
    # gradient gains beta * KL_t (d rho_t / d logp_t = 1 there).
    corrected = Objective("grpo", 0.04, 0.2, kl_bias_correction=True)

    def fc(lp):
        num, den, _ = token_loss(corrected, lp, mx.array(mask), mx.array(adv), None, mx.array(ref))
        return num / den

    assert float(fc(mx.array(logps))) == pytest.approx(float(f(mx.array(logps))), rel=1e-6)
    kl = np.exp(ref - logps) - (ref - logps) - 1
    np.testing.assert_allclose(
        np.array(mx.grad(fc)(mx.array(logps))), want + 0.04 * kl * mask / n / len(mask), rtol=1e-4, atol=1e-7
    )


def test_accumulated_micro_batches_take_the_step_of_one_batch():
    """Each micro-batch returns (numerator, its share of the denominator): their sums divide to
    the loss of the whole batch for every reduction."""
    logps, old, ref, rewards, mask = _case(2)
    adv = advantages(rewards, 3)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        obj = Objective(loss_type, 0.04, 0.2, max_completion_length=9)
        whole = token_loss(obj, *(mx.array(x) for x in (logps, mask, adv, old, ref)))
        parts = [
            token_loss(obj, *(mx.array(x[s]) for x in (logps, mask, adv, old, ref))) for s in (slice(0, 2), slice(2, 6))
        ]
        assert float(whole[0]) / float(whole[1]) == pytest.approx(
            sum(float(p[0]) for p in parts) / sum(float(p[1]) for p in parts), rel=1e-6
        )


def test_flat_groups_have_zero_advantage_and_unscaled_variant():
    assert np.all(advantages(np.array([1, 1, 1, 0, 0, 0.0]), 3) == 0)
    np.testing.assert_allclose(advantages(np.array([1, 0, 0, 2.0]), 2, scale=False), [0.5, -0.5, -1, 1])


def test_chunked_and_full_per_token_log_probs_agree_with_gradients(tiny_llama):
    from mlx_lora.config import LoraConfig
    from mlx_lora.model import adapters
    from mlx_lora.model.loading import load_model

    model, _, _ = load_model(str(tiny_llama))
    adapters.apply_lora(model, LoraConfig(r=4))
    batch = completion_batch([[1, 5, 9], [1, 7]], [[3, 4, 2], [8]], np.array([0, 1]))
    inputs, targets, mask, _ = batch_arrays(batch)
    assert np.array(mask).sum() == 4 and np.array(mask)[0, 2:5].tolist() == [1, 1, 1]
    full, chunked = TokenLogps(None, None), TokenLogps(split_head(model), 2)
    np.testing.assert_allclose(
        np.array(chunked(model, inputs, targets, mask)),
        np.array(full(model, inputs, targets, mask)),
        rtol=1e-4,
        atol=1e-5,
    )
    w = mx.array(np.random.default_rng(0).normal(size=mask.shape).astype(np.float32))

    def loss(tl):
        return lambda m: (tl(m, inputs, targets, mask) * w).sum()

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    ga = dict(tree_flatten(nn.value_and_grad(model, loss(full))(model)[1]))
    gb = dict(tree_flatten(nn.value_and_grad(model, loss(chunked))(model)[1]))
    for k in ga:
        np.testing.assert_allclose(np.array(gb[k]), np.array(ga[k]), rtol=1e-3, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------------------------
# sampling


def test_sample_group_is_one_batched_decode_and_depends_only_on_its_key(tiny_llama):
    from mlx_lora.model.loading import load_model

    model, _, _ = load_model(str(tiny_llama))
    calls = []
    real = type(model).__call__

    class Counting(type(model)):
        def __call__(self, *a, **k):
            calls.append(a[0].shape)
            return real(self, *a, **k)

    model.__class__ = Counting
    a = sample_group(model, [1, 5, 9, 3], 5, 6, eos=set(), temperature=1.0, key=sample_key(0, 3, 7))
    assert len(a) == 5 and all(len(c) == 6 for c in a)
    assert len(calls) == 6 and all(s[0] == 5 for s in calls)  # every call decodes the whole group
    b = sample_group(model, [1, 5, 9, 3], 5, 6, eos=set(), temperature=1.0, key=sample_key(0, 3, 7))
    c = sample_group(model, [1, 5, 9, 3], 5, 6, eos=set(), temperature=1.0, key=sample_key(0, 4, 7))
    assert a == b and a != c
    eos = {a[0][2]}
    d = sample_group(model, [1, 5, 9, 3], 5, 6, eos=eos, temperature=1.0, key=sample_key(0, 3, 7))
    assert d[0] == a[0][:3]  # stops at the EOS token, which it keeps (a target of the loss)


# ----------------------------------------------------------------------------------------------
# rewards


def _reward(name, completion, row=None, tokens=0, max_tokens=10):
    (r,) = R.build(name, None)
    return R.call(r, completion, row or {}, tokens, max_tokens, "data.jsonl", 1)


@pytest.mark.parametrize(
    "completion, answer, want",
    [
        ("The answer is 42.", "42", 1.0),
        ("42", 42, 1.0),
        ("-7 apples", "-7", 1.0),
        ("1,000 people", "1000", 1.0),
        ("2.50", "2.5", 1.0),
        ("12 + 30 = 42", "42", 0.0),
        ("no number", "3", 0.0),
        ("41", "42", 0.0),
        ("3", "x = 3", 1.0),
        ("3", "none", 0.0),
    ],
)
def test_number_reward_compares_the_first_number(completion, answer, want):
    assert _reward("number", completion, {"answer": answer}) == want


def test_builtin_rewards():
    row = {"answer": "Paris"}
    assert _reward("exact", "  paris ", row) == 1.0 and _reward("exact", "Paris.", row) == 0.0
    assert _reward("contains", "It is PARIS, of course", row) == 1.0 and _reward("contains", "Rome", row) == 0.0
    obj = {"answer": {"a": 1, "b": [2]}}
    assert _reward("json", '{"b": [2], "a": 1.0}', obj) == 1.0
    assert _reward("json", '```json\n{"a": 1, "b": [2]}\n```', obj) == 1.0
    assert _reward("json", '{"a": 1}', obj) == 0.0 and _reward("json", "{a: 1", obj) == 0.0
    assert _reward("json", "[1, 2]", {"answer": "[1,2]"}) == 1.0  # an answer string holding JSON
    assert _reward(r"regex:\d{3}", "code 123 ok") == 1.0 and _reward(r"regex:\d{3}", "12") == 0.0
    assert _reward(r"format:<a>.*</a>", " <a>x\ny</a>\n") == 1.0 and _reward(r"format:<a>.*</a>", "<a>x</a> z") == 0.0
    assert _reward("length", "x", tokens=5, max_tokens=20) == -0.25
    assert _reward("length:10", "x", tokens=5, max_tokens=20) == 0.0
    assert _reward("length:10", "x", tokens=15, max_tokens=20) == -0.5


def test_pass_at_1_reward_runs_the_rows_tests_in_the_sandbox():
    row = {"tests": "assert add(2, 3) == 5"}
    assert _reward("pass@1", "```python\ndef add(a, b):\n    return a + b\n```", row) == 1.0
    assert _reward("pass@1", "def add(a, b):\n    return a - b", row) == 0.0


def test_weighted_rewards_and_user_function(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards.py", "def brevity(completion, row):\n    return 1.0 / (1 + len(completion))\n")
    monkeypatch.chdir(tmp_path)
    rs = R.build(None, {"number": 1.0, "my_rewards:brevity": 0.5})
    assert [(r.name, r.weight, r.user) for r in rs] == [("number", 1.0, False), ("my_rewards:brevity", 0.5, True)]
    assert R.call(rs[1], "abc", {}, 0, 1, "f", 1) == 0.25


def test_reward_that_raises_or_returns_nan_names_row_and_reward(tmp_path, monkeypatch):
    write(
        tmp_path / "bad_rewards.py",
        "def boom(c, row):\n    raise KeyError('gold')\n\n"
        "def nan(c, row):\n    return float('nan')\n\ndef text(c, row):\n    return 'yes'\n",
    )
    monkeypatch.chdir(tmp_path)
    for name, fragment in (
        ("bad_rewards:boom", "raised KeyError"),
        ("bad_rewards:nan", "not a finite number"),
        ("bad_rewards:text", "not a number"),
    ):
        (r,) = R.build(name, None)
        with pytest.raises(DataError) as e:
            R.call(r, "x", {}, 0, 1, "data.jsonl", 7)
        assert str(e.value).startswith(f"data.jsonl:7, field '{name}'") and fragment in str(e.value)
    with pytest.raises(R.RewardError, match="cannot import module 'nope'"):
        R.build("nope:fn", None)
    with pytest.raises(R.RewardError, match="has no function 'missing'"):
        R.build("bad_rewards:missing", None)


# ----------------------------------------------------------------------------------------------
# configuration


def _build(**sets):
    base = {"model": {"path": "m"}, "data": {"path": "d"}, "train": {"method": "grpo", "reward": "number"}}
    return build(extra=base, overrides=[f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize(
    "sets, fragment",
    [
        ({"train.reward": "nubmer"}, "train.reward: unknown reward 'nubmer' (did you mean 'number'?)"),
        ({"train.reward": "null"}, "train.reward: required with train.method grpo"),
        ({"train.rewards": "{number: 1, exact: 0.5}"}, "set either train.reward or train.rewards"),
        ({"train.reward": "null", "train.rewards": "{number: 1, bogus: 0.5}"}, "train.rewards: unknown reward 'bogus'"),
        ({"train.reward": "null", "train.rewards": "{number: .nan}"}, "train.rewards.number: weight must be a finite"),
        ({"train.reward": "regex:(ab"}, "train.reward: reward regex:(ab: bad regular expression"),
        ({"train.reward": "length:x"}, "expected length:N"),
        ({"train.method": "sft"}, "train.reward: applies to train.method grpo only"),
        ({"train.group_size": 1}, "train.group_size: must be >= 2"),
        ({"train.temperature": 0}, "train.temperature: must be > 0"),
        ({"train.epsilon": 1}, "train.epsilon: must be in (0, 1)"),
        ({"train.grpo_beta": -1}, "train.grpo_beta: must be >= 0"),
        ({"train.grpo_loss": "dapo"}, "train.grpo_loss: 'dapo' is not one of grpo, dr_grpo, bnpo"),
        ({"data.packing": True}, "data.packing: not available with train.method grpo"),
        ({"train.max_completion_length": 2048}, "train.max_completion_length: must be < data.max_seq_length"),
    ],
)
def test_config_errors_name_the_key(sets, fragment):
    with pytest.raises(ConfigError) as e:
        _build(**sets)
    assert fragment in str(e.value)


def test_reward_from_the_command_line_and_user_names_pass_validation():
    assert _build(**{"train.reward": "number"}).train.reward == "number"
    assert _build(**{"train.reward": "my_pkg.rewards:score"}).train.reward == "my_pkg.rewards:score"
    cfg = _build(**{"train.reward": "null", "train.rewards": "{number: 1.0, 'format:\\d+': 0.2}"})
    assert cfg.train.rewards == {"number": 1.0, "format:\\d+": 0.2}


# ----------------------------------------------------------------------------------------------
# the command line: a run, its metrics, resume, refusals

ARITH = [{"prompt": f"{a} + {b} =", "answer": str(a + b), "level": a % 3} for a in range(2, 14) for b in (3, 5)]


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith")
    write(d / "train.jsonl", rows(*ARITH[:20]))
    write(d / "valid.jsonl", rows(*ARITH[20:]))
    return d


def _args(model, data, out, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        "4",
        "--lr",
        "1e-2",
        "--seed",
        "3",
        "--set",
        "train.method=grpo",
        "--set",
        f"train.rewards={REWARDS}",
        "--set",
        "train.max_completion_length=6",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.group_size=3",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.save_every=2",
        "--set",
        "lora.dropout=0.1",
        *extra,
    ]


REWARDS = "{number: 1.0, 'regex:e': 0.5}"  # the tiny model's text holds an 'e' about half the time
STEP_FIELDS = (
    "loss",
    "reward",
    "reward_number",
    "reward_regex:e",
    "reward_std",
    "zero_std_groups",
    "kl",
    "completion_length",
    "sample_s",
    "update_s",
    "tokens",
    "clip_ratio",
)


def test_cli_run_writes_grpo_metrics_and_progress(_cli_env, tiny_llama, arith, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, _args(tiny_llama, arith, out, "--set", "train.grpo_loss=bnpo"))
    assert code == 0, err
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in STEP_FIELDS:
            assert key in r and math.isfinite(r[key]), key
        assert 0 <= r["zero_std_groups"] <= 1 and 1 <= r["completion_length"] <= 6 and r["kl"] >= 0
        assert r["reward"] == pytest.approx(r["reward_number"] + 0.5 * r["reward_regex:e"])
        assert r["tokens"] >= 2 * 3
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before the first update
    assert any(r["reward_std"] > 0 for r in steps) and any(r["loss"] != 0 for r in steps)
    assert steps[-1]["kl"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert evals and "val_reward" in evals[-1] and evals[-1]["val_loss"] == -evals[-1]["val_reward"]
    text = stdout + err
    assert "grpo      3 completions per prompt" in text and "reward " in text and "sample " in text


def test_resume_continues_exactly_including_the_sampling(_cli_env, tiny_llama, arith, tmp_path, capsys):
    class StopAt:
        def on_step(self, trainer, m):
            if m["step"] == 2:
                raise KeyboardInterrupt

    from mlx_lora.commands.cli import main  # noqa: F401  (the same entry point the harness drives)

    full, part = tmp_path / "full", tmp_path / "part"
    code, _, err = run_main(capsys, _args(tiny_llama, arith, full))
    assert code == 0, err
    cfg = build(
        extra={"model": {"path": str(tiny_llama)}, "data": {"path": str(arith)}, "out": str(part)},
        overrides=[
            "train.iters=4",
            "train.lr=1e-2",
            "train.seed=3",
            "train.method=grpo",
            f"train.rewards={REWARDS}",
            "train.max_completion_length=6",
            "train.batch_size=2",
            "train.group_size=3",
            "train.log_every=1",
            "train.eval_every=4",
            "train.eval_batches=1",
            "train.save_every=2",
            "lora.dropout=0.1",
        ],
    )
    r1 = mlx_lora.train(cfg, progress=False, callbacks=[StopAt()])
    assert r1.stopped == "interrupted" and r1.steps == 2
    code, _, err = run_main(capsys, ["train", "--resume", str(part)])
    assert code == 0, err
    a = {k: np.array(v) for k, v in mx.load(str(full / "adapter_model.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(part / "adapter_model.safetensors")).items()}
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    rec = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(rec(full), rec(part), strict=True):
        assert x["step"] == y["step"]
        for key in ("loss", "reward", "reward_std", "completion_length", "kl", "val_reward"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])


def test_grad_accum_takes_the_step_of_one_batch(tiny_llama, arith, tmp_path):
    """Sampling keys depend on (seed, step, prompt), so 2 x 1 prompts accumulated sample and step
    exactly as a batch of 2."""

    def run(out, bs, accum):
        cfg = build(
            extra={"model": {"path": str(tiny_llama)}, "data": {"path": str(arith)}, "out": str(out)},
            overrides=[
                "train.iters=2",
                "train.lr=1e-2",
                "train.method=grpo",
                f"train.rewards={REWARDS}",
                "train.max_completion_length=6",
                f"train.batch_size={bs}",
                f"train.grad_accum={accum}",
                "train.group_size=3",
                "train.log_every=1",
                "train.eval_every=100",
            ],
        )
        mlx_lora.train(cfg, progress=False)
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = run(tmp_path / "a", 2, 1), run(tmp_path / "b", 1, 2)
    assert any(r["loss"] != 0 for r in a)
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "reward", "kl", "tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("case", ["no_answer", "unknown_reward", "raises", "nan", "bad_prompt"])
def test_bad_input_is_refused_before_anything_is_written(_cli_env, tiny_llama, tmp_path, capsys, monkeypatch, case):
    data = write(tmp_path / "data" / "train.jsonl", rows(*ARITH[:6]))
    write(
        tmp_path / "rewards_here.py",
        "def boom(c, row):\n    return {'a': 1}[row['answer']]\n\n"
        "def nan(c, row):\n    return float('nan') if row['level'] == 1 else 0.0\n",
    )
    monkeypatch.chdir(tmp_path)
    reward, fragments = "number", []
    if case == "no_answer":
        write(data, rows(*ARITH[:3], {"prompt": "1 + 1 =", "level": 0}, *ARITH[3:5]))
        fragments = [f"{data}:4", "field 'answer'", "reward number"]
    elif case == "unknown_reward":
        reward, fragments = "exactt", ["train.reward: unknown reward 'exactt'", "did you mean 'exact'"]
    elif case == "raises":
        reward, fragments = "rewards_here:boom", [f"{data}:1", "field 'rewards_here:boom'", "raised KeyError"]
    elif case == "nan":
        reward = "rewards_here:nan"
        line = 1 + next(i for i, r in enumerate(ARITH[:6]) if r["level"] == 1)
        fragments = [f"{data}:{line}", "field 'rewards_here:nan'", "not a finite number"]
    else:
        write(data, rows(*ARITH[:2], {"prompt": 5, "answer": "1"}))
        fragments = [f"{data}:3", "field 'prompt'", "expected a string or a list of messages"]
    argv = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(data.parent),
        "--out",
        str(tmp_path / "run"),
        "--iters",
        "1",
        "--quiet",
        "--set",
        "train.method=grpo",
        "--set",
        f"train.reward={reward}",
    ]
    assert_refused(capsys, argv, fragments, [tmp_path], code=2)


def test_sft_data_for_grpo_and_prompt_rows_for_sft_are_refused(_cli_env, tiny_llama, tmp_path, capsys):
    chat = write(
        tmp_path / "chat.jsonl",
        rows({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    )
    assert_refused(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(chat),
            "--out",
            str(tmp_path / "a"),
            "--iters",
            "1",
            "--quiet",
            "--set",
            "train.method=grpo",
            "--set",
            "train.reward=number",
        ],
        [str(chat), "field 'prompt'", "GRPO rows need a prompt"],
        [tmp_path],
        code=2,
    )
    prompts = write(tmp_path / "prompts.jsonl", rows(*ARITH[:3]))
    assert_refused(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(prompts),
            "--out",
            str(tmp_path / "b"),
            "--iters",
            "1",
            "--quiet",
        ],
        [str(prompts), "train with train.method grpo"],
        [tmp_path],
        code=2,
    )


def test_dry_run_measures_the_sampling_phase(_cli_env, tiny_llama, arith, tmp_path, capsys):
    code, out, err = run_main(capsys, _args(tiny_llama, arith, tmp_path / "never", "--dry-run"))
    assert code == 0, err
    assert not (tmp_path / "never").exists()
    assert "includes the sampling phase: 3 completions of 6 tokens" in out + err

    def peak(text):
        value, unit = re.search(r"peak ([\d.]+) (\w+)", text).groups()
        return float(value) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]

    # completions decode to max_completion_length in the measured steps, so a longer limit raises the peak
    code, out2, err2 = run_main(
        capsys,
        _args(
            tiny_llama,
            arith,
            tmp_path / "never",
            "--dry-run",
            "--set",
            "train.max_completion_length=200",
            "--set",
            "data.max_seq_length=256",
        ),
    )
    assert code == 0, err2
    assert peak(out2 + err2) > 2 * peak(out + err)


def test_two_ranks_take_the_step_of_one_rank_with_the_same_prompts(tiny_llama, arith, tmp_path):
    """mlx.launch -n 2: 1 prompt per rank samples and steps exactly as 2 prompts in one process
    (sampling keys depend on the prompt, not the rank)."""
    import shutil
    import subprocess
    import sys

    from test_distributed import LAUNCH, _assert_same_adapter, _env, _free_port_pair

    launch = LAUNCH if LAUNCH.exists() else Path(shutil.which("mlx.launch") or LAUNCH)

    one, two = tmp_path / "one", tmp_path / "two"
    base = _args(tiny_llama, arith, one)[1:]
    # no adapter dropout: its masks depend on the rank (as in supervised training)
    args = [a if a != "lora.dropout=0.1" else "lora.dropout=0" for a in base if a not in ("--out", str(one))]
    code = subprocess.run(
        [sys.executable, "-m", "mlx_lora", "train", *args, "--out", str(one), "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=400,
    )
    assert code.returncode == 0, code.stderr
    args = [a if a != "train.batch_size=2" else "train.batch_size=1" for a in args]
    cmd = [
        str(launch),
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
        "--out",
        str(two),
        "--distributed",
        "--dist-timeout",
        "60",
        "--quiet",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rec(one), rec(two)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in ("loss", "reward", "reward_std", "kl", "tokens", "completion_length", "val_reward"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])
    _assert_same_adapter(
        {k: np.array(v) for k, v in mx.load(str(two / "adapter_model.safetensors")).items()},
        {k: np.array(v) for k, v in mx.load(str(one / "adapter_model.safetensors")).items()},
    )


@pytest.mark.long
def test_smollm2_learns_the_arithmetic_task(smollm2_hf, tmp_path):
    """The recipe on the bundled arithmetic prompts (docs/grpo.md): held-out greedy answers are right
    more often after its 20 steps (measured: 0.45 -> 0.70). Every step's records are complete."""
    from mlx_lora.commands.recipes import demo_data
    from mlx_lora.model import adapters
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.grpo import greedy_accuracy, load_prompt_splits

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "grpo-arithmetic.yaml"
    cfg = build(
        str(recipe),
        [
            f"model.path={smollm2_hf}",
            f"data.path={demo_data('arithmetic')}",
            f"out={tmp_path / 'run'}",
            "train.eval_every=1000",
            "train.log_every=1",  # a metrics record for every step
            "data.cache=false",
        ],
    )

    def held_out(adapter=None):
        model, tokenizer, _ = load_model(str(smollm2_hf))
        if adapter is not None:
            adapters.load_adapter(model, str(adapter))
        model.eval()
        test = load_prompt_splits(cfg, tokenizer, splits=("test",)).test
        return greedy_accuracy(model, tokenizer, test, "number", cfg.train.max_completion_length)

    before = held_out()
    result = mlx_lora.train(cfg, progress=False)
    assert result.stopped == "completed"
    after = held_out(tmp_path / "run")
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 20 and all(0 <= r["reward"] <= 1 and r["kl"] >= 0 for r in steps)
    assert after >= before + 0.1, (before, after)
