"""Expert weights of mixture-of-experts models: mlx-lm's stacked layout <-> Hugging Face's per-expert one.

mlx-lm keeps the experts of a block as one [experts, out, in] weight per projection
(``model.layers.N.mlp.switch_mlp.gate_proj.weight``); the checkpoints on the Hugging Face hub,
which ``transformers`` (fusing them on load), ``convert_hf_to_gguf.py`` and ``peft`` read, hold one
[out, in] matrix per expert (``model.layers.N.mlp.experts.E.gate_proj.weight``; Mixtral names
them ``block_sparse_moe.experts.E.w1`` / ``w3`` / ``w2`` for gate / up / down). mlx-lm's own
``sanitize`` maps the second to the first; :data:`LAYOUTS` is that map, written once, used to
write fused folders and PEFT adapters in the hub layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class ExpertLayout:
    stacked: str  # mlx-lm's module holding the stacked experts, relative to a block
    per_expert: str  # the hub's module holding expert E (``{e}`` stands for E)
    names: dict  # mlx-lm projection name -> the hub's name
    fused_pairs: tuple = ("gate_proj", "up_proj")  # mlx-lm names transformers 5 fuses into gate_up_proj


_QWEN = ExpertLayout(
    "mlp.switch_mlp", "mlp.experts.{e}", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
)
_MIXTRAL = ExpertLayout(
    "block_sparse_moe.switch_mlp",
    "block_sparse_moe.experts.{e}",
    {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
)

LAYOUTS: dict[str, ExpertLayout] = {
    "qwen3_moe": _QWEN,
    "qwen2_moe": _QWEN,
    "olmoe": _QWEN,
    "mixtral": _MIXTRAL,
    "phimoe": _MIXTRAL,
}
"""Fused folders of these families are written per expert (and reloaded through mlx-lm's
``sanitize`` to verify every fuse)."""

PEFT_FAMILIES = ("qwen3_moe", "mixtral")
"""Families whose per-expert PEFT adapters are checked to load in transformers + peft with our
logits (tests/test_moe_peft_reference.py). Qwen2-MoE's shared expert, for one, has projections named
like the experts', which peft's renaming for transformers 5 would move onto the experts."""

_PATH = re.compile(r"^(?P<block>.*\.layers\.\d+)\.(?P<module>.+)\.(?P<proj>[A-Za-z0-9_]+)$")


def split_expert_path(model_type: str, path: str):
    """(block path, ExpertLayout, mlx-lm projection name) when ``path`` is an expert layer of a
    family in :data:`LAYOUTS` (``model.layers.3.mlp.switch_mlp.down_proj``), else None."""
    layout = LAYOUTS.get(model_type)
    m = _PATH.match(path)
    if layout is None or m is None or m["module"] != layout.stacked or m["proj"] not in layout.names:
        return None
    return m["block"], layout, m["proj"]


def expert_module(model_type: str, path: str, expert: int) -> str:
    """The hub's module path of expert ``expert`` of the mlx-lm expert layer ``path``."""
    block, layout, proj = split_expert_path(model_type, path)
    return f"{block}.{layout.per_expert.format(e=expert)}.{layout.names[proj]}"


def unstack_experts(model_type: str, tensors: dict) -> dict:
    """``tensors`` with every stacked expert weight (or bias) of a family in :data:`LAYOUTS`
    split into the hub's per-expert tensors; other tensors and other families unchanged."""
    out = {}
    for name, a in tensors.items():
        owner, _, leaf = name.rpartition(".")
        split = split_expert_path(model_type, owner) if leaf in ("weight", "bias") else None
        if split is None or a.ndim != (3 if leaf == "weight" else 2):
            out[name] = a
            continue
        for e in range(a.shape[0]):
            out[f"{expert_module(model_type, owner, e)}.{leaf}"] = a[e]
    return out


_LORA_KEY = re.compile(r"^(?P<block>.*\.layers\.\d+)\.(?P<rest>.+)\.(?P<leaf>lora_A\.weight|lora_B\.weight)$")


def stack_expert_state(model_type: str, state: dict) -> dict:
    """PEFT tensors with per-expert adapters under the hub's names (``...mlp.experts.E.gate_proj
    .lora_A.weight`` [r, in], as peft writes them for a transformers 4 model and as our PEFT export
    does) stacked into mlx-lm's expert layers (``...mlp.switch_mlp.gate_proj.lora_A.weight``
    [E, r, in]). Anything else, and experts not numbered 0..E-1 without a gap, stays as it is."""

    layout = LAYOUTS.get(model_type)
    if layout is None:
        return state
    hub = {v: k for k, v in layout.names.items()}
    pattern = re.compile(re.escape(layout.per_expert).replace(r"\{e\}", r"(?P<e>\d+)") + r"\.(?P<proj>\w+)$")
    groups: dict[tuple, dict[int, object]] = {}
    out = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        found = pattern.fullmatch(m["rest"]) if m else None
        if found is None or found["proj"] not in hub:
            out[key] = value
            continue
        target = (m["block"], hub[found["proj"]], m["leaf"])
        groups.setdefault(target, {})[int(found["e"])] = (key, value)
    for (block, proj, leaf), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            out.update(dict(experts.values()))
            continue
        out[f"{block}.{layout.stacked}.{proj}.{leaf}"] = mx.stack([experts[e][1] for e in sorted(experts)])
    return out
