"""Applying adapters by target patterns, counting parameters, and the PEFT / mlx-lm adapter files.

Expected layer names and sizes come from each architecture's published ``config.json`` fields
(hidden, intermediate, heads, kv heads, head_dim), not from the model under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlx_lora.config import LoraConfig
from mlx_lora.model.adapters import (
    PEFT_PREFIX,
    adapter_layers,
    apply_lora,
    count_parameters,
    fuse_model,
    load_adapter,
    read_adapter,
    save_adapter,
)
from mlx_lora.model.loading import load_model
from mlx_lora.model.lora import DoRALinear, LoRALinear
from mlx_lora.plumbing.errors import AdapterError
from mlx_lora.testing import ARCHITECTURES, MOE_ARCHITECTURES

DENSE = [a for a in ARCHITECTURES if a not in MOE_ARCHITECTURES]  # expert targets: tested with LoRA on experts

TOKENS = mx.array([[5, 17, 99, 3, 250, 42, 7, 300]])


def load(path: Path):
    model, _, _ = load_model(str(path), with_tokenizer=False)
    return model


def hf_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def expected_linears(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every linear layer in one transformer block, from the HF config."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    layers = {"self_attn.o_proj": (heads * d, h), "mlp.down_proj": (inter, h)}
    if cfg["model_type"] == "phi3":  # fused projections
        layers["self_attn.qkv_proj"] = (h, (heads + 2 * kv) * d)
        layers["mlp.gate_up_proj"] = (h, 2 * inter)
    else:
        layers.update(
            {
                "self_attn.q_proj": (h, heads * d),
                "self_attn.k_proj": (h, kv * d),
                "self_attn.v_proj": (h, kv * d),
                "mlp.gate_proj": (h, inter),
                "mlp.up_proj": (h, inter),
            }
        )
    return layers


def expected_targets(cfg: dict, blocks=None) -> dict[str, tuple[int, int]]:
    blocks = range(cfg["num_hidden_layers"]) if blocks is None else blocks
    return {f"model.layers.{i}.{name}": dims for i in blocks for name, dims in expected_linears(cfg).items()}


def checkpoint_size(path: Path) -> int:
    return sum(a.size for a in load_file(str(path / "model.safetensors")).values())


def randomize_adapters(model, seed: int = 0) -> None:
    """Give every adapter non-zero B (and a non-trivial magnitude) so it changes the output."""
    rng = np.random.default_rng(seed)
    updates = []
    for path, m in adapter_layers(model):
        updates.append((f"{path}.lora_b", mx.array(rng.standard_normal(m.lora_b.shape).astype(np.float32) * 0.5)))
        if isinstance(m, DoRALinear):
            scale = rng.uniform(0.5, 1.5, m.magnitude.shape).astype(np.float32)
            updates.append((f"{path}.magnitude", m.magnitude * mx.array(scale)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama


# ------------------------------------------------------------------------------------------
# which layers get wrapped


@pytest.mark.parametrize("arch", DENSE)
def test_default_targets_every_block_linear_of_each_architecture(tiny_models, arch):
    path = tiny_models[arch]
    cfg = hf_config(path)
    model = load(path)
    before = logits(model)
    wrapped = apply_lora(model, LoraConfig(r=4, alpha=8))
    expected = expected_targets(cfg)
    assert sorted(wrapped) == sorted(expected)
    assert not any("embed" in p or "lm_head" in p for p in wrapped)
    modules = dict(model.named_modules())
    for p, (din, dout) in expected.items():
        layer = modules[p]
        assert isinstance(layer, LoRALinear)
        assert (layer.in_features, layer.out_features) == (din, dout), p
        # qwen2 keeps its q/k/v biases inside the wrapped base layer.
        has_bias = cfg["model_type"] == "qwen2" and p.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
        assert ("bias" in layer.base) == has_bias, p
    # B = 0: the adapted model is the base model until training moves B.
    assert np.array_equal(logits(model), before)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == {f"{p}.{leaf}" for p in expected for leaf in ("lora_a", "lora_b")}


@pytest.mark.parametrize("arch", DENSE)
def test_parameter_counts_follow_the_formula(tiny_models, arch):
    path = tiny_models[arch]
    cfg = hf_config(path)
    model = load(path)
    base_total = checkpoint_size(path)
    assert count_parameters(model) == (base_total, base_total)  # nothing frozen yet
    r = 4
    apply_lora(model, LoraConfig(r=r, alpha=8))
    lora = sum(r * (din + dout) for din, dout in expected_targets(cfg).values())
    assert count_parameters(model) == (lora, base_total + lora)


def test_dora_counts_add_one_magnitude_per_output(llama):
    cfg = hf_config(llama)
    model = load(llama)
    apply_lora(model, LoraConfig(r=2, alpha=4, use_dora=True))
    expected = sum(2 * (din + dout) + dout for din, dout in expected_targets(cfg).values())
    assert count_parameters(model)[0] == expected
    assert all(isinstance(m, DoRALinear) for _, m in adapter_layers(model))


def test_quantized_model_counts_logical_weights_and_wraps_quantized_layers(llama):
    cfg = hf_config(llama)
    model = load(llama)
    nn.quantize(model, group_size=32, bits=4)
    assert count_parameters(model)[1] == checkpoint_size(llama)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    lora = sum(4 * (din + dout) for din, dout in expected_targets(cfg).values())
    assert count_parameters(model) == (lora, checkpoint_size(llama) + lora)
    assert all(isinstance(m.base, nn.QuantizedLinear) for _, m in adapter_layers(model))


@pytest.mark.parametrize(
    "lora, blocks, names",
    [
        (LoraConfig(target_modules=["q_proj", "v_proj"]), [0, 1], ["self_attn.q_proj", "self_attn.v_proj"]),
        (LoraConfig(target_modules=["self_attn.o_proj"]), [0, 1], ["self_attn.o_proj"]),
        (
            LoraConfig(target_modules=[r"re:.*\.layers\.1\.mlp\..*"]),
            [1],
            ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ),
        (LoraConfig(target_modules=[r"re:.*(q|k)_proj"]), [0, 1], ["self_attn.q_proj", "self_attn.k_proj"]),
        (LoraConfig(layers_to_transform=[0]), [0], None),
        (LoraConfig(layers_to_transform=[-1]), [1], None),
        (LoraConfig(layers_to_transform=[-2, 1]), [0, 1], None),
        (LoraConfig(target_modules=["down_proj"], layers_to_transform=[-1]), [1], ["mlp.down_proj"]),
    ],
    ids=[
        "names",
        "dotted-suffix",
        "regex-one-block",
        "regex-alternation",
        "first-block",
        "negative",
        "negative-and-positive",
        "name-and-layer",
    ],
)
def test_target_selection(llama, lora, blocks, names):
    cfg = hf_config(llama)
    model = load(llama)
    wrapped = apply_lora(model, lora)
    expected = [p for p in expected_targets(cfg, blocks) if names is None or p.split(".", 3)[-1] in names]
    assert sorted(wrapped) == sorted(expected)
    assert len(adapter_layers(model)) == len(expected)


def test_target_that_matches_nothing_lists_available_names(llama):
    model = load(llama)
    with pytest.raises(AdapterError) as e:
        apply_lora(model, LoraConfig(target_modules=["query_key_value"]))
    for name in ("q_proj", "down_proj"):
        assert name in str(e.value)


def test_layer_index_out_of_range(llama):
    with pytest.raises(AdapterError, match=r"layers_to_transform.*\[2, -3\]"):
        apply_lora(load(llama), LoraConfig(layers_to_transform=[0, 2, -3]))


# ------------------------------------------------------------------------------------------
# PEFT save / load


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, alpha=8),
        LoraConfig(r=4, alpha=8, use_rslora=True),
        LoraConfig(r=2, alpha=3, use_dora=True, target_modules=["q_proj", "down_proj"]),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_save_then_load_in_fresh_model_gives_identical_logits(llama, tmp_path, lora):
    model = load(llama)
    base = logits(model)
    apply_lora(model, lora)
    randomize_adapters(model)
    adapted = logits(model)
    assert np.abs(adapted - base).max() > 1e-3, "the test adapter must change the output"
    save_adapter(model, tmp_path / "ad", lora, str(llama))
    fresh = load(llama)
    info = load_adapter(fresh, tmp_path / "ad")
    assert np.array_equal(logits(fresh), adapted)
    assert info.source_format == "peft" and info.lora.use_rslora == lora.use_rslora
    assert info.lora.use_dora == lora.use_dora and info.lora.r == lora.r and info.lora.alpha == lora.alpha
    assert sorted(info.targets) == sorted(p for p, _ in adapter_layers(model))


def test_saved_files_use_peft_names_shapes_and_config(llama, tmp_path):
    cfg = hf_config(llama)
    model = load(llama)
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    apply_lora(model, lora)
    out = save_adapter(model, tmp_path / "ad", lora, "some/base-model")
    # PEFT's files, and mlx-lm's weights beside them (tests/test_mlx_lm_compat_config.py)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapters.safetensors",
    ]
    tensors = load_file(str(out / "adapter_model.safetensors"))  # independent reader
    expected = {}
    for path, (din, dout) in expected_targets(cfg, [1]).items():
        if path.endswith(("q_proj", "down_proj")):
            expected[f"base_model.model.{path}.lora_A.weight"] = (4, din)
            expected[f"base_model.model.{path}.lora_B.weight"] = (dout, 4)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert all(v.dtype == np.float32 for v in tensors.values())
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == 4 and conf["lora_alpha"] == 8
    assert sorted(conf["target_modules"]) == ["down_proj", "q_proj"]
    assert conf["layers_to_transform"] == [1]
    assert conf["use_dora"] is False and conf["use_rslora"] is False
    assert conf["base_model_name_or_path"] == "some/base-model"
    # No stray temporary files from the atomic writes.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_dora_saves_magnitude_vector(llama, tmp_path):
    model = load(llama)
    lora = LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["o_proj"])
    apply_lora(model, lora)
    save_adapter(model, tmp_path / "ad", lora, None)
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    h = hf_config(llama)["hidden_size"]
    mags = {k: v.shape for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert mags == {f"{PEFT_PREFIX}model.layers.{i}.self_attn.o_proj.lora_magnitude_vector": (h,) for i in (0, 1)}
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"] is True


def test_saving_without_adapters_is_an_error(llama, tmp_path):
    with pytest.raises(AdapterError, match="no adapter"):
        save_adapter(load(llama), tmp_path / "ad", LoraConfig(), None)


def _problems(message: str) -> list[str]:
    return [line[4:] for line in message.splitlines() if line.startswith("  - ")]


def test_adapter_of_another_size_reports_every_mismatch(tiny_model_dir, tmp_path):
    small = tiny_model_dir("llama", num_layers=1)
    wide = tiny_model_dir("llama", num_layers=1, hidden_size=96)
    model = load(small)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "ad", LoraConfig(r=4, alpha=8), str(small))
    with pytest.raises(AdapterError) as e:
        load_adapter(load(wide), tmp_path / "ad")
    msg = str(e.value)
    assert str(tmp_path / "ad") in msg
    # hidden 64 -> 96 changes both dims of every projection: A and B of all 7 layers mismatch.
    expected = {
        f"{PEFT_PREFIX}model.layers.0.{n}.lora_{ab}.weight" for n in expected_linears(hf_config(small)) for ab in "AB"
    }
    problems = _problems(msg)
    assert "(14 problems)" in msg and len(problems) == 14
    assert {p.split("'")[1] for p in problems} == expected
    assert all("expected by the model" in p for p in problems)


def test_many_mismatches_are_counted_even_when_the_list_is_cut(tiny_model_dir, tmp_path):
    model = load(tiny_model_dir("llama"))
    apply_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "ad", LoraConfig(r=4, alpha=8), None)
    with pytest.raises(AdapterError) as e:
        load_adapter(load(tiny_model_dir("llama", hidden_size=96)), tmp_path / "ad")
    # 2 blocks x 7 layers x (A, B)
    assert "(28 problems)" in str(e.value)
    assert len(_problems(str(e.value))) + 8 == 28 and "and 8 more" in str(e.value)


def test_adapter_for_deeper_model_names_missing_layers(tiny_model_dir, tmp_path):
    model = load(tiny_model_dir("llama"))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "ad", LoraConfig(r=4, alpha=8), None)
    with pytest.raises(AdapterError) as e:
        load_adapter(load(tiny_model_dir("llama", num_layers=1)), tmp_path / "ad")
    problems = _problems(str(e.value))
    assert sorted(problems) == sorted(
        f"'model.layers.1.self_attn.{n}': no such layer in the model" for n in ("q_proj", "v_proj")
    )


@pytest.mark.parametrize("case", ["missing", "no-config", "bad-json", "no-weights"])
def test_unreadable_adapter_folder_names_the_path(llama, tmp_path, case):
    folder = tmp_path / "ad"
    if case != "missing":
        folder.mkdir()
    if case == "bad-json":
        (folder / "adapter_config.json").write_text("{not json")
    if case == "no-weights":
        (folder / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(AdapterError) as e:
        load_adapter(load(llama), folder)
    assert str(folder) in str(e.value)


# ------------------------------------------------------------------------------------------
# fuse


@pytest.mark.parametrize("use_dora", [False, True])
def test_fuse_model_replaces_adapters_with_plain_layers(llama, use_dora):
    model = load(llama)
    lora = LoraConfig(r=4, alpha=8, use_dora=use_dora)
    wrapped = apply_lora(model, lora)
    randomize_adapters(model)
    adapted = logits(model)
    fused = fuse_model(model)
    assert sorted(fused) == sorted(wrapped)
    assert adapter_layers(model) == []
    modules = dict(model.named_modules())
    assert all(type(modules[p]) is nn.Linear for p in fused)
    np.testing.assert_allclose(logits(model), adapted, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# mlx-lm adapter folders


def write_mlx_lm_adapter(
    model_path: Path, out: Path, *, num_layers: int, params: dict, fine_tune_type: str = "lora"
) -> np.ndarray:
    """Train-free mlx-lm adapter written the way ``mlx_lm.lora`` writes one; returns the logits
    of the model it was made on."""
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model = load(model_path)
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    rng = np.random.default_rng(1)
    updates = []
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith(".lora_b"):
            updates.append((name, mx.array(rng.standard_normal(p.shape).astype(np.float32) * 0.5)))
        elif name.endswith(".m"):
            updates.append((name, p * mx.array(rng.uniform(0.5, 1.5, p.shape).astype(np.float32))))
    model.load_weights(updates, strict=False)
    out.mkdir(parents=True)
    args = dict(
        CONFIG_DEFAULTS,
        model=str(model_path),
        train=True,
        fine_tune_type=fine_tune_type,
        num_layers=num_layers,
        lora_parameters=params,
        adapter_path=str(out),
        data="data",
    )
    save_config(args, out / "adapter_config.json")
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    model.eval()
    return logits(model)


@pytest.mark.parametrize(
    "num_layers, params, fine_tune_type",
    [
        (2, {"rank": 4, "scale": 3.0, "dropout": 0.0}, "lora"),
        (1, {"rank": 2, "scale": 10.0, "dropout": 0.1}, "lora"),
        (-1, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}, "lora"),
        (1, {"rank": 4, "scale": 2.0, "dropout": 0.0}, "dora"),
    ],
    ids=["all-blocks", "last-block", "keys", "dora"],
)
def test_mlx_lm_adapter_loads_like_mlx_lm_does(tmp_path, tiny_model_dir, num_layers, params, fine_tune_type):
    from mlx_lm.tuner.utils import load_adapters

    path = tiny_model_dir("qwen2")  # q/k/v biases exercise the bias path
    made_on = write_mlx_lm_adapter(
        path, tmp_path / "ad", num_layers=num_layers, params=params, fine_tune_type=fine_tune_type
    )
    theirs = load(path)
    load_adapters(theirs, str(tmp_path / "ad"))
    theirs.eval()
    reference = logits(theirs)
    np.testing.assert_allclose(reference, made_on, atol=1e-5)
    assert np.abs(reference - logits(load(path))).max() > 1e-3, "the test adapter must change the output"

    ours = load(path)
    info = load_adapter(ours, tmp_path / "ad")
    ours.eval()
    assert info.source_format == "mlx-lm"
    assert info.lora.use_dora == (fine_tune_type == "dora")
    np.testing.assert_allclose(logits(ours), reference, atol=1e-4, rtol=1e-4)
    # mlx-lm's scale multiplies B A directly, so alpha = scale * r.
    assert info.lora.scale == pytest.approx(params["scale"])

    # And it can be re-saved as PEFT and loaded again with the same result.
    save_adapter(ours, tmp_path / "peft", info.lora, str(path))
    again = load(path)
    load_adapter(again, tmp_path / "peft")
    again.eval()
    np.testing.assert_allclose(logits(again), logits(ours), atol=1e-6)


def test_mlx_lm_adapter_needs_the_model_to_be_read(tmp_path, tiny_model_dir):
    write_mlx_lm_adapter(
        tiny_model_dir("llama"), tmp_path / "ad", num_layers=1, params={"rank": 2, "scale": 1.0, "dropout": 0.0}
    )
    with pytest.raises(AdapterError, match="needs the model"):
        read_adapter(tmp_path / "ad")


def test_mlx_lm_full_fine_tune_folder_is_not_an_adapter(llama, tmp_path):
    model = load(llama)
    folder = tmp_path / "full"
    folder.mkdir()
    weights = {k: v for k, v in tree_flatten(model.parameters()) if ".layers.1." in k}
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "full", "num_layers": 1, "lora_parameters": None})
    )
    with pytest.raises(AdapterError, match="full fine-tune"):
        load_adapter(model, folder)


def test_peft_file_without_lora_tensors_is_an_error(llama, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), {})
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(AdapterError, match="no LoRA tensors"):
        load_adapter(load(llama), folder)


def test_adapters_are_not_stacked_on_adapters(llama, tmp_path):
    model = load(llama)
    apply_lora(model, LoraConfig(r=2, alpha=4))
    save_adapter(model, tmp_path / "ad", LoraConfig(r=2, alpha=4), None)
    with pytest.raises(AdapterError, match="already has adapter layers"):
        apply_lora(model, LoraConfig(r=2, alpha=4))
    with pytest.raises(AdapterError, match="already has adapter layers"):
        load_adapter(model, tmp_path / "ad")
    assert not any(p.endswith(".base") for p, _ in adapter_layers(model))
    fuse_model(model)  # after fusing, a new adapter can go on
    assert len(apply_lora(model, LoraConfig(r=2, alpha=4))) == 14
