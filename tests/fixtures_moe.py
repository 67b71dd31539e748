"""A tiny mixture-of-experts model with an expert no token can reach, for training tests.

:func:`with_unreachable_expert` copies a tiny MoE folder of :func:`mlx_lora.testing.make_tiny_model`
(``qwen3_moe`` or ``mixtral``, 4 experts, top-2 routing, per-expert hub layout) and adds a fifth
expert (a copy of expert 0) while setting every router to rows ``c_e * u`` with
c = (2, 1, 0, -1, -2) and one random u. Each token's router logits are then ``c_e * (u . x)``, so
its top 2 are experts {0, 1} or {3, 4}: expert 2 is never routed to, whatever the input.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

UNREACHABLE = 2
_EXPERT_COUNT = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts"}
_ROUTER = re.compile(r".*\.layers\.\d+\.(mlp|block_sparse_moe)\.gate\.weight$")
_EXPERT0 = re.compile(r"(.*\.experts\.)0(\..*)$")


def with_unreachable_expert(src, dst, seed: int = 0) -> Path:
    import mlx.core as mx

    dst = Path(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    key = _EXPERT_COUNT[config["model_type"]]
    assert config[key] == 4, config[key]
    config[key] = 5
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weights = dict(mx.load(str(dst / "model.safetensors")))
    u = np.random.default_rng(seed).standard_normal(config["hidden_size"]).astype(np.float32)
    c = np.array([2, 1, 0, -1, -2], dtype=np.float32)
    for name in list(weights):
        if _ROUTER.match(name):
            weights[name] = mx.array(np.outer(c, u))
        elif m := _EXPERT0.match(name):
            weights[f"{m[1]}4{m[2]}"] = weights[name]
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    return dst
