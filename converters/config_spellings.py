"""A model's ``config.json`` in transformers 4 or 5 spelling, read the one way mlx-lm's model classes do.

transformers 5 writes some hyper-parameters under new names (its ``configuration_*.py`` and
``modeling_rope_utils.py``):

- ``rope_parameters: {rope_type, rope_theta, <scaling fields>, partial_rotary_factor}`` replaces
  ``rope_theta`` + ``rope_scaling`` (+ ``partial_rotary_factor``); families that alternate
  sliding and full attention (Gemma 3) nest one such dict per layer type,
  ``{full_attention: {...}, sliding_attention: {...}}``, where transformers 4 had ``rope_theta``
  and ``rope_local_base_freq``;
- ``num_local_experts`` for Qwen3-MoE's ``num_experts`` (its ``attribute_map``); Mixtral keeps
  ``num_local_experts``, which mlx-lm reads there;
- multimodal configs nest the text model's keys in ``text_config``.

mlx-lm reads the transformers 4 names, and a missing ``rope_theta`` silently takes a default
(10,000 for Llama, where Llama 3 uses 500,000) while a missing ``num_experts`` stops Qwen3-MoE.
:func:`normalize` adds the transformers 4 name for each transformers 5 value it finds, leaving
every key already present as it is, so both spellings build the same model.
"""

from __future__ import annotations

from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")
EXPERT_COUNTS = ("num_experts", "num_local_experts")
"""The two names of a mixture-of-experts block's expert count (transformers' ``attribute_map``)."""


def _rope(out: dict, params: dict, theta_key: str = "rope_theta", scaling: bool = True) -> None:
    """One flat ``rope_parameters`` dict -> ``theta_key``, ``rope_scaling``, ``partial_rotary_factor``."""
    if "rope_theta" in params:
        out.setdefault(theta_key, params["rope_theta"])
    if not scaling:
        return
    if "partial_rotary_factor" in params:
        out.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    if "original_max_position_embeddings" in params:
        out.setdefault("original_max_position_embeddings", params["original_max_position_embeddings"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and out.get("rope_scaling") is None:
        rest = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        # mlx-lm reads either name (rope_utils), Phi-3 requires "type"
        out["rope_scaling"] = {**rest, "rope_type": kind, "type": kind}


def normalize(config: Any) -> Any:
    """``config`` with the transformers 4 name beside each transformers 5 value (a new dict; keys
    already present win). Anything that is not a dict comes back as it is."""
    if not isinstance(config, dict):
        return config
    out = dict(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = normalize(out["text_config"])
    params = out.get("rope_parameters")
    if isinstance(params, dict):
        if any(isinstance(params.get(t), dict) for t in LAYER_TYPES):
            if isinstance(params.get("full_attention"), dict):
                _rope(out, params["full_attention"])
            if isinstance(params.get("sliding_attention"), dict):
                _rope(out, params["sliding_attention"], theta_key="rope_local_base_freq", scaling=False)
        else:
            _rope(out, params)
    present = [k for k in EXPERT_COUNTS if out.get(k) is not None]
    if len(present) == 1:
        for k in EXPERT_COUNTS:
            out.setdefault(k, out[present[0]])
            if out[k] is None:
                out[k] = out[present[0]]
    return out
