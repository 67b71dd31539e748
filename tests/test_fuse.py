"""``mlx-lora fuse``: merged weights follow the LoRA / DoRA formulas, keep the base's precision,
and the written folder loads in our loader, in mlx-lm and in transformers with the same logits.

Expected fused weights are computed here in numpy from the adapter file (W + s B A, and DoRA's
m * W' / ||W'||_row), not taken from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx import nn
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlx_lora.config import LoraConfig
from mlx_lora.converters import verify as V
from mlx_lora.converters.fuse import fuse, load_fused
from mlx_lora.model.adapters import adapter_layers, apply_lora, load_adapter, save_adapter
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing.errors import AdapterError, ExportError
from mlx_lora.plumbing.ownership import OwnershipError
from mlx_lora.testing import ARCHITECTURES, MOE_ARCHITECTURES

TOKENS = [[5, 17, 99, 3, 250, 42, 7, 300, 11, 64]]


# ---------------------------------------------------------------------------------------------
# helpers shared with the other export tests


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    dora: bool = False,
    r: int = 8,
    alpha: float = 16.0,
    rslora: bool = False,
    targets=None,
    seed: int = 0,
    b_std: float = 0.05,
) -> Path:
    """A trained-looking adapter: PEFT's init for A, random non-zero B (and a perturbed DoRA
    magnitude), saved the way the trainer saves it."""
    model, _, info = load_model(str(model_dir), with_tokenizer=False)
    mx.random.seed(seed)
    cfg = LoraConfig(r=r, alpha=alpha, use_dora=dora, use_rslora=rslora, target_modules=targets)
    apply_lora(model, cfg)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * b_std
        if dora:
            layer.magnitude = layer.magnitude * (1 + 0.1 * mx.random.normal(layer.magnitude.shape))
    save_adapter(model, out, cfg, str(model_dir), extra={"model_type": info.model_type})
    return out


def adapter_logits(model_dir: Path, adapter: Path, tokens=TOKENS) -> list[np.ndarray]:
    """Logits of the base model with the adapter applied (not fused), float32."""
    model, _, _ = load_model(str(model_dir), dtype="float32", with_tokenizer=False)
    load_adapter(model, adapter)
    model.eval()
    return V.logits(model, tokens)


def folder_logits(folder: Path, tokens=TOKENS) -> list[np.ndarray]:
    model, _, _ = load_model(str(folder), dtype="float32", with_tokenizer=False)
    model.eval()
    return V.logits(model, tokens)


def quantized_copy(src: Path, out: Path, bits: int, group_size: int = 32, scales_dtype=mx.float16) -> Path:
    """An MLX-quantized copy of an HF folder, laid out like mlx-lm's converter writes it."""
    model, _, _ = load_model(str(src), with_tokenizer=False)
    nn.quantize(model, group_size=group_size, bits=bits)
    weights = {
        k: (v.astype(scales_dtype) if v.dtype in (mx.float32, mx.float16, mx.bfloat16) else v)
        for k, v in tree_flatten(model.parameters())
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = {"group_size": group_size, "bits": bits}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, out / f.name)
    return out


def st_dtypes(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def max_rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return V.compare(a, b)[1]


# ---------------------------------------------------------------------------------------------
# the merge itself


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fused_weights_follow_the_formula(tmp_path, tiny_llama, dora):
    ad = make_adapter(tiny_llama, tmp_path / "ad", dora=dora, rslora=not dora, r=4, alpha=8.0)
    out = fuse(str(tiny_llama), ad, tmp_path / "fused", log=lambda m: None).out_dir
    base = load_file(str(tiny_llama / "model.safetensors"))
    state = load_file(str(ad / "adapter_model.safetensors"))
    fused = load_file(str(out / "model.safetensors"))
    scale = 8.0 / (4 if dora else math.sqrt(4))  # rsLoRA in the LoRA case: alpha / sqrt(r)
    checked = 0
    for key in state:
        if not key.endswith("lora_A.weight"):
            continue
        path = key[len("base_model.model.") : -len(".lora_A.weight")]
        a = state[key].astype(np.float64)
        b = state[key.replace("lora_A", "lora_B")].astype(np.float64)
        w = base[path + ".weight"].astype(np.float64) + scale * b @ a
        if dora:
            m = state[f"base_model.model.{path}.lora_magnitude_vector"].astype(np.float64)
            w = m[:, None] * w / np.linalg.norm(w, axis=1, keepdims=True)
        np.testing.assert_allclose(fused[path + ".weight"], w, rtol=2e-5, atol=2e-6)
        checked += 1
    assert checked == 2 * 7  # 2 blocks x 7 linear layers
    # layers without an adapter are copied unchanged
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(fused[name], base[name])


def test_fused_model_equals_the_adapter_model_and_fusing_twice_is_identical(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad", dora=True)
    r1 = fuse(str(tiny_llama), ad, tmp_path / "f1", log=lambda m: None)
    r2 = fuse(str(tiny_llama), ad, tmp_path / "f2", log=lambda m: None)
    assert (r1.out_dir / "model.safetensors").read_bytes() == (r2.out_dir / "model.safetensors").read_bytes()
    ref = adapter_logits(tiny_llama, ad)
    assert max_rel(ref, folder_logits(r1.out_dir)) < 1e-5
    assert r1.verify.ok and r1.verify.comparisons[0].max_rel_error == 0.0


def test_output_folder_is_complete_hf_layout(tmp_path, tiny_llama):
    out = fuse(
        str(tiny_llama), make_adapter(tiny_llama, tmp_path / "ad"), tmp_path / "fused", log=lambda m: None
    ).out_dir
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".fused")]  # no temporary left over
    src_cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == {
        k: v for k, v in src_cfg.items() if k != "torch_dtype"
    }
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    assert set(st_dtypes(out / "model.safetensors")) == set(st_dtypes(tiny_llama / "model.safetensors"))


def test_base_precision_is_kept(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama", dtype="bfloat16")
    ad = make_adapter(base, tmp_path / "ad")
    res = fuse(str(base), ad, tmp_path / "fused", log=lambda m: None)
    assert res.dtype == "bfloat16"
    assert set(st_dtypes(res.out_dir / "model.safetensors").values()) == {"BF16"}
    assert json.loads((res.out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert res.verify.comparisons[0].kind == "bf16" and res.verify.ok
    # an explicit dtype overrides
    res32 = fuse(str(base), ad, tmp_path / "f32", dtype="float32", log=lambda m: None)
    assert set(st_dtypes(res32.out_dir / "model.safetensors").values()) == {"F32"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_reloads_with_the_same_logits(tmp_path, tiny_models, arch):
    # the tiny MoE routers have 4 outputs, which bounds the rank of a LoRA on them
    ad = make_adapter(tiny_models[arch], tmp_path / "ad", r=4 if arch in MOE_ARCHITECTURES else 8)
    res = fuse(str(tiny_models[arch]), ad, tmp_path / "fused", log=lambda m: None)
    assert max_rel(adapter_logits(tiny_models[arch], ad), folder_logits(res.out_dir)) < 1e-5


# ---------------------------------------------------------------------------------------------
# quantized bases


def test_quantized_base_fuses_into_dequantized_weights(tmp_path, tiny_llama):
    qbase = quantized_copy(tiny_llama, tmp_path / "q4", bits=4)
    ad = make_adapter(qbase, tmp_path / "ad")
    res = fuse(str(qbase), ad, tmp_path / "fused", log=lambda m: None)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    dtypes = st_dtypes(res.out_dir / "model.safetensors")
    assert set(dtypes.values()) == {"F16"}  # the scales' precision
    assert not any(k.endswith((".scales", ".biases")) for k in dtypes)
    # the QLoRA model (quantized base + adapter) and the fused folder agree up to float16 storage
    assert max_rel(adapter_logits(qbase, ad), folder_logits(res.out_dir)) < 2e-2


def test_requantize_reports_the_error_relative_to_the_delta(tmp_path, tiny_llama):
    qbase = quantized_copy(tiny_llama, tmp_path / "q4", bits=4)
    ad = make_adapter(qbase, tmp_path / "ad", b_std=0.2)
    lines = []
    res = fuse(str(qbase), ad, tmp_path / "fused", quantize=True, log=lines.append)
    rep = res.requant
    assert rep.bits == 4 and rep.group_size == 32 and rep.layers == 14
    assert set(rep.delta_errors) == {p for p in rep.weight_errors}
    # independent check of one layer: ||Q(W') - W'|| / ||W' - W|| from the files
    fused_dense = load_fused(str(qbase), ad)
    path = "model.layers.0.self_attn.q_proj"
    w_new = np.array(dict(tree_flatten(fused_dense.model.parameters()))[path + ".weight"])
    src = load_file(str(qbase / "model.safetensors"))
    w_old = np.array(
        mx.dequantize(
            mx.array(src[path + ".weight"]),
            mx.array(src[path + ".scales"]),
            mx.array(src[path + ".biases"]),
            group_size=32,
            bits=4,
        ).astype(mx.float32)
    )
    q, s, b = mx.quantize(mx.array(w_new), group_size=32, bits=4)
    w_q = np.array(mx.dequantize(q, s, b, group_size=32, bits=4))
    expected = np.linalg.norm(w_q - w_new) / np.linalg.norm(w_new - w_old)
    assert rep.delta_errors[path] == pytest.approx(expected, rel=1e-3)
    assert any("relative to the adapter's change" in line for line in lines)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    model, _, _ = load_model(str(res.out_dir), with_tokenizer=False)  # mlx-lm builds QuantizedLinear layers
    assert isinstance(dict(model.named_modules())[path], nn.QuantizedLinear)


# ---------------------------------------------------------------------------------------------
# bad input


def test_adapter_for_another_model_is_refused_without_output(tmp_path, tiny_models):
    ad = make_adapter(tiny_models["qwen3"], tmp_path / "ad")
    with pytest.raises(AdapterError, match="qwen3"):
        fuse(str(tiny_models["llama"]), ad, tmp_path / "fused", log=lambda m: None)
    assert not (tmp_path / "fused").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".fused")]


def test_adapter_with_wrong_shapes_is_refused(tmp_path, tiny_model_dir):
    ad = make_adapter(tiny_model_dir("llama", hidden_size=32), tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.pop("mlx_lora")  # no model_type to compare: the shape check must catch it
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="shape"):
        fuse(str(tiny_model_dir("llama")), ad, tmp_path / "fused", log=lambda m: None)
    assert not (tmp_path / "fused").exists()


def test_existing_or_unwritable_output_fails_before_any_work(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(OwnershipError, match="'x'"):
        fuse(str(tiny_llama), ad, tmp_path / "taken", log=lambda m: None)
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="not writable"):
        fuse(str(tiny_llama), ad, blocker / "fused", log=lambda m: None)
    assert blocker.read_text() == "not a folder"


def test_verification_failure_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    monkeypatch.setitem(V.THRESHOLDS, "f32", V.Threshold(-1.0, 1.0))  # no result can pass
    with pytest.raises(ExportError, match="verification .* failed"):
        fuse(str(tiny_llama), ad, tmp_path / "fused", log=lambda m: None)
    assert not (tmp_path / "fused").exists()


def test_cli_fuse(tmp_path, tiny_llama):
    from mlx_lora.commands.cli import cli

    ad = make_adapter(tiny_llama, tmp_path / "ad")
    r = CliRunner().invoke(
        cli, ["fuse", "--model", str(tiny_llama), "--adapter", str(ad), "--out", str(tmp_path / "fused")]
    )
    assert r.exit_code == 0, r.output
    assert "verify fused folder [f32]: top-1 agreement 100.0%" in r.output
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    # --model defaults to the adapter's base_model_name_or_path
    r = CliRunner().invoke(cli, ["fuse", "--adapter", str(ad), "--out", str(tmp_path / "fused2"), "--no-verify"])
    assert r.exit_code == 0, r.output
