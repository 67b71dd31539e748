"""GGUF export, checked by reading every file back with ``gguf.GGUFReader``: metadata against the
source ``config.json``, tensor names against llama.cpp's naming (spelled out here per
architecture), shapes, types, and dequantized values against the source weights with the q/k
permutation written out independently in this file.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_fuse import make_adapter, quantized_copy

from mlx_lora.converters import gguf_arch, gguf_vocab
from mlx_lora.converters import verify as V
from mlx_lora.converters.fuse import load_fused
from mlx_lora.converters.gguf_export import EXPORT_TYPES, NUMPY_TYPES, export_gguf, pack_blocks, unpack_mlx
from mlx_lora.plumbing.errors import ExportError
from mlx_lora.plumbing.ownership import OwnershipError
from mlx_lora.testing import ARCHITECTURES

QUIET = {"log": lambda m: None}
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "smollm3": "smollm3",
    "gemma3_text": "gemma3",
    "olmo2": "olmo2",
    "granite": "granite",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",
}
PERMUTED = {"llama", "mistral", "smollm3", "granite", "mixtral"}  # llama.cpp's converter permutes q/k rows
GEMMA_NORMS = {"gemma2", "gemma3_text"}  # RMSNorm scale stored minus one in HF, in full in GGUF

# llama.cpp tensor name -> HF module, per architecture family (from llama.cpp's model loaders)
_ATTN = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
BLOCK_NAMES = {
    "llama": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTN, **_MLP},
    "qwen2": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTN, **_MLP},
    "qwen3": {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        **_ATTN,
        **_MLP,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
    "gemma2": {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        **_ATTN,
        **_MLP,
    },
    "phi3": {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    },
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
BLOCK_NAMES["mistral"] = BLOCK_NAMES["smollm3"] = BLOCK_NAMES["granite"] = BLOCK_NAMES["llama"]
BLOCK_NAMES["gemma3_text"] = {**BLOCK_NAMES["gemma2"], **_QK_NORM}
BLOCK_NAMES["olmo2"] = {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_ATTN,
    **_MLP,
    **_QK_NORM,
}
BLOCK_NAMES["qwen3_moe"] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **_ATTN,
    **_QK_NORM,
    "ffn_gate_inp": "mlp.gate",
}
BLOCK_NAMES["mixtral"] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **_ATTN,
    "ffn_gate_inp": "block_sparse_moe.gate",
}
# MoE: llama.cpp stacks the experts of each projection into one tensor (expert count, out, in)
EXPERT_NAMES = {
    "qwen3_moe": (
        "num_experts",
        {
            "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
            "ffn_up_exps": "mlp.experts.{e}.up_proj",
            "ffn_down_exps": "mlp.experts.{e}.down_proj",
        },
    ),
    "mixtral": (
        "num_local_experts",
        {
            "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
            "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
            "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
        },
    ),
}


def expected_names(arch: str, cfg: dict) -> dict:
    """GGUF tensor name -> HF tensor name for a model with config ``cfg`` (for stacked experts: the
    tuple of per-expert HF names, in expert order)."""
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg["num_hidden_layers"]):
        for g, h in BLOCK_NAMES[arch].items():
            out[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
        if arch in EXPERT_NAMES:
            count, names = EXPERT_NAMES[arch]
            for g, h in names.items():
                out[f"blk.{i}.{g}.weight"] = tuple(
                    f"model.layers.{i}.{h.format(e=e)}.weight" for e in range(cfg[count])
                )
        if arch == "qwen2":
            for g in ("attn_q", "attn_k", "attn_v"):
                out[f"blk.{i}.{g}.bias"] = f"model.layers.{i}.{_ATTN[g]}.bias"
    return out


def llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k layout: within each head, rotary pairs (j, j + hd/2) become rows (2j, 2j+1)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path: Path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return meta, tensors


def values(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(shape)


def source_tensor(weights: dict, hf) -> np.ndarray:
    """The HF tensor ``hf`` of ``weights``, or the stack of a tuple of per-expert tensors."""
    return np.stack([np.asarray(weights[h]) for h in hf]) if isinstance(hf, tuple) else weights[hf]


def hf_expected(arch: str, cfg: dict, hf_name, w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float32)
    if isinstance(hf_name, tuple):  # stacked experts: copied as they are
        return w
    if arch in PERMUTED and (".q_proj." in hf_name or ".k_proj." in hf_name):
        w = llama_cpp_rows(w, cfg["num_attention_heads"] if ".q_proj." in hf_name else cfg["num_key_value_heads"])
    if arch in GEMMA_NORMS and hf_name.endswith("norm.weight"):
        w = w + 1.0  # GGUF stores Gemma's full RMSNorm scale
    return w


# ---------------------------------------------------------------------------------------------
# names, shapes, metadata, values for every architecture


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_names_shapes_metadata_and_values(tmp_path, tiny_models, arch):
    folder = tiny_models[arch]
    cfg = json.loads((folder / "config.json").read_text())
    stats = export_gguf(str(folder), None, tmp_path / "m.gguf", type_name="f32", **QUIET)
    assert stats.verify.ok
    meta, tensors = read(tmp_path / "m.gguf")
    a = GGUF_ARCH[arch]
    assert meta["general.architecture"] == a and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta[f"{a}.block_count"] == cfg["num_hidden_layers"]
    assert meta[f"{a}.context_length"] == cfg["max_position_embeddings"]
    assert meta[f"{a}.embedding_length"] == cfg["hidden_size"]
    assert meta[f"{a}.feed_forward_length"] == cfg["intermediate_size"]
    assert meta[f"{a}.attention.head_count"] == cfg["num_attention_heads"]
    assert meta[f"{a}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert meta[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    if a == "gemma2":  # llama.cpp's converter writes none: llama.cpp's default is Gemma 2's 10000
        assert f"{a}.rope.freq_base" not in meta and cfg["rope_theta"] == 10000.0
    else:
        assert meta[f"{a}.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if "head_dim" in cfg:
        assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == head_dim
    if a == "llama":
        assert meta["llama.rope.dimension_count"] == head_dim and meta["llama.vocab_size"] == cfg["vocab_size"]
    if a == "gemma2":
        assert meta["gemma2.attn_logit_softcapping"] == pytest.approx(cfg["attn_logit_softcapping"])
        assert meta["gemma2.final_logit_softcapping"] == pytest.approx(cfg["final_logit_softcapping"])
        assert meta["gemma2.attention.sliding_window"] == cfg["sliding_window"]
    if a == "phi3":
        assert meta["phi3.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert meta["phi3.rope.scaling.original_context_length"] == cfg["original_max_position_embeddings"]
        assert meta["phi3.attention.sliding_window"] == 0
    if arch == "gemma3_text":
        assert meta["gemma3.rope.freq_base_swa"] == pytest.approx(cfg["rope_local_base_freq"])
        assert meta["gemma3.attention.sliding_window"] == cfg["sliding_window"]
        # llama.cpp assumes 5 local layers to 1 global; any other pattern is spelled out per layer
        assert meta["gemma3.attention.sliding_window_pattern"] == [True, False] and cfg["sliding_window_pattern"] == 2
        assert "gemma3.final_logit_softcapping" not in meta and "gemma3.attn_logit_softcapping" not in meta
    if a in ("smollm3", "granite"):  # llama.cpp's llama-style keys
        assert meta[f"{a}.rope.dimension_count"] == head_dim and meta[f"{a}.vocab_size"] == cfg["vocab_size"]
    if a == "granite":
        for key, hf in (
            ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"),
            ("attention.scale", "attention_multiplier"),
            ("logit_scale", "logits_scaling"),
        ):
            assert meta[f"granite.{key}"] == pytest.approx(cfg[hf], rel=1e-6), key
        assert "granite.attention.key_length" not in meta  # the converter drops head_dim for Granite
    if arch in EXPERT_NAMES:
        count, _ = EXPERT_NAMES[arch]
        assert (meta[f"{a}.expert_count"], meta[f"{a}.expert_used_count"]) == (cfg[count], cfg["num_experts_per_tok"])
    if arch == "qwen3_moe":
        assert meta["qwen3moe.expert_feed_forward_length"] == cfg["moe_intermediate_size"]

    names = expected_names(arch, cfg)
    assert set(tensors) == set(names)
    src = load_file(str(folder / "model.safetensors"))
    for g, h in names.items():
        t = tensors[g]
        want = hf_expected(arch, cfg, h, source_tensor(src, h))
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), g  # ggml lists dimensions innermost first
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(values(t), want, err_msg=g)


def test_adapter_is_fused_into_the_exported_weights(tmp_path, tiny_llama):
    from mlx_lora.converters.fuse import fuse

    ad = make_adapter(tiny_llama, tmp_path / "ad")
    fused = fuse(str(tiny_llama), ad, tmp_path / "fused", **QUIET).out_dir
    export_gguf(str(tiny_llama), ad, tmp_path / "m.gguf", type_name="f32", **QUIET)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    src = load_file(str(fused / "model.safetensors"))
    _, tensors = read(tmp_path / "m.gguf")
    for g, h in expected_names("llama", cfg).items():
        np.testing.assert_array_equal(values(tensors[g]), hf_expected("llama", cfg, h, src[h]), err_msg=g)


# relative Frobenius error bounds: uniform rounding to a step q gives an error of about q / sqrt(12)
ERROR_BOUND = {
    "f32": 0.0,
    "f16": 1e-3,
    "bf16": 6e-3,
    "q8_0": 1e-2,
    "q5_0": 5e-2,
    "q5_1": 5e-2,
    "q4_0": 1e-1,
    "q4_1": 1e-1,
}


@pytest.mark.parametrize("type_name", NUMPY_TYPES)
def test_every_numpy_type(tmp_path, tiny_llama, type_name):
    stats = export_gguf(str(tiny_llama), None, tmp_path / "m.gguf", type_name=type_name, **QUIET)
    assert stats.verify.ok, stats.verify.lines()
    meta, tensors = read(tmp_path / "m.gguf")
    ftype = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16"}.get(type_name, f"MOSTLY_{type_name.upper()}")
    assert meta["general.file_type"] == gguf.LlamaFileType[ftype]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    src = load_file(str(tiny_llama / "model.safetensors"))
    for g, h in expected_names("llama", cfg).items():
        t = tensors[g]
        want = hf_expected("llama", cfg, h, src[h])
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, g  # norms stay F32 for llama.cpp
            np.testing.assert_array_equal(values(t), want)
            continue
        # 4- and 5-bit files keep the output projection at Q8_0, as llama.cpp's quantizer does
        expected = "Q8_0" if type_name.startswith(("q4", "q5")) and g == "output.weight" else type_name.upper()
        assert t.tensor_type == gguf.GGMLQuantizationType[expected], g
        got = values(t)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= ERROR_BOUND[expected.lower()], (g, err)


def test_quantized_export_reports_error_relative_to_the_adapter(tmp_path, tiny_llama):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    lines = []
    stats = export_gguf(str(tiny_llama), ad, tmp_path / "m.gguf", type_name="q4_0", log=lines.append)
    assert len(stats.delta_errors) == 14  # every adapted weight
    assert all(0 < e < 1 for e in stats.delta_errors.values())
    assert any("relative to the adapter's change" in line for line in lines)
    assert any(line.startswith("verify GGUF [q4_0]") for line in lines)


def test_verification_judges_the_typical_position_and_fails_a_wrong_tensor(tiny_llama):
    """A wrong tensor is wrong at nearly every position and fails; rounding amplified at one
    sensitive position (the worst position far above the rest) is reported but passes."""
    from mlx_lora.model.loading import load_model

    model, tok, _ = load_model(str(tiny_llama))
    tokens = V.prompts(tok)
    ref = V.logits(model, tokens)
    broken, _, _ = load_model(str(tiny_llama), with_tokenizer=False)
    o = broken.model.layers[0].self_attn.o_proj
    o.weight = o.weight.T  # a square tensor written in the wrong layout
    c = V.compare_models(ref, broken, tokens, "GGUF", "q8_0")
    assert not c.ok and c.typical_rel_error > 0.2 and c.top1_agreement < 0.5, c.line()

    class OnePositionOff:  # the reference model, but one position's logits moved by 0.5 x spread
        def __call__(self, x):
            y = np.array(model(x))
            if x.shape[1] == len(tokens[0]):
                y[0, 3] += 0.5 * (y[0, 3].max() - y[0, 3].min()) * (np.arange(y.shape[-1]) == 0)
            return mx.array(y)

    c = V.compare_models(ref, OnePositionOff(), tokens, "GGUF", "f16")
    assert c.ok and c.max_rel_error == pytest.approx(0.5, rel=1e-3) and c.typical_rel_error < 1e-6, c.line()
    assert "at the worst" in c.line()


def test_quantized_verification_failure_explains_itself(tmp_path, tiny_llama, monkeypatch):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    monkeypatch.setitem(V.THRESHOLDS, "q4_1", V.Threshold(1e-9, 1.0))
    with pytest.raises(ExportError, match=r"(?s)FAILED.*Try q8_0.*\|\|Q\(W'\)-W'\|\|/\|\|W'-W\|\| here"):
        export_gguf(str(tiny_llama), ad, tmp_path / "m.gguf", type_name="q4_1", **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_bpe_tokenizer_metadata(tmp_path, tiny_llama):
    export_gguf(str(tiny_llama), None, tmp_path / "m.gguf", type_name="f16", **QUIET)
    meta, _ = read(tmp_path / "m.gguf")
    tj = json.loads((tiny_llama / "tokenizer.json").read_text())
    tc = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # ByteLevel with its GPT-2 regex
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 512
    assert [tokens[i] for i in sorted(by_id)] == [by_id[i] for i in sorted(by_id)]
    types = meta["tokenizer.ggml.token_type"]
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3
    assert all(types[i] == gguf.TokenType.NORMAL for i in by_id if i > 2)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert meta["tokenizer.ggml.merges"] == merges
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.padding_token_id"] == 0
    assert "tokenizer.ggml.bos_token_id" not in meta
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tc["chat_template"]


def test_pre_tokenizer_is_the_one_transformers_runs(tmp_path, tiny_models):
    # transformers' Qwen2 tokenizer class installs Qwen2's split regex whatever tokenizer.json says;
    # the GGUF must name what actually runs, and verification compares the encodings.
    stats = export_gguf(str(tiny_models["qwen2"]), None, tmp_path / "q.gguf", type_name="f16", **QUIET)
    meta, _ = read(tmp_path / "q.gguf")
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert any("encodes the 3 check texts exactly" in n for n in stats.verify.notes)


@pytest.mark.parametrize(
    "pre, name",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "smollm",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": gguf_vocab.LLAMA3_REGEX},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            "llama-bpe",
        ),
    ],
)
def test_pre_tokenizer_names(pre, name):
    assert gguf_vocab.detect_pre_tokenizer({"pre_tokenizer": pre}) == name


def test_unknown_pre_tokenizer_asks_for_the_option():
    with pytest.raises(ExportError, match="--pre-tokenizer"):
        gguf_vocab.detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def _spm_folder(tmp_path: Path, vocab_size: int = 400) -> Path:
    spm = pytest.importorskip("sentencepiece")
    from mlx_lora.testing import _corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
        )
    )
    return folder


def test_sentencepiece_vocabulary_has_scores_and_types(tmp_path):
    import sentencepiece

    folder = _spm_folder(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    config = {"vocab_size": 420, "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    vocab = gguf_vocab.read_vocab(folder, config)
    assert vocab.model == "llama" and vocab.pre == "default"
    n = sp.vocab_size()
    assert vocab.tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert vocab.scores[:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert vocab.types[0] == gguf_vocab.UNKNOWN and vocab.types[1] == vocab.types[2] == gguf_vocab.CONTROL
    assert vocab.types[sp.piece_to_id("<0x41>")] == gguf_vocab.BYTE
    assert vocab.tokens[n:] == [f"[PAD{i}]" for i in range(n, 420)]  # embedding rows beyond the tokenizer
    assert set(vocab.types[n:]) == {gguf_vocab.UNUSED}
    assert vocab.special.special_token_ids["bos"] == 1 and vocab.special.special_token_ids["eos"] == 2
    assert vocab.special.add_special_token["bos"] is True
    # written into a GGUF file and rebuilt by the importer's independent tokenizer, it encodes
    # like SentencePiece itself
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(path, "llama")
    gguf_vocab.write_vocab(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta, _ = read(path)
    assert meta["tokenizer.ggml.scores"] == pytest.approx(vocab.scores)
    from mlx_lora.converters.gguf_tokenizer import build_tokenizer

    tok = build_tokenizer(meta, str(path))
    for text in ("The quick brown fox jumps over the lazy dog.", "What is the code word for the red apple?"):
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)


# ---------------------------------------------------------------------------------------------
# quantized sources


def _gguf_values_equal_mlx(path: Path, qfolder: Path, cfg: dict, names: list[str]):
    src = load_file(str(qfolder / "model.safetensors"))
    bits = json.loads((qfolder / "config.json").read_text())["quantization"]["bits"]
    _, tensors = read(path)
    mapping = {h: g for g, h in expected_names("llama", cfg).items()}
    for h in names:
        base = h[: -len(".weight")]
        # the same float16 scales and minimums, evaluated in float32 on both sides
        w = np.array(
            mx.dequantize(
                mx.array(src[h]),
                mx.array(src[base + ".scales"].astype(np.float32)),
                mx.array(src[base + ".biases"].astype(np.float32)),
                group_size=32,
                bits=bits,
            )
        )
        np.testing.assert_allclose(
            values(tensors[mapping[h]]), hf_expected("llama", cfg, h, w), rtol=1e-6, atol=1e-9, err_msg=h
        )


@pytest.mark.parametrize("bits, type_name", [(4, "q4_1"), (5, "q5_1")])
def test_mlx_affine_group32_is_repacked_exactly(tmp_path, tiny_llama, bits, type_name):
    qfolder = quantized_copy(tiny_llama, tmp_path / f"q{bits}", bits=bits)
    stats = export_gguf(str(qfolder), None, tmp_path / "m.gguf", type_name=type_name, **QUIET)
    quantized_weights = [k for k in load_file(str(qfolder / "model.safetensors")) if k.endswith(".scales")]
    assert stats.repacked == len(quantized_weights) == 16  # 14 linear layers, embeddings, lm_head
    assert not stats.requant_errors
    cfg = json.loads((tiny_llama / "config.json").read_text())
    _gguf_values_equal_mlx(
        tmp_path / "m.gguf", qfolder, cfg, [k.replace(".scales", ".weight") for k in quantized_weights]
    )


def test_other_quantization_is_requantized_and_reported(tmp_path, tiny_llama):
    qfolder = quantized_copy(tiny_llama, tmp_path / "q4g64", bits=4, group_size=64)
    lines = []
    stats = export_gguf(str(qfolder), None, tmp_path / "m.gguf", type_name="q4_1", log=lines.append)
    assert stats.repacked == 0 and len(stats.requant_errors) == 16
    assert all(0 < e < 0.2 for e in stats.requant_errors.values())
    assert any("dequantized and re-quantized" in line for line in lines)


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_gguf_import_then_export_is_bit_exact(tmp_path, tiny_llama, type_name):
    from mlx_lora.converters.gguf_import import import_gguf

    export_gguf(str(tiny_llama), None, tmp_path / "a.gguf", type_name=type_name, **QUIET)
    imported = import_gguf(tmp_path / "a.gguf", tmp_path / "imported", keep_quantized=True, dtype="float32")
    stats = export_gguf(str(imported), None, tmp_path / "b.gguf", type_name=type_name, **QUIET)
    assert stats.repacked == 16 and not stats.requant_errors
    _, ta = read(tmp_path / "a.gguf")
    _, tb = read(tmp_path / "b.gguf")
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(tb[name].data), err_msg=name)


def test_block_packing_matches_gguf_dequantization():
    rng = np.random.default_rng(0)
    for kind, bits in (("q4_0", 4), ("q4_1", 4), ("q5_0", 5), ("q5_1", 5), ("q8_0", 8)):
        q = rng.integers(0, 2**bits, size=(3, 64)).astype(np.uint8)
        d = rng.uniform(0.01, 0.1, size=(3, 2)).astype(np.float16).astype(np.float32)
        offset = {"q4_0": -8, "q5_0": -16, "q8_0": -128}.get(kind)
        m = d * offset if offset is not None else rng.normal(size=(3, 2)).astype(np.float16).astype(np.float32)
        want = q.reshape(3, 2, 32) * d[..., None] + m[..., None]
        raw = pack_blocks(q, d, None if offset is not None else m, kind)
        got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()]).reshape(3, 2, 32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=kind)
        packed, _, _ = mx.quantize(mx.random.normal((3, 64)), group_size=32, bits=bits)
        vals = unpack_mlx(np.array(packed), bits)
        assert vals.shape == (3, 64) and vals.max() < 2**bits


# ---------------------------------------------------------------------------------------------
# K-quants and bad input


def test_kquants_without_the_extra_name_it(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(ExportError, match=r"mlx-lora\[llama-cpp\]"):
        export_gguf(str(tiny_llama), None, tmp_path / "m.gguf", type_name="q5_k_m", **QUIET)
    assert os.listdir(tmp_path) == []


def test_unknown_type_and_architecture(tmp_path, tiny_llama):
    with pytest.raises(ExportError, match="unknown GGUF type 'q3_x'.*q8_0"):
        export_gguf(str(tiny_llama), None, tmp_path / "m.gguf", type_name="q3_x", **QUIET)
    fm = load_fused(str(tiny_llama))
    fm.info.model_type = "starcoder2"
    with pytest.raises(ExportError, match="does not support architecture 'starcoder2'"):
        export_gguf(None, None, tmp_path / "m.gguf", type_name="f16", fused=fm, **QUIET)
    assert os.listdir(tmp_path) == []
    assert set(EXPORT_TYPES) >= {
        "f32",
        "f16",
        "bf16",
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q4_k_m",
        "q5_k_m",
        "q6_k",
    }


def test_failed_verification_and_existing_output(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "old.gguf").write_bytes(b"GGUF keep")
    with pytest.raises(OwnershipError, match="already exists"):
        export_gguf(str(tiny_llama), None, tmp_path / "old.gguf", type_name="f16", **QUIET)
    monkeypatch.setitem(V.THRESHOLDS, "f16", V.Threshold(-1.0, 1.0))
    with pytest.raises(ExportError, match="verification"):
        export_gguf(str(tiny_llama), None, tmp_path / "old.gguf", type_name="f16", overwrite=True, **QUIET)
    assert (tmp_path / "old.gguf").read_bytes() == b"GGUF keep"
    assert sorted(os.listdir(tmp_path)) == ["old.gguf"]


def test_permutation_and_rope_factors_follow_their_formulas():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    spec = gguf_arch.arch_spec("llama")
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2}
    name = "model.layers.0.self_attn.q_proj.weight"
    out = gguf_arch.to_gguf(spec, cfg, name, w)
    np.testing.assert_array_equal(out, llama_cpp_rows(w, 4))
    np.testing.assert_array_equal(gguf_arch.from_gguf(spec, cfg, name, out), w)
    cfg = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    f = gguf_arch.llama3_rope_factors(cfg)
    freqs = 500000.0 ** (-np.arange(0, 16, 2) / 16)
    for fi, freq in zip(f, freqs):
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4:
            assert fi == 1.0
        elif wavelen > 8192:
            assert fi == 8.0
        else:
            s = (8192 / wavelen - 1) / 3
            assert fi == pytest.approx(1 / ((1 - s) / 8 + s), rel=1e-6)


def test_cli_export_gguf(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from mlx_lora.commands.cli import cli

    ad = make_adapter(tiny_llama, tmp_path / "ad")
    r = CliRunner().invoke(
        cli,
        [
            "export",
            "gguf",
            "--model",
            str(tiny_llama),
            "--adapter",
            str(ad),
            "--out",
            str(tmp_path / "x.q8_0.gguf"),
            "--type",
            "q8_0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "verify GGUF [q8_0]" in r.output and (tmp_path / "x.q8_0.gguf").is_file()
    # The check line puts each limit next to the statistic it judges: it never reads like a failure that passed.
    check = next(l for l in r.output.splitlines() if l.startswith("verify GGUF [q8_0]"))
    assert re.search(
        r"top-1 agreement [\d.]+% over \d+ positions \(needs >= 80%\), relative logit error "
        r"\S+ at the 90th-percentile position \(needs <= 0\.06\); \S+ at the worst position "
        r"\(shown, not judged\): ok$",
        check,
    ), check
    assert "limits:" not in check
    r = CliRunner().invoke(
        cli, ["export", "gguf", "--model", str(tiny_llama), "--out", str(tmp_path / "y.gguf"), "--type", "q9"]
    )
    assert r.exit_code != 0 and "q9" in r.output


@pytest.mark.slow
def test_smollm2_q4_1_gguf_round_trips_bit_for_bit(tmp_path, smollm2_gguf):
    """The real SmolLM2 Q4_1 file (Q8_0 tied embeddings): imported keeping its blocks and exported
    as q4_1 again, every tensor and every metadata value the importer keeps comes back unchanged."""
    from mlx_lora.converters.gguf_import import import_gguf

    imported = import_gguf(smollm2_gguf, tmp_path / "imported", keep_quantized=True, dtype="float32")
    stats = export_gguf(str(imported), None, tmp_path / "out.gguf", type_name="q4_1", **QUIET)
    assert stats.verify.ok and not stats.requant_errors and stats.repacked == 211
    ma, ta = V.read_gguf(smollm2_gguf)
    mb, tb = V.read_gguf(tmp_path / "out.gguf")
    assert set(ta) == set(tb)
    for name, (type_id, shape, raw) in ta.items():
        assert (type_id, shape) == tb[name][:2] and np.array_equal(raw, tb[name][2]), name
    for key in (
        "llama.block_count",
        "llama.context_length",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert ma[key] == mb[key], key
