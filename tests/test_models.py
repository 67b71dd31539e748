"""Resolving and loading models: every unusable source is a ModelError that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_lora.model.loading import load_model, resolve
from mlx_lora.plumbing.backend import compute_dtype
from mlx_lora.plumbing.errors import ModelError


def copy_model(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def load_error(source) -> str:
    with pytest.raises(ModelError) as e:
        load_model(str(source), with_tokenizer=False)
    return str(e.value)


def test_folder_without_config_json(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    (folder / "config.json").unlink()
    msg = load_error(folder)
    assert str(folder) in msg and "config.json" in msg


def test_file_instead_of_folder(tiny_llama):
    weights = tiny_llama / "model.safetensors"
    msg = load_error(weights)
    assert str(weights) in msg and "is a file" in msg


@pytest.mark.parametrize("relative", [False, True])
def test_path_that_does_not_exist(tmp_path, monkeypatch, relative):
    missing = tmp_path / "no" / "such" / "model"
    if relative:  # "./x" is a path, never a hub repo id
        monkeypatch.chdir(tmp_path)
        source, shown = "./no-such-model", "no-such-model"
    else:
        source, shown = str(missing), str(missing)
    msg = load_error(source)
    assert "does not exist" in msg and shown in msg


def test_folder_without_weights_mentions_bin_files(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    msg = load_error(folder)
    assert str(folder) in msg and "safetensors" in msg and ".bin" in msg


def test_unknown_model_type(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    edit_config(folder, model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    msg = load_error(folder)
    assert str(folder / "config.json") in msg and "frobnicator" in msg and "not supported" in msg


def test_missing_model_type(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    edit_config(folder, model_type=None)
    msg = load_error(folder)
    assert str(folder / "config.json") in msg and "model_type" in msg


def test_unreadable_config_json(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    msg = load_error(folder)
    assert str(folder / "config.json") in msg


def test_truncated_weights(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = load_error(folder)
    assert str(folder) in msg and ("truncated" in msg or "cannot read the weights" in msg)


def test_weights_of_another_size(tiny_model_dir, tmp_path):
    """config.json says hidden 96, the weights are hidden 64: a shape error, not a crash later."""
    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    small = json.loads((folder / "config.json").read_text())
    wide = json.loads((tiny_model_dir("llama", hidden_size=96) / "config.json").read_text())
    edit_config(
        folder,
        **{
            k: wide[k]
            for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
            if wide[k] != small[k]
        },
    )
    msg = load_error(folder)
    assert str(folder) in msg and "llama" in msg


def test_missing_gguf_file(tmp_path):
    msg = load_error(tmp_path / "model.Q4_0.gguf")
    assert "GGUF file not found" in msg and str(tmp_path / "model.Q4_0.gguf") in msg


def test_repo_id_in_offline_mode_without_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    # An empty cache, so the answer cannot depend on what this machine downloaded before.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    msg = load_error("mlx-lora-tests/not-a-real-model")
    assert "mlx-lora-tests/not-a-real-model" in msg and "offline" in msg and "HF_HUB_OFFLINE" in msg


def test_resolve_a_local_folder(tiny_llama):
    assert resolve(str(tiny_llama)) == (tiny_llama, "folder")


def test_auto_dtype_is_float32_on_cpu_even_for_half_precision_weights(tiny_model_dir):
    assert compute_dtype("auto") == mx.float32  # this suite runs on the CPU backend
    folder = tiny_model_dir("llama", dtype="float16")
    model, tokenizer, info = load_model(str(folder))
    assert info.dtype == mx.float32
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}
    assert (info.kind, info.model_type, info.quantization, info.local_path) == ("folder", "llama", None, folder)
    assert tokenizer is not None and tokenizer.encode("hello")


def test_explicit_dtype_is_applied_to_float_weights(tiny_llama):
    model, _, info = load_model(str(tiny_llama), dtype="bfloat16", with_tokenizer=False)
    assert info.dtype == mx.bfloat16
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.bfloat16}
