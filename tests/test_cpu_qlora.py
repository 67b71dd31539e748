"""A quantized base on the CPU backend: computed with dequantized float weights when they fit
(``model.dequantize_on_cpu``), with the quantized folder kept as the base of record, and the same
adapter as quantized compute gives. Also: slow rates print with their digits."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_lora
from mlx_lora.config import build
from mlx_lora.model.integrity import base_model_fingerprint, recorded_fingerprint
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing.backend import backend_name
from mlx_lora.testing import make_tiny_dataset
from mlx_lora.training.callbacks import Progress

pytestmark = pytest.mark.skipif(backend_name() != "cpu", reason="the choice is made on the CPU backend only")


@pytest.fixture(scope="module")
def q4(tiny_model_dir, tmp_path_factory):
    from mlx_lm.convert import convert

    out = tmp_path_factory.mktemp("q") / "q4"
    convert(str(tiny_model_dir("llama", init_std=0.2)), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


@pytest.fixture(scope="module")
def chat8(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("d") / "chat8.jsonl", "chat", n=8, seed=0)


def _train(model, data, out, mode: str) -> list[str]:
    cfg = build(
        extra={
            "model": {"path": str(model), "dequantize_on_cpu": mode},
            "data": {"path": str(data), "valid_fraction": 0.0},
            "out": str(out),
            "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000},
        },
        overrides=["train.iters=2", "train.batch_size=4", "train.lr=3e-3", "lora.r=4"],
    )
    log = io.StringIO()
    mlx_lora.train(cfg, progress=False, stream=log)
    return _compute_lines(log.getvalue())


def _compute_lines(text: str) -> list[str]:
    """The "compute" lines of a run's output, the memory free at that moment (which other processes
    move between two runs) left out."""
    return [
        re.sub(r"of [0-9.]+ [KMGT]?B available", "of N available", l)
        for l in text.splitlines()
        if l.startswith("compute")
    ]


def _quantized(model) -> int:
    return sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def test_dequantized_training_matches_quantized_and_records_the_quantized_base(q4, chat8, tmp_path):
    deq = _train(q4, chat8, tmp_path / "deq", "auto")
    quant = _train(q4, chat8, tmp_path / "quant", "false")
    assert len(deq) == 1 and deq[0].startswith("compute   dequantized:"), deq
    assert len(quant) == 1 and quant[0].startswith("compute   quantized: WARNING"), quant

    a = mx.load(str(tmp_path / "deq" / "adapter_model.safetensors"))
    b = mx.load(str(tmp_path / "quant" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        # Two Adam steps of 3e-3 from the same start move each entry by ~3e-3 whatever the gradient's
        # size, so another start or other base weights differ by ~1e-3; float rounding (amplified by
        # Adam on near-zero gradients) stays near 1e-5.
        assert float(mx.abs(a[k]).max()) > 0
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-2, atol=1e-4, err_msg=k)

    for run in ("deq", "quant"):
        conf = json.loads((tmp_path / run / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == str(q4)
        assert recorded_fingerprint(conf) == base_model_fingerprint(Path(q4))


def test_load_model_dequantizes_only_when_asked_and_computes_the_same(q4):
    kept, _, info_kept = load_model(str(q4), with_tokenizer=False)  # fuse and export load this way
    off, _, info_off = load_model(str(q4), with_tokenizer=False, dequantize_on_cpu="false")
    on, _, info_on = load_model(str(q4), with_tokenizer=False, dequantize_on_cpu="auto")
    assert _quantized(kept) > 0 and info_kept.compute is None
    assert _quantized(off) == _quantized(kept) and info_off.compute.startswith("quantized: WARNING")
    assert _quantized(on) == 0 and info_on.compute.startswith("dequantized:")
    assert info_on.quantization == info_kept.quantization and info_on.local_path == info_kept.local_path
    tokens = mx.array([[1, 5, 9, 30, 2, 7]])
    np.testing.assert_allclose(np.array(on(tokens)), np.array(kept(tokens)), rtol=1e-4, atol=1e-4)


def test_auto_keeps_quantized_compute_and_says_why_when_memory_is_short(q4, monkeypatch):
    monkeypatch.setattr("mlx_lora.plumbing.backend.available_memory_bytes", lambda: 1000)
    model, _, info = load_model(str(q4), with_tokenizer=False, dequantize_on_cpu="auto")
    assert _quantized(model) > 0
    assert "slower per step" in info.compute and "available" in info.compute and "\n" not in info.compute
    forced, _, info = load_model(str(q4), with_tokenizer=False, dequantize_on_cpu="true")
    assert _quantized(forced) == 0 and "forced" in info.compute


def test_yaml_booleans_are_accepted_for_the_key_and_other_values_refused():
    from mlx_lora.config import ConfigError

    base = {"model": {"path": "m"}, "data": {"path": "d"}}
    assert build(extra=base, overrides=["model.dequantize_on_cpu=true"]).model.dequantize_on_cpu == "true"
    assert build(extra=base, overrides=["model.dequantize_on_cpu=false"]).model.dequantize_on_cpu == "false"
    with pytest.raises(ConfigError, match="dequantize_on_cpu"):
        build(extra=base, overrides=["model.dequantize_on_cpu=sometimes"])


@pytest.mark.parametrize("rate,shown", [(0.3, "0.3 tok/s"), (0.04, "0.04 tok/s"), (37.4, "37 tok/s")])
def test_progress_line_shows_slow_rates_with_a_decimal(rate, shown):
    out = io.StringIO()
    Progress(stream=out, log_every=1, tty=False).on_step(
        None,
        {
            "step": 1,
            "total_steps": 2,
            "loss": 1.0,
            "lr": 1e-4,
            "tokens_per_s": rate,
            "eta_s": 10.0,
            "peak_memory_gb": 0.5,
        },
    )
    assert shown in out.getvalue() and "  0 tok/s" not in out.getvalue()


@pytest.mark.parametrize("mode", ["auto", "false"])
def test_dry_run_measures_and_names_the_compute_path_training_takes(q4, chat8, tmp_path, capsys, monkeypatch, mode):
    """`train --dry-run` loads the base as training does: its compute line is training's, and the
    steps it times run on that path (dequantized layers when training dequantizes)."""
    from cli_harness import run_main

    from mlx_lora.training import estimate as estimate_module

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    trained = _train(q4, chat8, tmp_path / "trained", mode)
    measured = []
    real_timed = estimate_module._timed

    def timed(trainer, batch):  # the model whose steps the dry run times
        measured.append(_quantized(trainer.model))
        return real_timed(trainer, batch)

    monkeypatch.setattr(estimate_module, "_timed", timed)
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--dry-run",
            "--model",
            str(q4),
            "--data",
            str(chat8),
            "--out",
            str(tmp_path / "dry"),
            "--iters",
            "2",
            "--batch-size",
            "4",
            "--set",
            f"model.dequantize_on_cpu={mode}",
            "--set",
            "data.valid_fraction=0",
        ],
    )
    assert code == 0, err
    assert _compute_lines(out) == trained, out
    assert measured and all((n == 0) == (mode == "auto") for n in measured), measured
