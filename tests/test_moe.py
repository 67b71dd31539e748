"""LoRA on the experts of mixture-of-experts models (mlx-lm's SwitchLinear / QuantizedSwitchLinear):
per-expert math, default targets, refusals, training touches only routed experts, save/load
(PEFT and mlx-lm layouts), fuse (float and quantized base), CPU dequantization."""

from __future__ import annotations

import io
import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures_moe import UNREACHABLE, with_unreachable_expert

import mlx_lora
from mlx_lora.config import LoraConfig, build
from mlx_lora.model.adapters import (
    adapter_layers,
    apply_lora,
    count_parameters,
    load_adapter,
    rank_problem,
    save_adapter,
)
from mlx_lora.model.loading import load_model
from mlx_lora.model.lora import DoRASwitchLinear, LoRASwitchLinear, dense_weight, is_expert_layer
from mlx_lora.plumbing.errors import AdapterError
from mlx_lora.plumbing.mlx_lm_compat import switch_linear_classes
from mlx_lora.testing import MOE_ARCHITECTURES, make_tiny_dataset

SwitchLinear, QuantizedSwitchLinear = switch_linear_classes()
TOKENS = mx.array([[5, 17, 99, 3, 250, 41, 7, 300, 12, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def moe_dirs(tiny_model_dir):
    """qwen3_moe and mixtral: hidden 64, 2 blocks, 4 experts, top-2 (shared: never change them)."""
    return {f: tiny_model_dir(f, init_std=0.05) for f in MOE_ARCHITECTURES}


@pytest.fixture(scope="module")
def moe_q4(moe_dirs, tmp_path_factory):
    from mlx_lm.convert import convert

    out = tmp_path_factory.mktemp("moeq") / "q4"
    convert(str(moe_dirs["qwen3_moe"]), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


def _np(a):
    return np.array(a.astype(mx.float32))


def _randomize(model, seed=3):
    """Non-zero B everywhere, so that every adapter changes the output."""
    rng = np.random.default_rng(seed)
    for _, m in adapter_layers(model):
        m.lora_b = mx.array(rng.standard_normal(m.lora_b.shape).astype(np.float32) * 0.05)
    mx.eval(model.parameters())


# ---------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_lora_is_the_base_at_init_and_adds_each_routed_experts_own_update(quantized):
    E, out_dims, in_dims, r = 4, 48, 64, 4
    mx.random.seed(0)
    base = SwitchLinear(in_dims, out_dims, E, bias=True)
    base.bias = mx.random.normal((E, out_dims)) * 0.1
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    layer = LoRASwitchLinear(base, r=r, alpha=8.0)
    assert layer.lora_a.shape == (E, r, in_dims) and layer.lora_b.shape == (E, out_dims, r)
    x = mx.random.normal((3, 5, 1, 1, in_dims))  # [batch, seq, 1, 1, in] as SwitchGLU calls it
    idx = mx.array(np.random.default_rng(0).integers(0, E, (3, 5, 2)))
    np.testing.assert_array_equal(_np(layer(x, idx)), _np(base(x, idx)))

    layer.lora_b = mx.random.normal((E, out_dims, r)) * 0.1
    w = _np(dense_weight(base))
    bias = _np(base.bias)
    delta = 2.0 * np.einsum("eor,eri->eoi", _np(layer.lora_b), _np(layer.lora_a))
    xs, ids = _np(x)[:, :, 0, 0], np.array(idx)
    want = (np.einsum("bskoi,bsi->bsko", (w + delta)[ids], xs) + bias[ids])[..., None, :]
    np.testing.assert_allclose(_np(layer(x, idx)), want, rtol=1e-4, atol=1e-4)
    fused = layer.fuse()
    assert isinstance(fused, SwitchLinear)
    np.testing.assert_allclose(_np(fused(x, idx)), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Targets


def _adapter_size(config: dict, r: int) -> int:
    """Trainable parameters of the default targets, from the config: r (in + out) per attention
    projection, experts x r (in + out) per expert projection."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    experts = config.get("num_experts") or config["num_local_experts"]
    inner = config.get("moe_intermediate_size") or config["intermediate_size"]
    attention = r * ((h + heads * hd) * 2 + (h + kv * hd) * 2)
    return config["num_hidden_layers"] * (attention + experts * r * (h + inner) * 3)


def test_default_targets_include_every_expert_layer_but_not_the_router(moe_dirs):
    for family, moe in (("qwen3_moe", "mlp"), ("mixtral", "block_sparse_moe")):
        model, _, info = load_model(str(moe_dirs[family]), dtype="float32", with_tokenizer=False)
        paths = set(apply_lora(model, LoraConfig(r=4)))
        experts = {
            f"model.layers.{i}.{moe}.switch_mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")
        }
        assert experts <= paths, family
        assert not any(p.endswith(f"{moe}.gate") for p in paths), family
        trainable, _ = count_parameters(model)
        assert trainable == _adapter_size(info.config, 4), family


def test_a_router_named_in_target_modules_is_adapted(moe_dirs):
    model, _, _ = load_model(str(moe_dirs["qwen3_moe"]), dtype="float32", with_tokenizer=False)
    assert apply_lora(model, LoraConfig(r=4, target_modules=["gate"])) == [f"model.layers.{i}.mlp.gate" for i in (0, 1)]


def test_targets_that_match_nothing_or_cannot_be_wrapped_are_never_silent(moe_dirs):
    path = str(moe_dirs["qwen3_moe"])
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    with pytest.raises(AdapterError, match=r"matched no linear layer or expert layer.*this model has: .*gate_proj"):
        apply_lora(model, LoraConfig(r=4, target_modules=["w1"]))
    # switch_mlp holds the experts but is not a layer itself: named, with what it is
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.mlp\.switch_mlp \(SwitchGLU\)"):
        apply_lora(model, LoraConfig(r=4, target_modules=["switch_mlp"]))
    with pytest.warns(
        UserWarning,
        match=r"model\.layers\.0\.input_layernorm \(RMSNorm\).*'w2' \(no such module\)"
        r".*cannot carry",
    ):
        apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "input_layernorm", "w2"]))
    assert len(adapter_layers(model)) == 2


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_dora_is_the_base_at_init_and_rescales_each_experts_rows(quantized):
    E, out_dims, in_dims, r = 4, 48, 64, 4
    mx.random.seed(1)
    base = SwitchLinear(in_dims, out_dims, E, bias=True)
    base.bias = mx.random.normal((E, out_dims)) * 0.1
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    layer = DoRASwitchLinear(base, r=r, alpha=8.0)
    x = mx.random.normal((3, 5, 1, 1, in_dims))
    idx = mx.array(np.random.default_rng(1).integers(0, E, (3, 5, 2)))
    np.testing.assert_allclose(_np(layer(x, idx)), _np(base(x, idx)), rtol=1e-5, atol=1e-5)

    layer.lora_b = mx.random.normal((E, out_dims, r)) * 0.1
    layer.magnitude = layer.magnitude * (1 + 0.2 * mx.random.uniform(shape=(E, out_dims)))
    merged = _np(dense_weight(base)) + 2.0 * np.einsum("eor,eri->eoi", _np(layer.lora_b), _np(layer.lora_a))
    w = _np(layer.magnitude)[..., None] * merged / np.linalg.norm(merged, axis=-1, keepdims=True)
    ids = np.array(idx)
    want = (np.einsum("bskoi,bsi->bsko", w[ids], _np(x)[:, :, 0, 0]) + _np(base.bias)[ids])[..., None, :]
    np.testing.assert_allclose(_np(layer(x, idx)), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(layer.fuse()(x, idx)), want, rtol=1e-4, atol=1e-4)


def test_dora_wraps_experts_and_round_trips(moe_dirs, tmp_path):
    from mlx_lora.converters.fuse import fuse

    path = str(moe_dirs["qwen3_moe"])
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0, use_dora=True)
    apply_lora(model, cfg)
    assert sum(isinstance(m, DoRASwitchLinear) for _, m in adapter_layers(model)) == 6
    config = json.loads((moe_dirs["qwen3_moe"] / "config.json").read_text())
    h, hd, inner = config["hidden_size"], config["head_dim"], config["moe_intermediate_size"]
    rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hd + h  # q, k, v, o outputs
    rows += config["num_experts"] * (2 * inner + h)  # each expert's gate, up, down outputs
    trainable, total = count_parameters(model)
    assert trainable == _adapter_size(config, 4) + config["num_hidden_layers"] * rows  # + one magnitude per row
    plain, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    assert total == count_parameters(plain)[1] + trainable
    _randomize(model)
    for _, m in adapter_layers(model):
        m.magnitude = m.magnitude * 1.1
    want = _np(model(TOKENS))
    save_adapter(model, tmp_path / "a", cfg, path)
    again, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    load_adapter(again, tmp_path / "a")
    np.testing.assert_allclose(_np(again(TOKENS)), want, rtol=1e-5, atol=1e-5)
    fuse(path, tmp_path / "a", tmp_path / "fused", log=lambda m: None)
    fused, _, _ = load_model(str(tmp_path / "fused"), dtype="float32", with_tokenizer=False)
    np.testing.assert_allclose(_np(fused(TOKENS)), want, rtol=1e-4, atol=1e-4)
    # peft adapts transformers 5's fused experts with LoRA only
    from mlx_lora.converters.adapter_export import export_peft
    from mlx_lora.plumbing.errors import ExportError

    with pytest.raises(ExportError, match=r"DoRA adapter on expert layers.*fuse instead"):
        export_peft(tmp_path / "a", tmp_path / "peft", model=path, log=lambda m: None)
    assert not (tmp_path / "peft").exists()


def test_the_rank_bound_covers_expert_layers():
    experts = SwitchLinear(64, 16, 4, bias=False)  # each expert: 64 in, 16 out
    problem = rank_problem([("model.layers.0.mlp.switch_mlp.down_proj", experts)], 17)
    assert "model.layers.0.mlp.switch_mlp.down_proj" in problem and "at most 16" in problem
    assert rank_problem([("x", experts)], 16) is None
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        LoRASwitchLinear(experts, r=17)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def line_setup(moe_dirs, tmp_path_factory):
    """A qwen3_moe model whose expert 2 no token can reach (see fixtures_moe), 8 chat rows, and a
    config factory for a 3-step run."""
    root = tmp_path_factory.mktemp("line")
    model_dir = with_unreachable_expert(moe_dirs["qwen3_moe"], root / "line")
    data = make_tiny_dataset(root / "chat.jsonl", "chat", n=8, seed=0)

    def cfg(out, dora: bool = False):
        return build(
            extra={
                "model": {"path": str(model_dir)},
                "data": {"path": str(data), "valid_fraction": 0.0},
                "out": str(out),
                "train": {"log_every": 1, "save_every": 2, "eval_every": 1000},
            },
            overrides=[
                "train.iters=3",
                "train.batch_size=4",
                "train.lr=1e-2",
                "lora.r=4",
                f"lora.use_dora={str(dora).lower()}",
            ],
        )

    return model_dir, cfg


@pytest.mark.parametrize("dora", [False, True])
def test_training_moves_routed_experts_only(line_setup, tmp_path, dora):
    model_dir, make_cfg = line_setup
    cfg = make_cfg(tmp_path / "run", dora=dora)
    mlx_lora.train(cfg, progress=False, stream=io.StringIO())
    trained = mx.load(str(tmp_path / "run" / "adapter_model.safetensors"))

    # The initial A of the same run: same seed, same model, same wrapping order.
    mx.random.seed(cfg.train.seed)
    fresh, _, _ = load_model(str(model_dir), dtype="float32", with_tokenizer=False)
    apply_lora(fresh, cfg.lora)
    init = {p: m for p, m in adapter_layers(fresh)}
    expert_keys = [k for k in trained if ".switch_mlp." in k]
    assert len(expert_keys) == 2 * 3 * (3 if dora else 2)  # blocks x projections x (A, B[, magnitude])
    for key in expert_keys:
        path = key[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        t = np.array(trained[key])
        leaf = "lora_a" if ".lora_A." in key else "lora_b" if ".lora_B." in key else "magnitude"
        start = np.array(init[path][leaf])
        assert t.shape[0] == 5
        for e in {0, 1, 2, 3, 4} - {UNREACHABLE}:  # routed: moved
            assert np.abs(t[e] - start[e]).max() > 1e-4, (key, e)
        np.testing.assert_array_equal(t[UNREACHABLE], start[UNREACHABLE], err_msg=f"{key}: never routed to")


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_same_expert_adapters(line_setup, tmp_path):
    _, make_cfg = line_setup
    mlx_lora.train(make_cfg(tmp_path / "full"), progress=False, stream=io.StringIO())
    part = tmp_path / "part"
    r1 = mlx_lora.train(make_cfg(part), progress=False, stream=io.StringIO(), callbacks=[_StopAt(2)])
    assert r1.stopped == "interrupted" and r1.steps == 2
    r2 = mlx_lora.train(build(str(part / "config.yaml")), resume=True, progress=False, stream=io.StringIO())
    assert r2.steps == 3
    a = mx.load(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = mx.load(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".switch_mlp." in k for k in a)
    for k in a:
        np.testing.assert_allclose(_np(b[k]), _np(a[k]), rtol=1e-4, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Save / load


def test_save_and_load_round_trip_expert_adapters(moe_dirs, tmp_path):
    path = str(moe_dirs["mixtral"])
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(model, cfg)
    _randomize(model)
    want = _np(model(TOKENS))
    save_adapter(model, tmp_path / "a", cfg, path)
    saved = mx.load(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.block_sparse_moe.switch_mlp.up_proj"
    assert saved[key + ".lora_A.weight"].shape == (4, 4, 64) and saved[key + ".lora_B.weight"].shape == (4, 192, 4)

    again, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    info = load_adapter(again, tmp_path / "a")
    assert key[len("base_model.model.") :] in info.targets
    np.testing.assert_allclose(_np(again(TOKENS)), want, rtol=1e-5, atol=1e-5)


def test_an_mlx_lm_adapter_on_experts_loads_and_computes_as_mlx_lm(moe_dirs, tmp_path):
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    path = str(moe_dirs["qwen3_moe"])
    ref, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    ref.freeze()
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(ref, 2, params)  # mlx-lm's own expert LoRA (LoRASwitchLinear)
    rng = np.random.default_rng(0)
    for name, a in tree_flatten(ref.trainable_parameters()):
        if name.endswith("lora_b"):
            ref.update(tree_unflatten([(name, mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.05))]))
    folder = tmp_path / "mlxlm"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(ref.trainable_parameters())))
    (folder / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, "model": path})
    )
    assert any(".switch_mlp." in k for k in mx.load(str(folder / "adapters.safetensors")))

    ours, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    load_adapter(ours, folder)
    assert sum(is_expert_layer(m.base) for _, m in adapter_layers(ours)) == 6
    np.testing.assert_allclose(_np(ours(TOKENS)), _np(ref(TOKENS)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Fuse


@pytest.mark.parametrize("base", ["float", "q4"])
def test_fused_folder_computes_as_the_lora_model(moe_dirs, moe_q4, base, tmp_path):
    from mlx_lora.converters.fuse import fuse

    path = str(moe_dirs["qwen3_moe"] if base == "float" else moe_q4)
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(model, cfg)
    _randomize(model)
    want = _np(model(TOKENS))
    save_adapter(model, tmp_path / "a", cfg, path)
    fuse(path, tmp_path / "a", tmp_path / "fused", log=lambda m: None)

    names = (
        json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())["weight_map"]
        if (tmp_path / "fused" / "model.safetensors.index.json").exists()
        else mx.load(str(tmp_path / "fused" / "model.safetensors")).keys()
    )
    # the hub's per-expert layout, as transformers and convert_hf_to_gguf.py read it
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert not any("switch_mlp" in n for n in names)
    fused, _, _ = load_model(str(tmp_path / "fused"), dtype="float32", with_tokenizer=False)
    assert not any(isinstance(m, QuantizedSwitchLinear) for _, m in fused.named_modules())
    np.testing.assert_allclose(_np(fused(TOKENS)), want, rtol=1e-4, atol=1e-4)


def test_fuse_with_quantize_quantizes_the_experts_too(moe_dirs, tmp_path):
    from mlx_lora.converters.fuse import fuse

    path = str(moe_dirs["qwen3_moe"])
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(model, cfg)
    _randomize(model)
    want = _np(model(TOKENS))
    save_adapter(model, tmp_path / "a", cfg, path)
    result = fuse(path, tmp_path / "a", tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, log=lambda m: None)
    assert result.requant is not None and any("switch_mlp" in p for p in result.requant.delta_errors)
    fused, _, _ = load_model(str(tmp_path / "q8"), dtype="float32", with_tokenizer=False)
    assert sum(isinstance(m, QuantizedSwitchLinear) for _, m in fused.named_modules()) == 6
    got = _np(fused(TOKENS))
    base, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    # 8-bit rounding of the weights stays well below the adapter's own effect on the logits
    assert np.abs(got - want).max() < 0.25 * np.abs(_np(base(TOKENS)) - want).max()


# ---------------------------------------------------------------------------------------------
# CPU QLoRA


def test_cpu_dequantization_covers_expert_layers(moe_q4):
    quant, _, _ = load_model(str(moe_q4), with_tokenizer=False)
    assert sum(isinstance(m, QuantizedSwitchLinear) for _, m in quant.named_modules()) == 6
    deq, _, info = load_model(str(moe_q4), with_tokenizer=False, dequantize_on_cpu="true")
    assert info.compute and info.compute.startswith("dequantized")
    kinds = {type(m).__name__ for _, m in deq.named_modules()}
    assert not kinds & {"QuantizedSwitchLinear", "QuantizedLinear", "QuantizedEmbedding"}, kinds
    np.testing.assert_allclose(_np(deq(TOKENS)), _np(quant(TOKENS)), rtol=1e-4, atol=1e-4)
    apply_lora(deq, LoraConfig(r=4))
    assert sum(isinstance(m.base, SwitchLinear) for _, m in adapter_layers(deq)) == 6


# ---------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def expert_adapter(moe_dirs, tmp_path_factory):
    """A qwen3_moe adapter on attention and experts, saved as train saves it, and its model."""
    path = str(moe_dirs["qwen3_moe"])
    model, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.1)
    apply_lora(model, cfg)
    _randomize(model)
    out = tmp_path_factory.mktemp("ad") / "a"
    save_adapter(model, out, cfg, path, extra={"model_type": "qwen3_moe"})
    return out, path


def test_peft_export_writes_one_adapter_per_expert_under_the_hubs_names(expert_adapter, tmp_path):
    from mlx_lora.converters.adapter_export import export_peft

    adapter, path = expert_adapter
    # --verify reads the export back through our loader (stacking the experts again) and compares logits
    result = export_peft(adapter, tmp_path / "peft", model=path, verify=True, log=lambda m: None)
    assert result.verify is not None and "PEFT adapter" in "\n".join(result.verify.lines())
    ours = mx.load(str(adapter / "adapter_model.safetensors"))
    got = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert not any("switch_mlp" in k for k in got)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = f"base_model.model.model.layers.1.mlp.switch_mlp.{proj}"
        for e in range(4):
            one = f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}"
            for leaf in ("lora_A.weight", "lora_B.weight"):
                np.testing.assert_array_equal(_np(got[f"{one}.{leaf}"]), _np(ours[f"{stacked}.{leaf}"][e]))
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= set(conf["target_modules"])
    assert conf["lora_dropout"] == 0.0  # peft's expert wrapper has no dropout; it plays no part in inference
    assert (conf["r"], conf["lora_alpha"]) == (4, 8.0)

    original, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    load_adapter(original, adapter)
    again, _, _ = load_model(path, dtype="float32", with_tokenizer=False)
    load_adapter(again, tmp_path / "peft")
    assert sum(is_expert_layer(m.base) for _, m in adapter_layers(again)) == 6
    original.eval(), again.eval()  # the adapter was trained with dropout
    np.testing.assert_allclose(_np(again(TOKENS)), _np(original(TOKENS)), rtol=1e-5, atol=1e-5)


def test_expert_adapters_that_cannot_be_exported_are_refused_with_fuse_instead(expert_adapter, tmp_path, capsys):
    from cli_harness import assert_refused

    adapter, path = expert_adapter
    rs = tmp_path / "rs"
    rs.mkdir()
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**conf, "use_rslora": True}))
    (rs / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert_refused(
        capsys,
        ["export", "adapter", "--adapter", str(rs), "--format", "peft", "--out", str(tmp_path / "o1"), "--model", path],
        ["rsLoRA", "expert layers", "fuse instead"],
        [tmp_path],
        code=2,
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**conf, "mlx_lora": {"model_type": "olmoe"}}))
    (other / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert_refused(
        capsys,
        ["export", "adapter", "--adapter", str(other), "--format", "peft", "--out", str(tmp_path / "o3")],
        ["qwen3_moe, mixtral, not 'olmoe'", "fuse instead"],
        [tmp_path],
        code=2,
    )
    assert_refused(
        capsys,
        [
            "export",
            "adapter",
            "--adapter",
            str(adapter),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "o2.gguf"),
            "--model",
            path,
        ],
        ["expert layers", "Fuse it instead"],
        [tmp_path],
        code=2,
    )


# ---------------------------------------------------------------------------------------------
# The expert layout table


_SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
_MOE_KEYS = {
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        head_dim=16,
    ),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=24,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, rope_scaling=None),
}


def test_every_expert_layout_is_what_mlx_lms_sanitize_undoes():
    """For each family of moe_layout.LAYOUTS, the per-expert tensors we write are mapped back by
    mlx-lm's own loading code (``Model.sanitize``) to exactly the stacked weights we started from."""
    from mlx.utils import tree_flatten

    from mlx_lora.converters.moe_layout import LAYOUTS, unstack_experts
    from mlx_lora.plumbing.mlx_lm_compat import model_classes

    assert set(_MOE_KEYS) == set(LAYOUTS)
    for family, keys in _MOE_KEYS.items():
        config = {"model_type": family, **_SMALL, **keys}
        model_class, args_class = model_classes(config)
        model = model_class(args_class.from_dict(config))
        stacked = dict(tree_flatten(model.parameters()))
        hub = unstack_experts(family, stacked)
        assert not any(".switch_mlp." in k for k in hub), family
        assert len(hub) == len(stacked) + sum(a.shape[0] - 1 for k, a in stacked.items() if ".switch_mlp." in k)
        back = model.sanitize(dict(hub))
        assert back.keys() == stacked.keys(), family
        for k, a in stacked.items():
            np.testing.assert_array_equal(np.array(back[k]), np.array(a), err_msg=f"{family}: {k}")
