"""Every family of the GGUF table through the whole pipeline, one tiny model each: QLoRA training
(3 steps on a 4-bit base), fuse, GGUF export (verified by reading it back), GGUF LoRA export
(verified) and PEFT export; and a family outside the table: it trains and fuses, and every
GGUF path refuses it in one line before writing anything. Each row of the README's support matrix
is backed here (train, QLoRA, fuse, GGUF LoRA, PEFT) and in tests/test_gguf_import.py (GGUF export
and import of each type, with the same logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_harness import assert_refused
from test_fuse import quantized_copy

import mlx_lora
from mlx_lora.config import build
from mlx_lora.converters import gguf_arch
from mlx_lora.converters.adapter_export import export_gguf_adapter, export_peft
from mlx_lora.converters.fuse import fuse
from mlx_lora.converters.gguf_export import export_gguf
from mlx_lora.testing import ARCHITECTURES, OTHER_ARCHITECTURES, make_tiny_dataset

QUIET = {"log": lambda m: None}
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate"]  # attention and the router


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "chat.jsonl", "chat", n=8)


def train_3_steps(model: Path, data: Path, out: Path, targets=None) -> Path:
    base = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "valid_fraction": 0.0},
        "out": str(out),
        "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000},
    }
    sets = ["train.iters=3", "train.batch_size=2", "lora.r=4", "train.lr=1e-2"]
    if targets:
        sets.append("lora.target_modules=[" + ",".join(targets) + "]")
    result = mlx_lora.train(build(extra=base, overrides=sets), progress=False)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_qlora_train_fuse_and_every_export(tiny_model_dir, chat, tmp_path, arch):
    spec = gguf_arch.ARCHS[arch]
    folder = tiny_model_dir(arch)
    q4 = quantized_copy(folder, tmp_path / "q4", bits=4)
    # MoE: LoRA on attention and router (expert LoRA and its exports are covered where experts are adapted)
    run = train_3_steps(q4, chat, tmp_path / "run", targets=MOE_TARGETS if spec.moe else None)

    # Fusing into the 4-bit base dequantizes the adapted layers; a 4-bit MoE base keeps its experts
    # quantized, which the fused folder cannot hold yet: MoE adapters fuse onto the float base.
    fused = fuse(str(folder if spec.moe else q4), run, tmp_path / "fused", **QUIET)
    assert fused.verify.ok  # the written folder reloads with the in-memory fused model's logits

    # GGUF of the fused model: read back and compared with it (export fails otherwise)
    st = export_gguf(str(fused.out_dir), None, tmp_path / "m.gguf", type_name="q8_0", **QUIET)
    assert st.verify.ok and st.counts["q8_0"] > 0

    # the adapter on its own: GGUF LoRA for the float base (verified), and PEFT
    lora = export_gguf_adapter(run, tmp_path / "lora.gguf", model=str(folder), verify=True, **QUIET)
    assert lora.verify.ok
    export_peft(run, tmp_path / "peft", model=str(folder), **QUIET)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


@pytest.mark.parametrize("arch", OTHER_ARCHITECTURES)
def test_a_family_outside_the_table_trains_fuses_and_gguf_refuses(tiny_model_dir, chat, tmp_path, capsys, arch):
    folder = tiny_model_dir(arch)
    run = train_3_steps(folder, chat, tmp_path / "run")
    fused = fuse(str(folder), run, tmp_path / "fused", **QUIET)
    assert fused.verify.ok
    capsys.readouterr()  # the run's banner
    table = ", ".join(gguf_arch.ARCHS)
    out = tmp_path / "out"
    out.mkdir()
    watched = [tmp_path / "run", tmp_path / "fused", out]
    for argv in (
        ["export", "gguf", "--model", str(folder), "--adapter", str(run), "--out", str(out / "m.gguf")],
        [
            "export",
            "adapter",
            "--adapter",
            str(run),
            "--model",
            str(folder),
            "--format",
            "gguf",
            "--out",
            str(out / "lora.gguf"),
        ],
    ):
        message = assert_refused(capsys, argv, [f"architecture '{arch}'", table], watched, code=2)
        assert "\n" not in message.strip()
    # a GGUF file of an architecture outside the table: convert refuses it the same way
    gguf_file = out.parent / "other.gguf"
    _write_foreign_gguf(gguf_file, arch)
    assert_refused(
        capsys,
        ["convert", str(gguf_file), "--out", str(out / "conv")],
        [f"unsupported architecture '{arch}'", table],
        watched + [gguf_file],
        code=2,
    )


def _write_foreign_gguf(path: Path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Configs that llama.cpp would run differently from the HF model (it hard-codes these layouts):
# refused with one line naming the key, before any file is written.
MISMATCHES = [
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, "no_rope_layers"),
    ("gemma3_text", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar"),
    ("gemma2", {"rope_theta": 20000.0}, "rope_theta"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("olmo2", {"sliding_window": 4096}, "sliding window"),
]


@pytest.mark.parametrize("arch, change, key", MISMATCHES, ids=[f"{a}-{k}" for a, _, k in MISMATCHES])
def test_configs_llama_cpp_would_run_differently_are_refused(tiny_model_dir, tmp_path, capsys, arch, change, key):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir(arch), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(
        capsys,
        ["export", "gguf", "--model", str(src), "--out", str(out / "m.gguf")],
        ["config.json", key, "llama.cpp"],
        [src, out],
        code=2,
    )
