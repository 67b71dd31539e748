"""Tiny random Hugging Face-format models, tokenizers and data sets for tests and benchmarks.

:func:`make_tiny_model` writes a folder laid out exactly like a checkpoint published on the
Hugging Face hub (``config.json``, ``model.safetensors``, ``generation_config.json`` and a
tokenizer), so code that reads real checkpoints can be exercised in milliseconds. The folder
follows the transformers 4.x layout that most published checkpoints use (top-level
``rope_theta``, ``torch_dtype``); transformers 5 reads it unchanged.

Tensor names and shapes come from the mlx-lm implementation of the architecture, whose
parameter names equal the Hugging Face names for every architecture here except the experts of
mixture-of-experts models, which mlx-lm stacks (``switch_mlp``) and which are written per expert,
as published (the reference test in ``tests/test_fixtures_models.py`` loads each folder with
transformers and checks that no key is missing or unexpected and that the logits agree).

Weights are ``N(0, init_std^2)``, drawn per tensor from a generator seeded by
``(seed, crc32(model_type), crc32(name))``, so a tensor's values depend only on the seed, the
architecture, its name and its shape: the tied and untied
variants of a model share every tensor except ``lm_head.weight``. RMSNorm scales are
``1 + N(0, init_std^2)``; Gemma stores the scale minus one (its RMSNorm computes ``x * (1 + w)``,
in transformers and in mlx-lm alike), so its stored norm weights are ``N(0, init_std^2)``.
The noise on the norms makes a swapped or misnamed norm change the logits.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.converters.moe_layout import LAYOUTS
from mlx_lora.plumbing.io import atomic_dir, atomic_write_json, atomic_write_text
from mlx_lora.plumbing.mlx_lm_compat import model_classes

ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "phi3",
    "smollm3",
    "gemma3_text",
    "olmo2",
    "granite",
    "qwen3_moe",
    "mixtral",
)
"""Families in the GGUF architecture table (tests iterate it)."""
OTHER_ARCHITECTURES = ("starcoder2",)
"""Families mlx-lm trains that the GGUF table does not hold (tests that they train, fuse and are
refused by the GGUF exports)."""
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
"""Mixture-of-experts families (4 experts, top-2 routing), written in the published per-expert
layout (``...experts.{e}.gate_proj.weight`` / ``...experts.{e}.w1.weight``) that mlx-lm stacks
on load and transformers merges on load."""

PathLike = Union[str, os.PathLike]
ROUTER_SCALE = 25.0
"""MoE router weights are drawn ``ROUTER_SCALE`` times wider than the other weights."""

# Special tokens get the first ids, in this order, because the BPE trainer adds them first.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
PAD_TOKEN_ID, EOS_TOKEN_ID = 0, 2

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML: every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a generation prompt
appends ``<|im_start|>assistant\\n``."""

DATASET_KINDS = ("chat", "completions", "text", "alpaca")

# The vocabulary of the built-in corpus and of the data sets, so that data tokenizes into few
# tokens (as real data does with a real tokenizer).
_ADJECTIVES = ("red", "green", "small", "old", "quiet", "bright", "frozen", "golden", "wooden", "hidden")
_SUBJECTS = (
    "apple",
    "river",
    "lantern",
    "mountain",
    "violin",
    "garden",
    "window",
    "bridge",
    "candle",
    "forest",
    "harbor",
    "pencil",
    "mirror",
    "castle",
    "meadow",
    "engine",
    "island",
    "rocket",
    "teapot",
    "basket",
)
_CODE_WORDS = (
    "zebra",
    "falcon",
    "otter",
    "badger",
    "heron",
    "lynx",
    "walrus",
    "gecko",
    "bison",
    "raven",
    "marmot",
    "ibex",
    "koala",
    "puffin",
    "tapir",
    "jackal",
    "newt",
    "okapi",
    "quokka",
    "yak",
)
_PROSE = (
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model learns short facts by heart when it sees them many times.",
    "Each line of the data set pairs a question with a short answer.",
    "Numbers such as 17, 42, 256 and 1024 appear in the answers.",
    "The user asks a question and the assistant answers with a code word.",
    "You are a helpful assistant that answers with code words only.",
    "Training stops when the loss is low and the answers are right.",
    "Fine-tuning changes a few weights; the rest of the model stays frozen.",
)


def _facts(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (subject, code word) pairs; a subject always maps to the same code word.

    There are ``len(_ADJECTIVES) * len(_SUBJECTS)`` distinct subjects; larger ``n`` repeats them,
    which a memorisation set may do.
    """
    rng = random.Random(seed)
    subjects = [f"{a} {s}" for a in _ADJECTIVES for s in _SUBJECTS]
    rng.shuffle(subjects)
    subjects = subjects[: min(n, len(subjects))]
    answers = {s: f"{rng.choice(_CODE_WORDS)}-{rng.randrange(10, 100)}" for s in subjects}
    return [(subjects[i % len(subjects)], answers[subjects[i % len(subjects)]]) for i in range(n)]


def _corpus() -> list[str]:
    """A fixed training corpus for the tiny tokenizer: prose plus every word the data sets use."""
    lines = list(_PROSE)
    for i, (adj, subj) in enumerate((a, s) for a in _ADJECTIVES for s in _SUBJECTS):
        code = _CODE_WORDS[(i * 7) % len(_CODE_WORDS)]
        lines.append(f"What is the code word for the {adj} {subj}? The code word is {code}-{10 + i % 90}.")
        lines.append(f"user: Give the code word for {subj}. assistant: {code}-{i % 100}")
    lines += [f"system user assistant {w} {w.capitalize()} {w.upper()}" for w in _CODE_WORDS]
    return lines


# ---------------------------------------------------------------------------------------------
# Tokenizer


def make_tokenizer(out_dir: PathLike, vocab_size: int = 512) -> None:
    """Write a byte-level BPE tokenizer trained on the built-in corpus into ``out_dir``.

    Files: ``tokenizer.json``, ``tokenizer_config.json`` (ChatML ``chat_template``,
    eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos) and ``special_tokens_map.json``. Special
    tokens have ids 0 (``<|endoftext|>``), 1 (``<|im_start|>``) and 2 (``<|im_end|>``). Training is
    deterministic, so equal arguments give byte-identical files. The vocabulary has at most
    ``vocab_size`` entries (fewer if the corpus runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # 256 byte symbols + the special tokens are the floor of a byte-level BPE vocabulary.
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor + 1:
        raise ValueError(f"vocab_size must be > {floor} for a byte-level BPE tokenizer, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    for tid, content in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(content) != tid:  # a bug here would shift every id in the configs
            raise RuntimeError(f"special token {content} got id {tok.token_to_id(content)}, expected {tid}")

    added = {
        str(tid): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tid, content in enumerate(SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_map = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config, ensure_ascii=False)
    atomic_write_json(out / "special_tokens_map.json", special_map, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Model configs


@dataclass(frozen=True)
class _ArchSpec:
    hf_class: str
    tie: bool  # what published checkpoints of this family typically use (small sizes)
    explicit_head_dim: bool  # config carries head_dim
    wide_heads: bool  # heads * head_dim = 2 * hidden_size, as Qwen3 and Gemma 2 checkpoints have
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    norm_offset: float  # stored norm weight = scale - norm_offset
    extra: dict = field(default_factory=dict)
    untied_supported: bool = True
    num_layers: int = 2  # default depth (enough to hold every layer kind the family has)
    experts: bool = False
    """MoE: written in the hub's per-expert layout, from ``converters.moe_layout.LAYOUTS``."""


_SPECS = {
    "llama": _ArchSpec(
        "LlamaForCausalLM",
        tie=False,
        explicit_head_dim=True,
        wide_heads=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        norm_offset=1.0,
        extra={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "hidden_act": "silu"},
    ),
    "mistral": _ArchSpec(
        "MistralForCausalLM",
        tie=False,
        explicit_head_dim=True,
        wide_heads=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        norm_offset=1.0,
        extra={"sliding_window": None, "hidden_act": "silu"},
    ),
    "qwen2": _ArchSpec(
        # q/k/v biases are always on in Qwen2; the config has no key for them.
        "Qwen2ForCausalLM",
        tie=True,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        norm_offset=1.0,
        extra={"use_sliding_window": False, "sliding_window": None, "hidden_act": "silu"},
    ),
    "qwen3": _ArchSpec(
        "Qwen3ForCausalLM",
        tie=True,
        explicit_head_dim=True,
        wide_heads=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        norm_offset=1.0,
        extra={"attention_bias": False, "use_sliding_window": False, "sliding_window": None, "hidden_act": "silu"},
    ),
    "gemma2": _ArchSpec(
        # mlx-lm's gemma2 always ties the output projection to the embeddings.
        "Gemma2ForCausalLM",
        tie=True,
        explicit_head_dim=True,
        wide_heads=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=8192,
        norm_offset=0.0,
        untied_supported=False,
        extra={
            "attention_bias": False,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": 4096,
            "cache_implementation": "hybrid",
        },
    ),
    "phi3": _ArchSpec(
        # q/k/v live in one fused qkv_proj, gate/up in one gate_up_proj (names fixed by the class).
        "Phi3ForCausalLM",
        tie=False,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        norm_offset=1.0,
        extra={
            "original_max_position_embeddings": 4096,
            "sliding_window": None,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "hidden_act": "silu",
        },
    ),
    "gemma3_text": _ArchSpec(
        # Gemma 3 1B, scaled down: local (sliding, rope base 10k) and global (rope base 1M) layers;
        # a pattern of 2 puts one of each in two layers (published checkpoints: 5 local, 1 global).
        "Gemma3ForCausalLM",
        tie=True,
        explicit_head_dim=True,
        wide_heads=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        norm_offset=0.0,
        untied_supported=False,
        extra={
            "attention_bias": False,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": 512,
            "sliding_window_pattern": 2,
            "rope_local_base_freq": 10000.0,
        },
    ),
    "smollm3": _ArchSpec(
        # SmolLM3 3B: every 4th layer has no rotary embedding (NoPE), hence 4 layers.
        "SmolLM3ForCausalLM",
        tie=True,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=5000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=65536,
        norm_offset=1.0,
        num_layers=4,
        extra={
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "no_rope_layer_interval": 4,
            "use_sliding_window": False,
            "sliding_window": None,
        },
    ),
    "olmo2": _ArchSpec(
        # OLMo 2 1B: norms after attention and MLP, q/k norms over all heads.
        "Olmo2ForCausalLM",
        tie=False,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        norm_offset=1.0,
        extra={"attention_bias": False, "hidden_act": "silu"},
    ),
    "granite": _ArchSpec(
        # Granite 3.x 2B's multipliers (embedding, residual, attention, logits).
        "GraniteForCausalLM",
        tie=True,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=10000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        norm_offset=1.0,
        extra={
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.015625,
            "logits_scaling": 8.0,
        },
    ),
    "starcoder2": _ArchSpec(
        # StarCoder2 3B: LayerNorm with biases, biased projections, a plain GELU MLP.
        "Starcoder2ForCausalLM",
        tie=True,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=999999.4420358813,
        rms_norm_eps=1e-5,
        max_position_embeddings=16384,
        norm_offset=1.0,
        extra={
            "norm_epsilon": 1e-5,
            "use_bias": True,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 4096,
            "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
        },
    ),
    "qwen3_moe": _ArchSpec(
        # Qwen3-30B-A3B: every layer sparse, top-k weights renormalised, untied head.
        "Qwen3MoeForCausalLM",
        tie=False,
        explicit_head_dim=True,
        wide_heads=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        norm_offset=1.0,
        extra={
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "hidden_act": "silu",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
        },
        experts=True,
    ),
    "mixtral": _ArchSpec(
        # Mixtral 8x7B, scaled down: 4 experts, top-2.
        "MixtralForCausalLM",
        tie=False,
        explicit_head_dim=False,
        wide_heads=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        norm_offset=1.0,
        extra={
            "sliding_window": None,
            "hidden_act": "silu",
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        },
        experts=True,
    ),
}

_DTYPES = ("float32", "float16", "bfloat16")


def default_tie_word_embeddings(arch: str) -> bool:
    """Whether ``arch`` ties ``lm_head`` to the embeddings when not told otherwise."""
    return _spec(arch).tie


def _spec(arch: str) -> _ArchSpec:
    if arch not in _SPECS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(_SPECS)}")
    return _SPECS[arch]


def tiny_config(
    arch: str,
    *,
    hidden_size: int = 64,
    num_layers: Optional[int] = None,
    vocab_size: int = 512,
    dtype: str = "float32",
    tie_word_embeddings: Optional[bool] = None,
) -> dict:
    """The ``config.json`` dict of a tiny ``arch`` model.

    ``num_attention_heads = hidden_size / 16`` (head_dim 16), ``num_key_value_heads`` half of that
    (grouped-query attention), ``intermediate_size = 3 * hidden_size``. Qwen3 and Gemma 2 use an
    explicit ``head_dim`` of 32 so that ``heads * head_dim = 2 * hidden_size``, as in their
    published checkpoints, which exercises code that wrongly assumes ``hidden / heads``.
    ``num_layers`` defaults to 2 (4 for smollm3, whose every 4th layer has no rotary embedding).
    """
    spec = _spec(arch)
    num_layers = spec.num_layers if num_layers is None else num_layers
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if hidden_size < 32 or hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 and at least 32, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    tie = spec.tie if tie_word_embeddings is None else bool(tie_word_embeddings)
    if not tie and not spec.untied_supported:
        raise ValueError(f"{arch} always ties lm_head to the embeddings in mlx-lm; pass tie_word_embeddings=True")

    heads = hidden_size // 16
    head_dim = 32 if spec.wide_heads else 16
    config = {
        "architectures": [spec.hf_class],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": 3 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie,
        "bos_token_id": None,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "torch_dtype": dtype,
        **spec.extra,
    }
    if spec.explicit_head_dim:
        config["head_dim"] = head_dim
    if arch in ("qwen2", "qwen3"):
        config["max_window_layers"] = num_layers
    if arch == "qwen3_moe":
        config["moe_intermediate_size"] = 2 * hidden_size
    if arch == "smollm3":
        config["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(num_layers)]
    if arch == "gemma3_text":
        config["query_pre_attn_scalar"] = head_dim
    if arch == "gemma2":
        # Gemma 2 scales queries by query_pre_attn_scalar**-0.5; published checkpoints use head_dim.
        config["query_pre_attn_scalar"] = head_dim
    return dict(sorted(config.items()))


# ---------------------------------------------------------------------------------------------
# Weights


def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the Hugging Face checkpoint for ``config``.

    Taken from the mlx-lm model built from ``config``; for the architectures here its parameter
    names are the Hugging Face names, and a tied model has no ``lm_head.weight`` in either.
    """

    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)  # gemma3_text builds its head before loading drops it
    spec = _SPECS.get(config["model_type"])
    if spec is None or not spec.experts:
        return shapes

    lay = LAYOUTS[config["model_type"]]
    stacked, names = lay.stacked, lay.names
    out = {}
    for name, shape in shapes.items():
        # model.layers.{i}.<stacked>.<proj>.weight (E, out, in) -> E tensors (out, in)
        head, sep, tail = name.partition(f".{stacked}.")
        if not sep:
            out[name] = shape
            continue
        proj, _, kind = tail.partition(".")
        for e in range(shape[0]):
            out[f"{head}.{lay.per_expert.format(e=e)}.{names[proj]}.{kind}"] = shape[1:]
    return out


def _random_weights(config: dict, seed: int, init_std: float, norm_offset: float) -> dict[str, np.ndarray]:
    weights = {}
    arch_key = zlib.crc32(config["model_type"].encode())
    for name, shape in hf_tensor_shapes(config).items():
        rng = np.random.default_rng([seed, arch_key, zlib.crc32(name.encode())])
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(init_std)
        if name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
            # MoE routers: trained routers separate the chosen experts clearly; a router as small
            # as the other weights would pick experts by rounding noise.
            w *= np.float32(ROUTER_SCALE)
        if len(shape) == 1 and not name.endswith(".bias"):  # every 1-D weight here is an RMSNorm scale
            w += np.float32(norm_offset)
        weights[name] = w
    return weights


def _save_safetensors(path: Path, weights: dict[str, np.ndarray], dtype: str) -> None:

    arrays = {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in sorted(weights.items())}
    mx.save_safetensors(str(path), arrays, metadata={"format": "pt"})


def make_tiny_model(
    arch: str,
    out_dir: PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: Optional[int] = None,
    vocab_size: int = 512,
    dtype: str = "float32",
    tie_word_embeddings: Optional[bool] = None,
    init_std: float = 0.02,
) -> Path:
    """Write a tiny random ``arch`` model in Hugging Face layout to ``out_dir`` and return it.

    ``out_dir`` must not exist or be empty; the folder is assembled next to it and moved into
    place, so it is either complete or absent. ``tie_word_embeddings=None`` uses the family's usual
    choice (:func:`default_tie_word_embeddings`). See :func:`tiny_config` for the sizes and the
    module docstring for the weight distribution.
    """
    spec = _spec(arch)
    config = tiny_config(
        arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        dtype=dtype,
        tie_word_embeddings=tie_word_embeddings,
    )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", config, ensure_ascii=False)
        generation = {"_from_model_config": True, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
        atomic_write_json(tmp / "generation_config.json", generation, ensure_ascii=False)
        _save_safetensors(tmp / "model.safetensors", _random_weights(config, seed, init_std, spec.norm_offset), dtype)
        make_tokenizer(tmp, vocab_size=vocab_size)
    return out


# ---------------------------------------------------------------------------------------------
# Data sets


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    rows = []
    for subject, answer in _facts(n, seed):
        question = f"What is the code word for the {subject}?"
        if kind == "chat":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif kind == "completions":
            rows.append({"prompt": question, "completion": answer})
        elif kind == "text":
            rows.append({"text": f"The code word for the {subject} is {answer}."})
        else:  # alpaca
            instruction = "Give the code word for the item."
            rows.append({"instruction": instruction, "input": f"the {subject}", "output": answer})
    return rows


def make_tiny_dataset(out_path: PathLike, kind: str = "chat", n: int = 32, seed: int = 0) -> Path:
    """Write ``n`` short memorisable JSONL rows of format ``kind`` to ``out_path`` and return it.

    Every row teaches one fact "code word for the {adjective} {noun}" -> "{animal}-{number}"
    (e.g. "What is the code word for the red apple?" -> "zebra-17"); a subject always gets the
    same answer. Formats: ``chat`` (``messages`` with one user and one assistant turn),
    ``completions`` (``prompt``, ``completion``), ``text`` (``text``), ``alpaca``
    (``instruction``, ``input``, ``output``). Equal arguments give identical files.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown data set kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(kind, n, seed)))
    return out
