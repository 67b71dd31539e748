"""Reference, against transformers + peft (their own code, torch): a PEFT export of an adapter on
experts loads and gives the logits of our LoRA model, and a fused MoE folder (experts written one
matrix each) loads in transformers with the same logits. Run by hand:
``pytest -m reference tests/test_moe_peft_reference.py``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora.config import LoraConfig
from mlx_lora.model.adapters import adapter_layers, apply_lora, save_adapter
from mlx_lora.model.loading import load_model
from mlx_lora.testing import make_tiny_model

pytestmark = pytest.mark.reference

TOKENS = [[5, 17, 99, 3, 250, 41, 7, 300, 12, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize(
    "family,targets",
    [
        ("qwen3_moe", None),  # the defaults: attention and experts
        ("mixtral", None),
        ("qwen3_moe", ["q_proj", "gate_proj", "down_proj"]),  # up_proj missing: a zero partner is added
        ("qwen3_moe", ["v_proj", "gate", "up_proj"]),  # the router too
        ("mixtral", [r"re:.*layers\.1\..*_proj"]),  # one block, by regex
    ],
)
def test_peft_export_of_expert_adapters_matches_in_transformers(family, targets, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx_lora.converters.adapter_export import export_peft

    path = make_tiny_model(family, tmp_path / family, init_std=0.05)
    model, _, info = load_model(str(path), dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0, target_modules=targets)
    apply_lora(model, cfg)
    rng = np.random.default_rng(0)
    for _, m in adapter_layers(model):
        m.lora_b = mx.array(rng.standard_normal(m.lora_b.shape).astype(np.float32) * 0.05)
    want = np.array(model(mx.array(TOKENS)))
    save_adapter(model, tmp_path / "a", cfg, str(path), extra={"model_type": info.model_type})
    export_peft(tmp_path / "a", tmp_path / "peft", model=str(path), log=lambda m: None)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor(TOKENS)).logits.numpy()
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    tuned.eval()
    with torch.no_grad():
        got = tuned(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(want - plain).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_moe_folder_loads_in_transformers_with_our_logits(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlx_lora.converters.fuse import fuse

    path = make_tiny_model(family, tmp_path / family, init_std=0.05)
    model, _, info = load_model(str(path), dtype="float32", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(model, cfg)
    rng = np.random.default_rng(1)
    for _, m in adapter_layers(model):
        m.lora_b = mx.array(rng.standard_normal(m.lora_b.shape).astype(np.float32) * 0.05)
    want = np.array(model(mx.array(TOKENS)))
    save_adapter(model, tmp_path / "a", cfg, str(path), extra={"model_type": info.model_type})
    fuse(str(path), tmp_path / "a", tmp_path / "fused", log=lambda m: None)

    fused = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused"), dtype=torch.float32)
    with torch.no_grad():
        got = fused(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_mlx_lm_expert_adapter_exports_to_peft_with_mlx_lms_logits(tmp_path):
    """mlx-lm's own LoRA on every layer of its default keys (experts and routers), converted."""
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_lora.converters.adapter_export import export_peft

    path = make_tiny_model("qwen3_moe", tmp_path / "m", init_std=0.05)
    ref, _, _ = load_model(str(path), dtype="float32", with_tokenizer=False)
    ref.freeze()
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(ref, 2, params)
    rng = np.random.default_rng(2)
    for name, a in tree_flatten(ref.trainable_parameters()):
        if name.endswith("lora_b"):
            ref.update(tree_unflatten([(name, mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.05))]))
    want = np.array(ref(mx.array(TOKENS)))
    folder = tmp_path / "mlxlm"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(ref.trainable_parameters())))
    (folder / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, "model": str(path)})
    )
    export_peft(folder, tmp_path / "peft", model=str(path), log=lambda m: None)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    tuned.eval()
    with torch.no_grad():
        got = tuned(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
