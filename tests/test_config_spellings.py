"""Every family of the support matrix loads from a ``config.json`` in transformers 4 or 5 spelling,
with the same numbers.

The transformers 5 spelling is written by transformers 5 itself (``AutoConfig.for_model(**v4)
.to_dict()``, the reference implementation of the new names), from each family's tiny folder and
from variants with rope scaling; one Qwen3-MoE config is also spelled out literally, as
transformers 5 saves it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora.converters.config_spellings import normalize
from mlx_lora.converters.gguf_arch import ARCHS
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing.mlx_lm_compat import model_classes

TOKENS = mx.array([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 2, 8]])

# rope scaling as each family's published transformers 4 configs write it
SCALED = {
    "llama": {
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
    },
    "qwen2": {
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        "max_position_embeddings": 131072,
    },
    "phi3": {
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 2.5, 3.0, 4.0]},
        "original_max_position_embeddings": 4096,
        "max_position_embeddings": 131072,
        "partial_rotary_factor": 0.5,
    },
    "gemma3_text": {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "granite": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


def transformers5(config: dict) -> dict:
    """``config`` as transformers 5 writes it."""
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = AutoConfig.for_model(**config).to_dict()
    return json.loads(json.dumps(out))


def _respelled(src: Path, dst: Path, config: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _logits(folder: Path) -> np.ndarray:
    model, _, _ = load_model(str(folder), with_tokenizer=False)
    return np.array(model(TOKENS))


def _args(config: dict):
    _, args_cls = model_classes(config)
    return args_cls.from_dict(config)


def test_transformers_is_5_here():
    import transformers

    assert int(transformers.__version__.split(".")[0]) >= 5, "these tests need transformers 5 to write its spelling"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_family_loads_from_both_spellings_with_equal_logits(tmp_path, tiny_models, arch):
    v4_dir = tiny_models[arch]
    v4 = json.loads((v4_dir / "config.json").read_text())
    v5 = transformers5(v4)
    assert "rope_parameters" in v5 and "rope_theta" not in v5  # it is the new spelling
    v5_dir = _respelled(v4_dir, tmp_path / "v5", v5)
    np.testing.assert_array_equal(_logits(v5_dir), _logits(v4_dir))


@pytest.mark.parametrize("arch", list(SCALED))
def test_rope_scaling_reads_the_same_from_rope_parameters(tmp_path, tiny_models, arch):
    v4 = {**json.loads((tiny_models[arch] / "config.json").read_text()), **SCALED[arch]}
    v5 = transformers5(v4)
    assert v5.get("rope_scaling") is None and "rope_parameters" in v5
    v4_dir = _respelled(tiny_models[arch], tmp_path / "v4", v4)
    v5_dir = _respelled(tiny_models[arch], tmp_path / "v5", v5)
    np.testing.assert_array_equal(_logits(v5_dir), _logits(v4_dir))


def test_qwen3_moe_as_transformers_5_saves_it(tmp_path, tiny_models):
    """The folder that failed with ``ModelArgs.__init__() missing 2 required positional arguments``."""
    src = tiny_models["qwen3_moe"]
    v4 = json.loads((src / "config.json").read_text())
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "num_experts", "torch_dtype")}
    v5.update(
        rope_parameters={"rope_theta": v4["rope_theta"], "rope_type": "default"},
        num_local_experts=v4["num_experts"],
        dtype="float32",
        transformers_version="5.0.0",
    )
    folder = _respelled(src, tmp_path / "v5", v5)
    np.testing.assert_array_equal(_logits(folder), _logits(src))


def test_a_missing_rope_theta_would_change_the_numbers(tmp_path, tiny_models):
    """Why this matters beyond errors: mlx-lm's Llama takes rope_theta 10,000 when it finds none."""
    src = tiny_models["llama"]
    v4 = json.loads((src / "config.json").read_text())
    assert v4["rope_theta"] != 10000
    assert _args(transformers5(v4)).rope_theta == 10000  # what mlx-lm alone would build
    assert _args(normalize(transformers5(v4))).rope_theta == v4["rope_theta"]


@pytest.mark.parametrize(
    "v5,expected",
    [
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, {"rope_theta": 5e5}),
        (
            {"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}},
            {"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 2.0}},
        ),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            {"rope_theta": 1e6, "rope_local_base_freq": 1e4},
        ),
        ({"num_local_experts": 8}, {"num_experts": 8, "num_local_experts": 8}),
        ({"num_experts": 8}, {"num_experts": 8, "num_local_experts": 8}),
        (
            {"text_config": {"rope_parameters": {"rope_theta": 3.0, "rope_type": "default"}, "num_local_experts": 4}},
            {"text_config": {"rope_theta": 3.0, "num_experts": 4}},
        ),
        ({"rope_theta": 7.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}, {"rope_theta": 7.0}),
    ],
)
def test_normalize_adds_the_transformers_4_names(v5, expected):
    out = normalize(v5)
    for k, v in expected.items():
        if isinstance(v, dict) and k == "text_config":
            for kk, vv in v.items():
                assert out[k][kk] == vv
        else:
            assert out[k] == v
    assert all(out[k] == v for k, v in v5.items() if k != "text_config")  # nothing given is changed


def test_convert_reads_a_transformers_5_folder(tmp_path, tiny_models, capsys):
    from cli_harness import run_main

    src = tiny_models["qwen3_moe"]
    v5_dir = _respelled(src, tmp_path / "v5", transformers5(json.loads((src / "config.json").read_text())))
    code, _, err = run_main(capsys, ["convert", str(v5_dir), "--out", str(tmp_path / "mlx")])
    assert code == 0, err
    np.testing.assert_array_equal(_logits(tmp_path / "mlx"), _logits(src))


class _Metadata:
    """A GGUF writer that only records the key-value pairs written to it."""

    def __init__(self):
        self.items = []

    def add_uint32(self, key, value):
        self.items.append((key, value))

    add_float32 = add_string = add_uint32

    def add_array(self, key, value):
        self.items.append((key, list(value)))


@pytest.mark.parametrize("arch,extra", [(a, {}) for a in ARCHS] + list(SCALED.items()))
def test_gguf_export_reads_the_same_hyper_parameters_from_both_spellings(tiny_models, arch, extra):
    from mlx_lora.converters import gguf_arch

    v4 = {**json.loads((tiny_models[arch] / "config.json").read_text()), **extra}
    spec = gguf_arch.arch_spec(arch)
    written = []
    for config in (normalize(v4), normalize(transformers5(v4))):
        w = _Metadata()
        gguf_arch.write_metadata(w, spec, config, 1)
        tensors = {k: v.tolist() for k, v in gguf_arch.extra_tensors(spec, config).items()}
        written.append((w.items, tensors))
    assert written[0] == written[1]
