"""Tiny random mixture-of-experts models in Hugging Face layout (one matrix per expert, as on the hub).

``make_tiny_moe(family, out_dir)`` writes a ``qwen3_moe`` or ``mixtral`` folder (hidden 64,
2 blocks, 4 experts, 2 routed per token, vocab 512) that mlx-lm (stacking the experts in its
``sanitize``) and ``transformers`` 5 (fusing them into ``gate_up_proj``) both load.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from mlx_lora.io import atomic_dir, atomic_write_json
from mlx_lora.testing import EOS_TOKEN_ID, PAD_TOKEN_ID, make_tokenizer

EXPERTS = 4
TOP_K = 2

_COMMON = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID, "torch_dtype": "float32",
}

CONFIGS = {
    "qwen3_moe": {
        **_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 2, "output_router_logits": False, "router_aux_loss_coef": 0.0,
    },
    "mixtral": {
        **_COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "intermediate_size": 32,
        "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K, "sliding_window": None,
        "output_router_logits": False, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0,
    },
}


def hub_weights(config: dict, seed: int = 0, init_std: float = 0.05) -> dict[str, np.ndarray]:
    """Random float32 weights under the hub's names, shapes taken from the mlx-lm model."""
    from mlx.utils import tree_flatten

    from mlx_lora.converters.moe_layout import unstack_experts
    from mlx_lora.mlx_lm_compat import model_classes

    model_class, args_class = model_classes(config)
    shapes = {k: v.shape for k, v in tree_flatten(model_class(args_class.from_dict(config)).parameters())}
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(init_std)
        out[name] = w + np.float32(1.0) if name.endswith("norm.weight") else w
    return unstack_experts(config["model_type"], out)


ROUTER_KEYS = {"qwen3_moe": ("num_experts", "mlp.gate.weight"),
               "mixtral": ("num_local_experts", "block_sparse_moe.gate.weight")}


def make_tiny_moe(family: str, out_dir, seed: int = 0, router_line: bool = False) -> Path:
    """``router_line``: 5 experts whose router rows are ``c_e * u`` with c = (2, 1, 0, -1, -2) and
    one random u. Every token's logits are then ``c_e * (u . x)``, so its top 2 are experts {0, 1}
    or {3, 4} and expert 2 is never routed to, whatever the input."""
    import mlx.core as mx

    config = dict(CONFIGS[family])
    key, router = ROUTER_KEYS[family]
    if router_line:
        config[key] = 5
    config = dict(sorted(config.items()))
    weights = hub_weights(config, seed)
    if router_line:
        u = np.random.default_rng(seed).standard_normal(config["hidden_size"]).astype(np.float32)
        c = np.array([2, 1, 0, -1, -2], dtype=np.float32)
        for name in weights:
            if name.endswith(router):
                weights[name] = np.outer(c, u)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", {"eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID})
        arrays = {k: mx.array(v) for k, v in sorted(weights.items())}
        mx.save_safetensors(str(tmp / "model.safetensors"), arrays, metadata={"format": "pt"})
        make_tokenizer(tmp, vocab_size=config["vocab_size"])
    return out
