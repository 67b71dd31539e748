"""Adapter size on a large mixture-of-experts model, without allocating it.

    python bench/moe_adapter_size.py            # Qwen3-30B-A3B at r = 8: default targets vs attention only

Builds the mlx-lm model from Qwen/Qwen3-30B-A3B's config.json values and wraps it with our own
``apply_lora``; MLX arrays are lazy, and ``count_parameters`` reads only shapes, so nothing of the
30B weights is ever computed or stored.
"""

from __future__ import annotations

import argparse

from mlx_lora.config import LoraConfig
from mlx_lora.model.adapters import apply_lora, count_parameters
from mlx_lora.plumbing.mlx_lm_compat import model_classes

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
    "norm_topk_prob": True,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args()
    model_class, args_class = model_classes(QWEN3_30B_A3B)
    for name, targets in (
        ("default (attention + experts)", None),
        ("attention only", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ):
        model = model_class(args_class.from_dict(QWEN3_30B_A3B))
        apply_lora(model, LoraConfig(r=args.r, target_modules=targets))
        trainable, total = count_parameters(model)
        print(
            f"{name}: {trainable / 1e6:.1f}M trainable of {total / 1e9:.2f}B; "
            f"adapter + gradient + AdamW state {trainable * 16 / 1e9:.2f} GB"
        )


if __name__ == "__main__":
    main()
