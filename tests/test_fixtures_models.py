"""The tiny model, tokenizer and data set builders behind every fast test.

Expected tensor names and shapes are written out here from the Hugging Face modeling code of each
family (not read from mlx-lm, which the builder uses); the ``reference`` tests load the folders
with transformers + torch and compare logits with mlx-lm.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora import testing
from mlx_lora.testing import ARCHITECTURES, MOE_ARCHITECTURES, make_tiny_dataset, make_tiny_model, make_tokenizer

REPO = Path(__file__).resolve().parents[1]

# What published small checkpoints of each family do (Llama 3.x 8B, Mistral 7B, Qwen2.5 0.5B,
# Qwen3 0.6B, Gemma 2 2B, Phi-3 mini).
TYPICAL_TIE = {
    "llama": False,
    "mistral": False,
    "qwen2": True,
    "qwen3": True,
    "gemma2": True,
    "phi3": False,
    "smollm3": True,
    "gemma3_text": True,
    "olmo2": False,
    "granite": True,
    "qwen3_moe": False,
    "mixtral": False,
}
FAMILIES = ARCHITECTURES
ALWAYS_TIED = ("gemma2", "gemma3_text")  # mlx-lm ties their heads to the embeddings
# Per-expert HF names of the MoE families: (module, number of experts key, HF name of gate/up/down)
EXPERTS = {
    "qwen3_moe": ("mlp.experts", "num_experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.experts", "num_local_experts", ("w1", "w3", "w2")),
}
# Gemma's RMSNorm multiplies by (1 + w); the others multiply by w.
NORM_SCALE_OFFSET = {"gemma2": 1.0, "gemma3_text": 1.0}
ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight")


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def read_weights(path: Path) -> dict[str, mx.array]:
    return mx.load(str(path / "model.safetensors"))


def expected_hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hugging Face checkpoint, from the transformers modeling code."""
    arch = cfg["model_type"]
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if arch != "olmo2":  # OLMo 2 normalises after attention and MLP only
            shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * d)
        if arch in EXPERTS:
            module, count, (gate, up, down) = EXPERTS[arch]
            n, e_inter = cfg[count], cfg.get("moe_intermediate_size", inter)
            shapes[p + module.rsplit(".", 1)[0] + ".gate.weight"] = (n, h)
            for e in range(n):
                shapes[f"{p}{module}.{e}.{gate}.weight"] = (e_inter, h)
                shapes[f"{p}{module}.{e}.{up}.weight"] = (e_inter, h)
                shapes[f"{p}{module}.{e}.{down}.weight"] = (h, e_inter)
        else:
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
        if arch == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * d, h)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
            continue
        shapes[p + "self_attn.q_proj.weight"] = (heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv * d, h)
        if arch not in EXPERTS:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
        if arch == "qwen2":
            shapes[p + "self_attn.q_proj.bias"] = (heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (kv * d,)
            shapes[p + "self_attn.v_proj.bias"] = (kv * d,)
        if arch in ("qwen3", "qwen3_moe", "gemma3_text"):
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if arch == "olmo2":  # q/k norms over all heads
            shapes[p + "self_attn.q_norm.weight"] = (heads * d,)
            shapes[p + "self_attn.k_norm.weight"] = (kv * d,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        if arch in ("gemma2", "gemma3_text"):
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    return shapes


def stacked_experts(weights: dict, cfg: dict) -> dict:
    """``weights`` with each MoE projection's experts stacked as mlx-lm's ``switch_mlp`` holds them."""
    if cfg["model_type"] not in EXPERTS:
        return weights
    module, count, hf_names = EXPERTS[cfg["model_type"]]
    out = {k: v for k, v in weights.items() if f".{module}." not in k}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.{module.rsplit('.', 1)[0]}"
        for mlx_name, hf in zip(("gate_proj", "up_proj", "down_proj"), hf_names):
            experts = [weights.get(f"{p}.experts.{e}.{hf}.weight") for e in range(cfg[count])]
            out[f"{p}.switch_mlp.{mlx_name}.weight"] = mx.stack(experts)
    return out


def test_moe_families_route_tokens_to_different_experts(tiny_model_dir):
    """Top-2 of 4 experts: the router sends tokens to more than two experts, so every expert matters."""
    for arch in MOE_ARCHITECTURES:
        cfg = read_config(tiny_model_dir(arch))
        module, count, _ = EXPERTS[arch]
        assert (cfg[count], cfg["num_experts_per_tok"]) == (4, 2)
        model = load_mlx(tiny_model_dir(arch))
        h = model.model.embed_tokens(mx.array(token_batch(512, length=24)))
        router = getattr(model.model.layers[0], module.split(".")[0]).gate
        top = np.argsort(-np.array(router(h)), axis=-1)[..., :2]
        assert len(np.unique(top)) == 4, arch


def load_mlx(path: Path):
    from mlx_lm.utils import load_model

    model, _ = load_model(path)  # strict: raises on any missing or extra weight
    return model


def token_batch(vocab: int, length: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(2, length))


# ---------------------------------------------------------------------------------------------
# Models


def test_every_architecture_is_built(tiny_models):
    assert tuple(tiny_models) == ARCHITECTURES
    assert set(MOE_ARCHITECTURES) <= set(ARCHITECTURES)
    for arch, path in tiny_models.items():
        names = {p.name for p in path.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        } == names, arch
        assert read_config(path)["model_type"] == arch


@pytest.mark.parametrize("arch", FAMILIES)
def test_tensor_names_and_shapes_follow_hf_layout(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    cfg = read_config(tiny_models[arch])
    got = {k: tuple(v.shape) for k, v in read_weights(tiny_models[arch]).items()}
    assert got == expected_hf_shapes(cfg)


@pytest.mark.parametrize("arch", FAMILIES)
def test_sizes_are_consistent_and_use_gqa(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    cfg = read_config(tiny_models[arch])
    heads, kv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    # SmolLM3 needs 4 layers: the 4th is its first without rotary embedding
    assert (h, cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 4 if arch == "smollm3" else 2, 512)
    assert kv < heads and heads % kv == 0
    if arch == "smollm3":
        assert cfg["no_rope_layers"] == [1, 1, 1, 0]
    if arch == "gemma3_text":  # one local (sliding) and one global layer, as llama.cpp needs to be told
        assert cfg["sliding_window_pattern"] == 2 and cfg["query_pre_attn_scalar"] == cfg["head_dim"]
        assert cfg["rope_local_base_freq"] != cfg["rope_theta"]
    if arch == "granite":  # multipliers far from 1, so a dropped one changes the logits
        assert cfg["embedding_multiplier"] > 2 and cfg["logits_scaling"] > 2 and cfg["residual_multiplier"] < 0.5
    if "head_dim" in cfg and arch in ("qwen3", "gemma2", "qwen3_moe", "gemma3_text"):
        assert heads * cfg["head_dim"] != h  # these families decouple head_dim from hidden_size
    else:
        assert heads * cfg.get("head_dim", h // heads) == h
    if arch == "gemma2":
        assert cfg["query_pre_attn_scalar"] == cfg["head_dim"]
        assert cfg["attn_logit_softcapping"] == 50.0 and cfg["final_logit_softcapping"] == 30.0
        assert cfg["sliding_window"] >= 4096  # longer than any test sequence: mlx-lm has no window here


@pytest.mark.parametrize("arch", FAMILIES)
def test_loads_strictly_in_mlx_lm_with_the_weights_on_disk(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    path = tiny_models[arch]
    model = load_mlx(path)
    on_disk = stacked_experts(read_weights(path), read_config(path))
    loaded = dict(tree_flatten(model.parameters()))
    assert set(loaded) == set(on_disk)  # sanitize dropped and renamed nothing
    for name, value in on_disk.items():
        assert mx.array_equal(loaded[name], value), name


@pytest.mark.parametrize("arch", FAMILIES)
def test_forward_gives_finite_causal_logits(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    cfg = read_config(tiny_models[arch])
    model = load_mlx(tiny_models[arch])
    tokens = token_batch(cfg["vocab_size"])
    logits = np.array(model(mx.array(tokens)))
    assert logits.shape == (2, tokens.shape[1], cfg["vocab_size"])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(logits[0, 0] - logits[0, 1]).max() > 1e-3  # positions see different inputs
    # Changing the last token must leave every earlier position's logits unchanged.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % cfg["vocab_size"]
    logits2 = np.array(model(mx.array(changed)))
    np.testing.assert_allclose(logits2[:, :-1], logits[:, :-1], rtol=0, atol=1e-6)
    assert np.abs(logits2[:, -1] - logits[:, -1]).max() > 1e-4


@pytest.mark.parametrize("arch", FAMILIES)
def test_config_keys_are_ones_transformers_knows(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    from transformers import AutoConfig

    cfg = read_config(tiny_models[arch])
    known = set(AutoConfig.for_model(arch).to_dict())
    # transformers 4.x wrote these top-level keys, which published checkpoints carry and 5.x reads.
    v4_layout = {"rope_theta", "rope_scaling", "torch_dtype"}
    v4_layout |= {
        "gemma2": {"hidden_act", "cache_implementation"},
        "gemma3_text": {"rope_local_base_freq", "sliding_window_pattern"},
    }.get(arch, set())
    # Qwen3-MoE checkpoints name these as published; transformers maps num_experts and reads head_dim.
    v4_layout |= {"qwen3_moe": {"num_experts", "head_dim"}}.get(arch, set())
    assert set(cfg) - known - v4_layout == set()

    hf = AutoConfig.from_pretrained(tiny_models[arch])
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    if "full_attention" in rope:  # Gemma 3: per layer kind; the global layers carry rope_theta
        assert rope["sliding_attention"]["rope_theta"] == cfg["rope_local_base_freq"]
        rope = rope["full_attention"]
    assert rope["rope_theta"] == cfg["rope_theta"]
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
        "eos_token_id",
        "pad_token_id",
        "vocab_size",
    ):
        assert getattr(hf, key) == cfg[key], key
    if "head_dim" in cfg:
        assert hf.head_dim == cfg["head_dim"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_tie_default_is_typical_for_the_family(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    cfg = read_config(tiny_models[arch])
    assert cfg["tie_word_embeddings"] is TYPICAL_TIE[arch]
    assert testing.default_tie_word_embeddings(arch) is TYPICAL_TIE[arch]
    assert ("lm_head.weight" in read_weights(tiny_models[arch])) is not TYPICAL_TIE[arch]


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ALWAYS_TIED])
def test_other_tie_variant_loads_and_shares_the_other_tensors(tiny_model_dir, arch):
    tiny_models = {arch: tiny_model_dir(arch)}
    flipped = tiny_model_dir(arch, tie_word_embeddings=not TYPICAL_TIE[arch])
    assert read_config(flipped)["tie_word_embeddings"] is not TYPICAL_TIE[arch]
    a, b = read_weights(tiny_models[arch]), read_weights(flipped)
    assert set(a) ^ set(b) == {"lm_head.weight"}
    assert all(mx.array_equal(a[k], b[k]) for k in set(a) & set(b))
    model = load_mlx(flipped)
    tokens = mx.array(token_batch(512))
    hidden = model.model(tokens)
    head = b.get("lm_head.weight", b["model.embed_tokens.weight"])
    scale = read_config(flipped).get("logits_scaling", 1.0)  # Granite divides the logits by it
    np.testing.assert_allclose(np.array(model(tokens)), np.array(hidden @ head.T) / scale, rtol=1e-5, atol=1e-6)


def test_untied_gemma2_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gemma2"):
        make_tiny_model("gemma2", tmp_path / "g", tie_word_embeddings=False)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weights_have_the_stated_distribution(tiny_models, arch):
    """Matrices ~ N(0, 0.02^2); effective RMSNorm scales (w, or 1 + w for Gemma) ~ 1 +- 0.02."""
    weights = {k: np.array(v) for k, v in read_weights(tiny_models[arch]).items()}
    mats = np.concatenate([v.ravel() for k, v in weights.items() if v.ndim == 2 and not k.endswith(ROUTERS)])
    assert abs(mats.mean()) < 1e-3 and 0.0195 < mats.std() < 0.0205
    routers = [v for k, v in weights.items() if k.endswith(ROUTERS)]
    assert bool(routers) == (arch in MOE_ARCHITECTURES)
    if routers:  # drawn ROUTER_SCALE times wider
        assert (
            0.8 * testing.ROUTER_SCALE * 0.02
            < np.concatenate([r.ravel() for r in routers]).std()
            < 1.2 * testing.ROUTER_SCALE * 0.02
        )
    norms = [k for k, v in weights.items() if v.ndim == 1 and k.endswith("norm.weight")]
    assert norms
    scale = np.concatenate([weights[k] for k in norms]) + NORM_SCALE_OFFSET.get(arch, 0.0)
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny_model("qwen3", tmp_path / "a", seed=3)
    b = make_tiny_model("qwen3", tmp_path / "b", seed=3)
    c = make_tiny_model("qwen3", tmp_path / "c", seed=4)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_folders_store_and_declare_their_dtype(tmp_path, dtype):
    path = make_tiny_model("llama", tmp_path / dtype, dtype=dtype)
    assert read_config(path)["torch_dtype"] == dtype
    assert {v.dtype for v in read_weights(path).values()} == {getattr(mx, dtype)}
    ref = read_weights(make_tiny_model("llama", tmp_path / "f32"))
    for k, v in read_weights(path).items():  # same draw, rounded
        np.testing.assert_allclose(np.array(v.astype(mx.float32)), np.array(ref[k]), rtol=1e-2, atol=1e-4)
    load_mlx(path)


def test_other_sizes_build_and_load(tmp_path):
    path = make_tiny_model("phi3", tmp_path / "p", hidden_size=128, num_layers=3, vocab_size=1024)
    cfg = read_config(path)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 3, 1024)
    assert {k: tuple(v.shape) for k, v in read_weights(path).items()} == expected_hf_shapes(cfg)
    logits = load_mlx(path)(mx.array(token_batch(1024)))
    assert logits.shape == (2, 12, 1024)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="falcon.*llama"):
        make_tiny_model("falcon", tmp_path / "x")
    with pytest.raises(ValueError, match="hidden_size"):
        make_tiny_model("llama", tmp_path / "x", hidden_size=40)
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model("llama", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model("llama", tmp_path / "x", vocab_size=200)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        make_tiny_model("llama", tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temp folders left behind


def test_existing_empty_folder_is_filled(tmp_path):
    assert make_tiny_model("mistral", tmp_path) == tmp_path
    load_mlx(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer

TEXTS = [
    "What is the code word for the red apple?",
    "  leading spaces, trailing tabs\t\nand new lines\n",
    "Unicode: héllo wörld, 日本語, emoji 🦓-17",
    "specials <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


def chatml(messages, add_generation_prompt=False):
    """ChatML written out from its definition."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_every_folder_has_the_same_tokenizer(tiny_models):
    digests = {hashlib.sha256((p / "tokenizer.json").read_bytes()).hexdigest() for p in tiny_models.values()}
    assert len(digests) == 1


def test_hf_tokenizer_special_tokens_match_the_config(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = read_config(tiny_llama)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", cfg["eos_token_id"])
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", cfg["pad_token_id"])
    assert tok.bos_token is None and cfg["bos_token_id"] is None
    for tid, special in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        assert tok.encode(special, add_special_tokens=True) == [tid]
    assert len(tok) <= cfg["vocab_size"]
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizers_round_trip_text(tiny_llama, text):
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    wrapper = load_tokenizer(tiny_llama)
    assert wrapper.encode(text) == ids
    detok = wrapper.detokenizer
    detok.reset()
    for t in ids:  # the streaming detokenizer mlx-lm picks must agree with a full decode
        detok.add_token(t)
    detok.finalize()
    # mlx-lm's BPE streamer drops one leading space of a stream (generated text starts clean).
    assert detok.text == text.removeprefix(" ")


def test_chat_template_is_chatml_in_both_loaders(tiny_llama):
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    msgs = [
        {"role": "system", "content": "Answer with code words."},
        {"role": "user", "content": "What is the code word for the red apple?"},
        {"role": "assistant", "content": "zebra-17"},
    ]
    for tok in (AutoTokenizer.from_pretrained(tiny_llama), load_tokenizer(tiny_llama)):
        assert tok.apply_chat_template(msgs, tokenize=False) == chatml(msgs)
        prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
        assert prompt == chatml(msgs[:2], add_generation_prompt=True)
        ids = tok.apply_chat_template(msgs, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
        assert ids == tok.encode(chatml(msgs), add_special_tokens=False)
        assert ids.count(1) == 3 and ids.count(2) == 3  # one <|im_start|> and <|im_end|> per turn


def test_tokenizer_is_deterministic_across_processes(tmp_path):
    make_tokenizer(tmp_path / "here")
    code = "import sys; from mlx_lora.testing import make_tokenizer; make_tokenizer(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, cwd=REPO)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name


def test_tokenizer_vocab_follows_vocab_size(tmp_path):
    from tokenizers import Tokenizer

    make_tokenizer(tmp_path / "a", vocab_size=300)
    assert Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json")).get_vocab_size() == 300


# ---------------------------------------------------------------------------------------------
# Data sets

FIELDS = {
    "chat": {"messages"},
    "completions": {"prompt", "completion"},
    "text": {"text"},
    "alpaca": {"instruction", "input", "output"},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fact_of(kind: str, row: dict) -> tuple[str, str]:
    """(subject, answer) of a row, parsed back from its visible text."""
    if kind == "chat":
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        q, a = user["content"], assistant["content"]
    elif kind == "completions":
        q, a = row["prompt"], row["completion"]
    elif kind == "alpaca":
        q, a = row["input"], row["output"]
    else:
        q, _, a = row["text"].rstrip(".").partition(" is ")
    return q.removeprefix("What is the code word for ").removeprefix("The code word for ").rstrip("?"), a


@pytest.mark.parametrize("kind", list(FIELDS))
def test_dataset_rows_are_memorisable_facts(tmp_path, kind):
    path = make_tiny_dataset(tmp_path / f"{kind}.jsonl", kind=kind, n=300, seed=5)
    rows = read_jsonl(path)
    assert len(rows) == 300 and all(set(r) == FIELDS[kind] for r in rows)
    answer_of: dict[str, str] = {}
    for row in rows:
        subject, answer = fact_of(kind, row)
        assert subject.startswith("the ") and answer_of.setdefault(subject, answer) == answer
        word, _, number = answer.partition("-")
        assert word.isalpha() and number.isdigit() and 10 <= int(number) < 100
    assert len(answer_of) == 200  # every distinct subject used once before any repeats


def test_dataset_is_deterministic_and_seeded(tmp_path):
    a = make_tiny_dataset(tmp_path / "a.jsonl", n=16, seed=1).read_bytes()
    b = make_tiny_dataset(tmp_path / "b.jsonl", n=16, seed=1).read_bytes()
    c = make_tiny_dataset(tmp_path / "c.jsonl", n=16, seed=2).read_bytes()
    assert a == b and a != c


def test_dataset_chat_rows_are_short_under_the_tiny_tokenizer(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = read_jsonl(make_tiny_dataset(tmp_path / "d.jsonl", n=32))
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=False)) for r in rows]
    tokens = [len(tok.encode(chatml(r["messages"]))) for r in rows]
    assert max(tokens) <= 40 and max(lengths) < 120


def test_dataset_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sharegpt.*chat"):
        make_tiny_dataset(tmp_path / "x.jsonl", kind="sharegpt")
    with pytest.raises(ValueError, match="n must"):
        make_tiny_dataset(tmp_path / "x.jsonl", n=0)
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Reference: transformers + torch (run by hand: pytest -m reference tests/test_fixtures_models.py)

VARIANTS = [(a, None) for a in FAMILIES] + [(a, not TYPICAL_TIE[a]) for a in FAMILIES if a not in ALWAYS_TIED]


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert {k: list(v) for k, v in info.items() if v} == {}, "missing/unexpected/mismatched keys"
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.reference
@pytest.mark.parametrize("init_std", [0.02, 0.3])
@pytest.mark.parametrize("arch,tie", VARIANTS)
def test_transformers_loads_every_key_and_agrees_with_mlx_lm(tiny_model_dir, arch, tie, init_std):
    path = tiny_model_dir(arch, tie_word_embeddings=tie, init_std=init_std)
    tokens = token_batch(512, length=24)
    ref = hf_logits(path, tokens)
    ours = np.array(load_mlx(path)(mx.array(tokens)))
    assert relative_error(ours, ref) < 1e-4


@pytest.mark.reference
def test_reference_comparison_detects_swapped_norms(tiny_model_dir, tmp_path):
    """At the default init the logit check is sensitive enough to see two norms swapped."""
    import shutil

    from mlx_lm.utils import load_model

    path = tiny_model_dir("llama")
    tokens = token_batch(512, length=24)
    ref = hf_logits(path, tokens)
    weights = read_weights(path)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    weights[a], weights[b] = weights[b], weights[a]
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "pt"})
    model, _ = load_model(broken)
    assert relative_error(np.array(model(mx.array(tokens))), ref) > 1e-3


@pytest.mark.reference
def test_generation_config_reads_in_transformers(tiny_llama):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(tiny_llama)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 0)
