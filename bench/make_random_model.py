"""A llama-architecture model folder with random weights, for measuring speed and memory at sizes
one has not downloaded:

    python bench/make_random_model.py --like SMOLLM2_FOLDER --shape 1b --out /tmp/llama-1b-random
    python bench/train_vs_mlx_lm.py --model /tmp/llama-1b-random --no-out-of-box

The tokenizer, chat template and vocabulary come from ``--like`` (any HF-layout llama folder, such
as the benchmark's imported SmolLM2); the layer sizes from ``--shape`` and the size flags. Weights
are N(0, 0.02) with unit norms, so losses start near ln(vocab) and say nothing about quality: use
such a model for tokens/s and peak memory only. The folder is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lora.plumbing.io import atomic_dir

# name: (hidden, intermediate, layers, attention heads, key/value heads)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "smollm2-360m": (960, 2560, 32, 15, 5),
    "1b": (2048, 8192, 16, 32, 8),  # Llama-3.2-1B's blocks
    "3b": (3072, 8192, 28, 24, 8),  # Llama-3.2-3B's blocks
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def build_config(
    like: dict, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, dtype: str
) -> dict:
    if hidden % heads or heads % kv_heads:
        raise SystemExit(
            f"error: hidden size {hidden} must split into {heads} heads, and {heads} heads into "
            f"{kv_heads} key/value groups"
        )
    cfg = dict(like)
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        torch_dtype=dtype,
    )
    return cfg


def parameter_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF llama tensor names and shapes for ``cfg``."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def make(like: Path, out: Path, shape: tuple, dtype: str, seed: int, overwrite: bool) -> Path:
    import mlx.core as mx

    like_cfg_path = like / "config.json"
    if not like_cfg_path.is_file():
        raise SystemExit(f"error: {like_cfg_path}: not found (--like must be an HF-layout model folder)")
    like_cfg = json.loads(like_cfg_path.read_text())
    if like_cfg.get("model_type") not in ("llama", "mistral"):
        raise SystemExit(
            f"error: {like_cfg_path}: model_type {like_cfg.get('model_type')!r}; need a llama folder "
            "(its tokenizer is reused)"
        )
    if out.exists() and not overwrite:
        raise SystemExit(f"error: {out} exists (pass --overwrite to replace it)")
    cfg = build_config(like_cfg, *shape, dtype=dtype)
    mx.random.seed(seed)
    mx_dtype = getattr(mx, dtype)
    weights = {}
    for name, s in parameter_shapes(cfg).items():
        if len(s) == 1:
            weights[name] = mx.ones(s, dtype=mx_dtype)
        else:
            weights[name] = (0.02 * mx.random.normal(s)).astype(mx_dtype)
        mx.eval(weights[name])
    n_params = sum(w.size for w in weights.values())
    with atomic_dir(out, overwrite=overwrite) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in TOKENIZER_FILES:
            if (like / f).is_file():
                shutil.copy2(like / f, tmp / f)
    print(
        f"wrote {out}: {n_params / 1e9:.2f}B parameters in {dtype} "
        f"({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']})"
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--like", required=True, help="HF-layout llama folder whose tokenizer and vocabulary to use")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    shape = list(SHAPES[a.shape])
    for i, v in enumerate((a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads)):
        if v is not None:
            shape[i] = v
    make(Path(a.like), Path(a.out), tuple(shape), a.dtype, a.seed, a.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
