"""Adapter exports: the PEFT folder round-trips into our loader with identical logits; the GGUF
LoRA has llama.cpp's names, orientation, alpha and q/k permutation (checked with GGUFReader and
formulas written here); DoRA is refused with a pointer to fusing.
"""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from test_fuse import adapter_logits, make_adapter
from test_gguf_export import GGUF_ARCH, PERMUTED, llama_cpp_rows

from mlx_lora.converters.adapter_export import PEFT_CONFIG_KEYS, export_gguf_adapter, export_peft
from mlx_lora.plumbing.errors import AdapterError, ExportError
from mlx_lora.testing import ARCHITECTURES, MOE_ARCHITECTURES

QUIET = {"log": lambda m: None}
GGUF_MODULE = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
}  # MoE routers


# ---------------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_peft_export_round_trips_with_identical_logits(tmp_path, tiny_llama, kind):
    ad = make_adapter(tiny_llama, tmp_path / "ad", dora=kind == "dora", rslora=kind == "rslora")
    res = export_peft(ad, tmp_path / "peft", model=str(tiny_llama), verify=True, **QUIET)
    assert res.verify.ok and res.verify.comparisons[0].max_rel_error == 0.0
    ref = adapter_logits(tiny_llama, ad)
    got = adapter_logits(tiny_llama, tmp_path / "peft")
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_peft_config_and_tensor_layout(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad", dora=True, r=4, alpha=12.0)
    export_peft(ad, tmp_path / "peft", base_model="org/tiny-llama", **QUIET)
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(conf) <= set(PEFT_CONFIG_KEYS)  # only keys PEFT's LoraConfig knows
    assert conf["r"] == 4 and conf["lora_alpha"] == 12.0 and conf["use_dora"] is True and conf["use_rslora"] is False
    assert conf["base_model_name_or_path"] == "org/tiny-llama" and conf["peft_type"] == "LORA"
    assert sorted(conf["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(tensors) == 3 * 14
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (4, h)  # [r, in]
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (kv, 4)  # [out, r]
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"].shape == (kv,)
    assert {str(v.dtype) for v in tensors.values()} == {"float32"}


def test_mlx_lm_adapter_is_converted(tmp_path, tiny_llama):
    # an adapter folder as mlx-lm's trainer writes it: adapters.safetensors with lora_a [in, r] and
    # lora_b [r, out] under the module path, scale instead of alpha
    rng = np.random.default_rng(0)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    h = cfg["hidden_size"]
    weights = {}
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.v_proj"):
            out = h if mod.endswith("q_proj") else cfg["num_key_value_heads"] * cfg["head_dim"]
            weights[f"model.layers.{i}.{mod}.lora_a"] = rng.normal(size=(h, 8)).astype(np.float32) * 0.1
            weights[f"model.layers.{i}.{mod}.lora_b"] = rng.normal(size=(8, out)).astype(np.float32) * 0.1
    src = tmp_path / "mlxlm"
    src.mkdir()
    save_file(weights, str(src / "adapters.safetensors"))
    (src / "adapter_config.json").write_text(
        json.dumps(
            {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}
        )
    )
    with pytest.raises(AdapterError, match="--model"):
        export_peft(src, tmp_path / "peft", **QUIET)
    export_peft(src, tmp_path / "peft", model=str(tiny_llama), verify=True, **QUIET)
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16.0  # mlx-lm's scale 2 = alpha / r
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        weights["model.layers.0.self_attn.q_proj.lora_a"].T,
    )


def test_broken_adapter_is_refused(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    t = load_file(str(ad / "adapter_model.safetensors"))
    t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
    save_file(t, str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="up_proj.*lora_A and lora_B"):
        export_peft(ad, tmp_path / "peft", **QUIET)
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------------------------
# GGUF LoRA


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gguf_adapter_layout(tmp_path, tiny_models, arch):
    folder = tiny_models[arch]
    # MoE families: attention and router (LoRA on experts is refused in a GGUF LoRA file: fuse instead)
    moe = arch in MOE_ARCHITECTURES
    ad = make_adapter(
        folder,
        tmp_path / "ad",
        r=4,
        alpha=8.0,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate"] if moe else None,
    )
    export_gguf_adapter(ad, tmp_path / "a.gguf", model=str(folder), **QUIET)
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == GGUF_ARCH[arch]
    assert meta["adapter.lora.alpha"] == 8.0
    cfg = json.loads((folder / "config.json").read_text())
    state = load_file(str(ad / "adapter_model.safetensors"))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(state)
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[len("base_model.model.") : -len(".lora_A.weight")]
        layer, mod = path.split(".", 3)[2], path.split(".", 3)[3]
        base = f"blk.{layer}.{GGUF_MODULE[mod]}.weight"
        ta, tb = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        b = state[key.replace("lora_A", "lora_B")]
        assert [int(d) for d in ta.shape] == [a.shape[1], a.shape[0]]  # ggml ne {in, r}
        assert [int(d) for d in tb.shape] == [b.shape[1], b.shape[0]]  # ggml ne {r, out}
        assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        if arch in PERMUTED and mod in ("self_attn.q_proj", "self_attn.k_proj"):
            b = llama_cpp_rows(b, cfg["num_attention_heads"] if mod.endswith("q_proj") else cfg["num_key_value_heads"])
        np.testing.assert_array_equal(np.asarray(ta.data).reshape(a.shape), a)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(b.shape), b)


def test_gguf_adapter_verifies_and_scales_rslora(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad", rslora=True, r=4, alpha=6.0)
    res = export_gguf_adapter(ad, tmp_path / "a.gguf", model=str(tiny_llama), verify=True, **QUIET)
    assert res.verify.ok and res.verify.comparisons[0].max_rel_error < 1e-5
    meta = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "a.gguf").fields.items()}
    # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) needs alpha * sqrt(r) in the file
    assert meta["adapter.lora.alpha"] == pytest.approx(6.0 * math.sqrt(4))


def test_gguf_adapter_types(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad", r=32)
    res = export_gguf_adapter(ad, tmp_path / "a.gguf", model=str(tiny_llama), type_name="q8_0", verify=True, **QUIET)
    assert res.verify.ok
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert set(kinds.values()) == {"Q8_0"}  # r = 32: lora_b rows are whole Q8_0 blocks too
    with pytest.raises(ExportError, match="unknown GGUF adapter type"):
        export_gguf_adapter(ad, tmp_path / "b.gguf", model=str(tiny_llama), type_name="q4_0", **QUIET)


def test_dora_cannot_be_a_gguf_lora(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad", dora=True)
    with pytest.raises(ExportError, match="DoRA.*[Ff]use it instead.*export gguf"):
        export_gguf_adapter(ad, tmp_path / "a.gguf", model=str(tiny_llama), **QUIET)
    assert not (tmp_path / "a.gguf").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_gguf_adapter_needs_a_known_base(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    conf = json.loads((ad / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = None
    (ad / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(Exception, match="--model"):
        export_gguf_adapter(ad, tmp_path / "a.gguf", **QUIET)


def test_cli_export_adapter(tmp_path, tiny_llama):
    from mlx_lora.commands.cli import cli

    ad = make_adapter(tiny_llama, tmp_path / "ad")
    r = CliRunner().invoke(
        cli, ["export", "adapter", "--adapter", str(ad), "--format", "gguf", "--out", str(tmp_path / "x-lora.gguf")]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        cli,
        [
            "export",
            "adapter",
            "--adapter",
            str(ad),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "x-peft"),
            "--model",
            str(tiny_llama),
            "--verify",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "verify PEFT adapter [f32]: top-1 agreement 100.0%" in r.output
    assert (tmp_path / "x-lora.gguf").is_file() and (tmp_path / "x-peft" / "adapter_model.safetensors").is_file()
