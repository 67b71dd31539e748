"""Training end to end on tiny random models: memorisation, exact resume, accumulation,
packing, every architecture, QLoRA, DoRA, early stopping and the NaN policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_lora
import mlx_lora.data.mixture
from mlx_lora.config import build
from mlx_lora.model import adapters
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.testing import ARCHITECTURES, MOE_ARCHITECTURES, make_tiny_dataset


def _cfg(model, data, out, **sets):
    items = [f"{k}={v}" for k, v in sets.items()]
    base = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "valid_fraction": 0.0},
        "out": str(out),
        "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000},
    }
    return build(extra=base, overrides=items)


def _adapter(run) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(Path(run) / "adapter_model.safetensors")).items()}


def _losses(run) -> list[float]:
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def memo_model(tiny_model_dir):
    # init_std 0.2 gives the random lm_head enough range to express a confident answer
    return tiny_model_dir("llama", init_std=0.2)


@pytest.fixture(scope="module")
def chat8(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("d") / "chat8.jsonl", "chat", n=8, seed=0)


def test_memorises_and_generates_in_new_process(memo_model, chat8, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(
        memo_model,
        chat8,
        run,
        **{"train.iters": 100, "train.lr": 3e-3, "train.batch_size": 8, "lora.r": 16, "train.warmup_steps": 10},
    )
    result = mlx_lora.train(cfg, progress=False)
    losses = _losses(run)
    assert result.steps == 100 and len(losses) == 100
    assert losses[-1] <= 0.1 * losses[0], f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"
    # The run folder holds everything promised.
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"):
        assert (run / name).is_file(), name
    conf = json.loads((run / "adapter_config.json").read_text())
    assert conf["r"] == 16 and conf["base_model_name_or_path"] == str(memo_model)

    rows = [json.loads(l) for l in chat8.read_text().splitlines()[:2]]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_lora",
                "generate",
                "--model",
                str(memo_model),
                "--adapter",
                str(run),
                "--chat",
                "--prompt",
                question,
                "--max-tokens",
                "12",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith(answer), (question, out.stdout)


class StopAt:
    """Simulates Ctrl-C after a given step."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


def test_interrupt_and_resume_matches_uninterrupted_run(memo_model, chat8, tmp_path):
    sets = {
        "train.iters": 12,
        "train.lr": 3e-3,
        "train.batch_size": 2,
        "lora.dropout": 0.1,
        "train.save_every": 4,
        "train.seed": 3,
    }
    full = tmp_path / "full"
    mlx_lora.train(_cfg(memo_model, chat8, full, **sets), progress=False)

    part = tmp_path / "part"
    r1 = mlx_lora.train(_cfg(memo_model, chat8, part, **sets), progress=False, callbacks=[StopAt(7)])
    assert r1.stopped == "interrupted" and r1.steps == 7
    assert (part / "checkpoints" / "step-0000007").is_dir()
    cfg = build(str(part / "config.yaml"))
    r2 = mlx_lora.train(cfg, resume=True, progress=False)
    assert r2.steps == 12 and r2.stopped == "completed"

    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # metrics tell one story: one record per step, same losses as the straight run
    np.testing.assert_allclose(_losses(part), _losses(full), rtol=1e-4)


@pytest.mark.parametrize(
    "other",
    [
        {"train.batch_size": 1, "train.grad_accum": 4, "train.length_groups": False},
        {"train.batch_size": 4, "train.length_groups": True},
    ],
    ids=["grad_accum", "length_groups"],
)
def test_grad_accumulation_and_length_groups_equal_the_whole_batch(memo_model, chat8, tmp_path, other, monkeypatch):
    """4 micro-batches of 1 row, or each row alone at its own padded length, take the step of one
    padded batch of 4."""
    from mlx_lora.training import trainer as T

    # Calls of this tiny model cost more than its positions, so it would group the rows back into
    # one call: price a call at nothing, as for a real model, so every row runs alone.
    monkeypatch.setattr(T, "CPU_CALL_OVERHEAD", 0.0)
    common = {"train.iters": 3, "train.lr": 1e-3, "train.seed": 1}
    mlx_lora.train(
        _cfg(memo_model, chat8, tmp_path / "b4", **common, **{"train.batch_size": 4, "train.length_groups": False}),
        progress=False,
    )
    mlx_lora.train(_cfg(memo_model, chat8, tmp_path / "a4", **common, **other), progress=False)
    a, b = _adapter(tmp_path / "b4"), _adapter(tmp_path / "a4")
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    # Adam divides by the gradient's running RMS, so float32 summation-order noise in tiny
    # gradients shows up at ~1e-6 absolute in weights of ~1e-2.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(_losses(tmp_path / "b4"), _losses(tmp_path / "a4"), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_row_gives_each_example_its_own_loss(tiny_models, arch):
    """Three examples packed in one row with the block-diagonal mask score exactly as alone."""
    from mlx_lora.data.examples import attention_mask_from_segments
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.losses import masked_cross_entropy

    model, _, _ = load_model(str(tiny_models[arch]), with_tokenizer=False)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 500, size=n).astype(np.int32) for n in (7, 12, 5)]
    alone = []
    for s in seqs:
        x, y = mx.array(s[None, :-1]), mx.array(s[None, 1:])
        loss, n = masked_cross_entropy(model, x, y, mx.ones(y.shape))
        alone.append(loss.item())
    inputs = np.concatenate([s[:-1] for s in seqs])[None]
    targets = np.concatenate([s[1:] for s in seqs])[None]
    segments = np.concatenate([np.full(len(s) - 1, i + 1) for i, s in enumerate(seqs)])[None].astype(np.int32)
    pad = 4  # right padding that must not matter
    inputs = np.pad(inputs, ((0, 0), (0, pad)))
    targets = np.pad(targets, ((0, 0), (0, pad)))
    segments = np.pad(segments, ((0, 0), (0, pad)))
    mask = (segments > 0).astype(np.float32)
    attn = mx.array(attention_mask_from_segments(segments))
    packed, n = masked_cross_entropy(model, mx.array(inputs), mx.array(targets), mx.array(mask), attn)
    assert n.item() == sum(len(s) - 1 for s in seqs)
    np.testing.assert_allclose(packed.item(), sum(alone), rtol=2e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_saves_and_reloads(tiny_models, tmp_path, arch, chat8):
    run = tmp_path / arch
    # the tiny MoE routers have 4 outputs, which bounds the rank of a LoRA on them
    rank = {"lora.r": 4} if arch in MOE_ARCHITECTURES else {}
    cfg = _cfg(tiny_models[arch], chat8, run, **{"train.iters": 3, "train.lr": 1e-2, "train.batch_size": 2, **rank})
    result = mlx_lora.train(cfg, progress=False)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    state = _adapter(run)
    assert any(np.abs(v).max() > 0 for k, v in state.items() if "lora_B" in k)
    # a fresh model with the saved adapter gives the same logits as the trained one would
    from mlx_lora.commands.api import load_for_inference

    model, tok, _ = load_for_inference(str(tiny_models[arch]), str(run))
    x = mx.array([[1, 5, 9, 33, 70]])
    logits = model(x)
    adapters.fuse_model(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(logits), rtol=1e-3, atol=1e-4)


def test_qlora_on_quantized_base(tiny_model_dir, chat8, tmp_path):
    from mlx_lm.convert import convert

    q = tmp_path / "q4"
    convert(str(tiny_model_dir("llama", init_std=0.2)), str(q), quantize=True, q_group_size=32, q_bits=4)
    run = tmp_path / "run"
    cfg = _cfg(q, chat8, run, **{"train.iters": 30, "train.lr": 3e-3, "train.batch_size": 8, "lora.r": 16})
    mlx_lora.train(cfg, progress=False)
    losses = _losses(run)
    assert losses[-1] < 0.5 * losses[0]
    model, _, info = mlx_lora.load_for_inference(str(q), str(run))
    assert info.quantization["bits"] == 4
    import mlx.nn as nn

    bases = [m.base for _, m in adapters.adapter_layers(model)]
    assert bases and all(isinstance(b, nn.QuantizedLinear) for b in bases)


def test_dora_trains(memo_model, chat8, tmp_path):
    run = tmp_path / "dora"
    cfg = _cfg(
        memo_model, chat8, run, **{"train.iters": 30, "train.lr": 3e-3, "train.batch_size": 8, "lora.use_dora": True}
    )
    mlx_lora.train(cfg, progress=False)
    losses = _losses(run)
    assert losses[-1] < 0.5 * losses[0]
    assert any("lora_magnitude_vector" in k for k in _adapter(run))


def test_epochs_decide_steps_and_validation_tracks_best(memo_model, tmp_path):
    data = make_tiny_dataset(tmp_path / "d.jsonl", "chat", n=20, seed=1)
    run = tmp_path / "run"
    cfg = _cfg(
        memo_model,
        data,
        run,
        **{
            "train.epochs": 2,
            "train.batch_size": 4,
            "data.valid_fraction": 0.2,
            "train.eval_every": 2,
            "train.lr": 3e-3,
        },
    )
    result = mlx_lora.train(cfg, progress=False)
    # 16 training rows (20 minus a 20% validation split), 4 per step, 2 epochs
    assert result.steps == 8
    assert result.best_val_loss is not None
    assert (run / "checkpoints" / "best" / "adapter_model.safetensors").is_file()
    vals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert [v["step"] for v in vals] == [2, 4, 6, 8]
    assert result.best_val_loss == pytest.approx(min(v["val_loss"] for v in vals))


def test_early_stopping(memo_model, chat8, tmp_path):
    data = make_tiny_dataset(tmp_path / "d.jsonl", "chat", n=20, seed=1)
    cfg = _cfg(
        memo_model,
        data,
        tmp_path / "run",
        **{
            "train.iters": 50,
            "train.lr": 1e-12,
            "train.batch_size": 4,
            "data.valid_fraction": 0.2,
            "train.eval_every": 1,
            "train.early_stopping_patience": 2,
            "train.max_grad_norm": "null",
        },
    )
    result = mlx_lora.train(cfg, progress=False)
    assert result.stopped == "early_stopping" and result.steps < 50


class Poison:
    """Makes the loss NaN from a given step on (a diverging run, without waiting for one)."""

    def __init__(self, monkeypatch, from_step):
        import dataclasses

        import mlx_lora.training.methods as tr  # the supervised method builds the trainer's loss

        self.on, self.from_step, orig_make = False, from_step, tr.make_loss

        def make_loss(model, chunk_tokens):
            plain = orig_make(model, chunk_tokens)

            def loss(model, *args):
                value, n = plain.train(model, *args)
                return (value * float("nan") if self.on else value), n

            return dataclasses.replace(plain, train=loss)

        monkeypatch.setattr(tr, "make_loss", make_loss)

    def on_step(self, trainer, m):
        self.on = m["step"] >= self.from_step - 1


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_policy_keeps_last_good_checkpoint(memo_model, chat8, tmp_path, monkeypatch, policy):
    run = tmp_path / "run"
    cfg = _cfg(
        memo_model,
        chat8,
        run,
        **{
            "train.iters": 8,
            "train.batch_size": 8,
            "train.save_every": 1,
            "train.compile": False,
            "train.nan_policy": policy,
        },
    )
    poison = Poison(monkeypatch, from_step=4)
    with pytest.raises(mlx_lora.training.trainer.TrainingStopped, match="last good checkpoint"):
        mlx_lora.train(cfg, progress=False, callbacks=[poison])
    from mlx_lora.training.checkpoints import RunDir

    ckpt = RunDir(run).latest_checkpoint()
    assert ckpt is not None and ckpt.name == "step-0000003" and RunDir.is_complete(ckpt)
    state = mx.load(str(ckpt / "adapter_model.safetensors"))
    assert all(bool(mx.all(mx.isfinite(v)).item()) for v in state.values())


def test_existing_run_folder_is_not_clobbered(memo_model, chat8, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    cfg = _cfg(memo_model, chat8, run, **{"train.iters": 1})
    with pytest.raises(MlxLoraError, match="'notes.txt'"):
        mlx_lora.train(cfg, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_bad_data_leaves_no_run_folder(memo_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops"\n')
    run = tmp_path / "run"
    with pytest.raises(MlxLoraError, match=r"bad\.jsonl:2"):
        mlx_lora.train(_cfg(memo_model, bad, run, **{"train.iters": 1}), progress=False)
    assert not run.exists()


def test_grad_checkpoint_takes_the_same_steps(memo_model, chat8, tmp_path):
    common = {"train.iters": 3, "train.lr": 1e-3, "train.batch_size": 4}
    mlx_lora.train(_cfg(memo_model, chat8, tmp_path / "plain", **common), progress=False)
    mlx_lora.train(
        _cfg(memo_model, chat8, tmp_path / "ckpt", **common, **{"train.grad_checkpoint": True}), progress=False
    )
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # only the instances were changed: a freshly loaded model of the same class is untouched
    from mlx_lora.model.loading import load_model

    fresh, _, _ = load_model(str(memo_model), with_tokenizer=False)
    assert not getattr(type(fresh.layers[0]), "_mlx_lora_checkpointed", False)


def test_packed_training_memorises(memo_model, chat8, tmp_path):
    run = tmp_path / "packed"
    cfg = _cfg(
        memo_model,
        chat8,
        run,
        **{
            "train.iters": 60,
            "train.lr": 3e-3,
            "train.batch_size": 1,
            "lora.r": 16,
            "data.packing": True,
            "data.max_seq_length": 256,
        },
    )
    mlx_lora.train(cfg, progress=False)
    losses = _losses(run)
    assert losses[-1] < 0.2 * losses[0]


def test_dry_run_predicts_the_jobs_peak_and_writes_nothing(memo_model, chat8, tmp_path):
    """`train --dry-run` measures a few steps of the configured job: its peak is the peak a real
    run of the same job reaches, its plan counts the job's steps and target tokens, and it writes
    no run folder."""
    from click.testing import CliRunner

    from mlx_lora.commands.cli import cli
    from mlx_lora.training.estimate import estimate

    run = tmp_path / "run"
    cfg = _cfg(memo_model, chat8, run, **{"train.iters": 6, "train.batch_size": 4})
    est = estimate(cfg)
    assert not run.exists()
    assert est.total_steps == 6 and est.train_seconds > 0 and est.shapes >= 1
    # chat8 is 8 examples: 2 batches of 4 per epoch, 3 epochs in 6 steps
    ds_tokens = sum(
        b.ntokens
        for b, _ in mlx_lora.data.examples.iterate_batches(
            mlx_lora.data.mixture.load_datasets(
                cfg.data, mlx_lora.model.loading.load_model(str(memo_model))[1], seed=0, splits=("train",)
            ).train,
            4,
            max_seq_length=cfg.data.max_seq_length,
            seed=0,
            loop=False,
        )
    )
    assert est.target_tokens == 3 * ds_tokens
    mx.clear_cache()
    mx.reset_peak_memory()
    mlx_lora.train(cfg, progress=False)
    real = mx.get_peak_memory()
    assert 0.5 * real <= est.peak_memory_bytes <= 1.5 * real, (est.peak_memory_bytes, real)

    out = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            str(memo_model),
            "--data",
            str(chat8),
            "--out",
            str(tmp_path / "cli"),
            "--iters",
            "6",
            "--dry-run",
            "--quiet",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "peak" in out.output and "target tokens/s" in out.output and "6 steps" in out.output
    assert not (tmp_path / "cli").exists()
