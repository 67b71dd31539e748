"""Put adapters on a model, save and load them in the PEFT layout, fuse them.

Module paths of mlx-lm models follow Hugging Face names (``model.layers.3.self_attn.q_proj``),
so the PEFT keys are ``base_model.model.<path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]), plus ``.lora_magnitude_vector`` ([out]) for DoRA; the expert layers of
mixture-of-experts blocks (mlx-lm's ``switch_mlp``) keep one of each per expert: [E, r, in],
[E, out, r], [E, out]. ``adapter_config.json`` carries ``r``, ``lora_alpha``, ``target_modules``,
``use_dora``, ``use_rslora`` and ``base_model_name_or_path``: the format HF PEFT, llama.cpp's converter and Ollama read.
Adapter folders written by mlx-lm (``adapters.safetensors``) load too.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.config import BOUNDS, LoraConfig
from mlx_lora.converters.moe_layout import stack_expert_state
from mlx_lora.model.lora import (
    DoRALinear,
    DoRASwitchLinear,
    LoRALinear,
    LoRASwitchLinear,
    base_dims,
    is_adapter_layer,
    is_expert_layer,
)
from mlx_lora.model.run_layout import check_run_layout
from mlx_lora.plumbing.errors import AdapterError
from mlx_lora.plumbing.io import atomic_save_safetensors, atomic_write_json

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MLX_LM_WEIGHTS = "adapters.safetensors"


def transformer_blocks(model: nn.Module) -> list:
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise AdapterError(f"{type(model).__name__} exposes no transformer blocks (model.layers)")
    return list(blocks)


def _block_path(model: nn.Module, block) -> str:
    for path, m in model.named_modules():
        if m is block:
            return path
    raise AdapterError("cannot locate a transformer block inside the model")


ALL_LINEAR = "all-linear"
"""lora.target_modules entry: every linear and expert layer of the selected blocks, routers included."""


def _matches(path: str, patterns: Optional[list[str]]) -> bool:
    if patterns is None or ALL_LINEAR in patterns:
        return True
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], path):
                return True
        elif path == p or path.endswith("." + p):
            return True
    return False


def wrappable(m) -> bool:
    """Whether ``m`` is a layer an adapter can wrap: linear, quantized linear or expert layer."""
    return isinstance(m, (nn.Linear, nn.QuantizedLinear)) or is_expert_layer(m)


def routers(block: nn.Module) -> set[str]:
    """Sub-paths (inside ``block``) of the routers of its mixture-of-experts modules: the linear
    layers that sit next to the experts (``mlp.gate``, Qwen2-MoE's ``shared_expert_gate``) and
    score at most as many outputs as there are experts."""
    found = set()
    for path, m in block.named_modules():
        children = m.children()  # direct descendants: modules, or lists / dicts of them
        experts = [
            e for c in children.values() if isinstance(c, nn.Module) for _, e in c.named_modules() if is_expert_layer(e)
        ]
        if not experts:
            continue
        n = experts[0].weight.shape[0]
        for name, c in children.items():
            if isinstance(c, (nn.Linear, nn.QuantizedLinear)) and c.weight.shape[0] <= n:
                found.add(f"{path}.{name}" if path else name)
    return found


def _selected_blocks(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    blocks = transformer_blocks(model)
    n = len(blocks)
    if cfg.layers_to_transform is None:
        indices = range(n)
    else:
        bad = [i for i in cfg.layers_to_transform if not -n <= i < n]
        last = len(cfg.layers_to_transform)
        if bad and cfg.layers_to_transform == list(range(-last, 0)):  # mlx-lm's num_layers
            raise AdapterError(
                f"lora.layers_to_transform: the last {last} blocks ([-{last}, ..., -1], mlx-lm's "
                f"num_layers {last}), but the model has {n} blocks"
            )
        if bad:
            raise AdapterError(f"lora.layers_to_transform: {bad} out of range for a model with {n} blocks")
        indices = sorted({i % n for i in cfg.layers_to_transform})
    return [(_block_path(model, blocks[i]), blocks[i]) for i in indices]


def candidate_layers(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every linear and expert layer the config selects, in model order.

    Without ``target_modules`` that is every such layer of the blocks except the routers of
    mixture-of-experts blocks (see :func:`routers`); a router named in ``target_modules`` is adapted."""
    found = []
    for prefix, block in _selected_blocks(model, cfg):
        skip = routers(block) if cfg.target_modules is None else set()
        for sub, m in block.named_modules():
            if sub and sub not in skip and wrappable(m):
                path = f"{prefix}.{sub}"
                if _matches(path, cfg.target_modules):
                    found.append((path, m))
    return found


def unwrappable_matches(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """What ``target_modules`` names that no adapter can wrap, as 'path (Kind)': layers with
    weights of their own (embeddings, norms, ...) matched by any pattern, modules that only hold
    other layers (``switch_mlp``, ``self_attn``) matched by a plain name, and plain names that
    match no module of the selected blocks."""
    if cfg.target_modules is None:
        return []
    names = [p for p in cfg.target_modules if not p.startswith("re:") and p != ALL_LINEAR]
    out, paths = [], []
    for prefix, block in _selected_blocks(model, cfg):
        for sub, m in block.named_modules():
            if not sub:
                continue
            path = f"{prefix}.{sub}"
            paths.append(path)
            if wrappable(m):
                continue
            own = any(isinstance(v, mx.array) for v in m.values())
            patterns = [p for p in cfg.target_modules if p != ALL_LINEAR]
            if (own and patterns and _matches(path, patterns)) or (not own and names and _matches(path, names)):
                out.append(f"{path} ({type(m).__name__})")
    return out + [f"'{n}' (no such module)" for n in names if not any(_matches(p, [n]) for p in paths)]


def _linear_names(model: nn.Module) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if wrappable(m)}))


def _refuse_stacking(model: nn.Module) -> None:
    if adapter_layers(model):
        # Wrapping again would put adapters inside adapters (on their frozen base layers).
        raise AdapterError("the model already has adapter layers; fuse them (fuse_model) or load a fresh model")


def rank_problem(targets: list[tuple[str, nn.Module]], r) -> Optional[str]:
    """Why rank ``r`` cannot adapt ``targets``, or None. B A has rank at most min(in, out) of its
    layer, so a larger r only adds parameters; and r x in floats per layer is what a typo such as
    1e8 would try to allocate."""
    if not targets:
        return None
    path, layer = min(targets, key=lambda t: (min(base_dims(t[1])), t[0]))  # the same layer named every time
    out_dims, in_dims = base_dims(layer)
    if r > min(out_dims, in_dims):
        return (
            f"{r} is larger than the layer {path} allows ({in_dims} in, {out_dims} out): "
            f"the rank can be at most {min(out_dims, in_dims)}"
        )
    return None


def apply_lora(model: nn.Module, cfg: LoraConfig, warn: Optional[Callable[[str], None]] = None) -> list[str]:
    """Freeze the model and wrap the selected layers; returns their module paths.

    Modules that ``target_modules`` names but that cannot carry an adapter are reported through
    ``warn`` (default: a Python warning), never skipped silently."""
    _refuse_stacking(model)
    targets = candidate_layers(model, cfg)
    skipped = unwrappable_matches(model, cfg)
    if not targets:
        named = f"; what it names instead: {_listing(skipped)}" if skipped else ""
        raise AdapterError(
            f"lora.target_modules {cfg.target_modules} matched no linear layer or expert layer{named}; "
            f"this model has: {_linear_names(model)}"
        )
    # Checked before anything is frozen or allocated.
    problem = rank_problem(targets, cfg.r)
    if problem:
        raise AdapterError(f"lora.r={cfg.r}: {problem}")
    if skipped:
        message = (
            f"lora.target_modules: {_listing(skipped)} cannot carry a LoRA adapter (only linear and expert "
            f"layers can) and stay as they are"
        )
        if warn is None:
            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
    model.freeze()
    wrapped = []
    for path, m in targets:
        if is_expert_layer(m):
            cls = DoRASwitchLinear if cfg.use_dora else LoRASwitchLinear
        else:
            cls = DoRALinear if cfg.use_dora else LoRALinear
        wrapped.append((path, cls(m, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora)))
    model.update_modules(tree_unflatten(wrapped))
    return [p for p, _ in wrapped]


def _listing(paths: list[str], limit: int = 4) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if is_adapter_layer(m)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; packed quantized weights count their logical size
    and their scales/biases are not counted."""
    quantized = {p: m for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}
    total = 0
    for path, a in tree_flatten(model.parameters()):
        owner, _, leaf = path.rpartition(".")
        if leaf == "base_norm_sq":  # DoRASwitchLinear's cached ||W||^2 rows, not a weight of the model
            continue
        if owner in quantized:
            if leaf in ("scales", "biases"):
                continue
            if leaf == "weight":
                total += a.size * 32 // quantized[owner].bits
                continue
        total += a.size
    trainable = sum(a.size for _, a in tree_flatten(model.trainable_parameters()))
    return trainable, total


# ----------------------------------------------------------------------------------------------
# save / load


@dataclass
class AdapterInfo:
    lora: LoraConfig
    base_model_name_or_path: Optional[str]
    targets: list[str]
    source_format: str  # "peft" or "mlx-lm"
    extra: dict


def adapter_state(model: nn.Module) -> dict[str, mx.array]:
    """PEFT-named float32 tensors of every adapter layer."""
    out = {}
    for path, m in adapter_layers(model):
        key = PEFT_PREFIX + path
        out[f"{key}.lora_A.weight"] = m.lora_a.astype(mx.float32)
        out[f"{key}.lora_B.weight"] = m.lora_b.astype(mx.float32)
        if isinstance(m, (DoRALinear, DoRASwitchLinear)):
            out[f"{key}.lora_magnitude_vector"] = m.magnitude.astype(mx.float32)
    return out


def peft_config(cfg: LoraConfig, targets: Iterable[str], base_model: Optional[str], extra=None) -> dict:
    targets = list(targets)
    modules = sorted({t.rsplit(".", 1)[-1] for t in targets})
    layers = sorted({int(m.group(1)) for t in targets if (m := re.search(r"\.layers\.(\d+)\.", t))})
    selected = modules
    if any(p.startswith("re:") for p in (cfg.target_modules or [])):
        # A regex may pick a module in some blocks only: PEFT takes a string as a regex that must
        # fullmatch the module path, so name exactly the wrapped paths.
        selected = "|".join(re.escape(t) for t in targets)
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": selected,
        "layers_to_transform": cfg.layers_to_transform if cfg.layers_to_transform is None else layers,
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    if extra:
        conf["mlx_lora"] = extra
    return conf


def mlx_lm_layout(model: nn.Module, cfg: LoraConfig) -> Optional[tuple[dict, dict[str, mx.array]]]:
    """The model's adapters as mlx-lm stores them: (the ``adapter_config.json`` keys mlx-lm's
    ``load_adapters`` reads, the ``adapters.safetensors`` tensors); None when mlx-lm has no layer
    for them (DoRA on expert layers, a layer outside the transformer blocks).

    mlx-lm wraps the modules named by ``lora_parameters.keys`` (paths inside a block) in the last
    ``num_layers`` blocks. Adapters on fewer layers than that rule reaches load too: mlx-lm starts
    every layer's B at zero, so a wrapped layer without tensors in the file adds nothing."""
    blocks = transformer_blocks(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    prefixes = {}
    for path, m in model.named_modules():
        if id(m) in index:
            prefixes[index[id(m)]] = path + "."
    keys, first, dora, weights = set(), len(blocks), False, {}
    for path, m in adapter_layers(model):
        found = [(i, pre) for i, pre in prefixes.items() if path.startswith(pre)]
        if not found or isinstance(m, DoRASwitchLinear):
            return None
        i, pre = found[0]
        keys.add(path[len(pre) :])
        first = min(first, i)
        expert = isinstance(m, LoRASwitchLinear)
        # mlx-lm: a linear layer's A is [in, r] and B [r, out]; an expert layer's [E, r, in] and [E, out, r].
        weights[f"{path}.lora_a"] = (m.lora_a if expert else m.lora_a.T).astype(mx.float32)
        weights[f"{path}.lora_b"] = (m.lora_b if expert else m.lora_b.T).astype(mx.float32)
        if isinstance(m, DoRALinear):
            dora = True
            weights[f"{path}.m"] = m.magnitude.astype(mx.float32)
    conf = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": len(blocks) - first,
        "lora_parameters": {"rank": cfg.r, "scale": cfg.scale, "dropout": cfg.dropout, "keys": sorted(keys)},
    }
    return conf, weights


def save_adapter(
    model: nn.Module, out_dir, cfg: LoraConfig, base_model: Optional[str], extra: Optional[dict] = None
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically (each file is
    replaced whole; the weights are written before the config that points readers at them).

    The same folder also loads in mlx-lm (``mlx_lm.load(base, adapter_path=...)``): beside PEFT's
    keys, ``adapter_config.json`` carries mlx-lm's (``fine_tune_type``, ``num_layers``,
    ``lora_parameters``; PEFT's reader drops keys it does not know), and ``adapters.safetensors``
    holds the tensors in mlx-lm's names and orientation."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    if not state:
        raise AdapterError("the model has no adapter layers to save")
    atomic_save_safetensors(out_dir / ADAPTER_WEIGHTS, state, metadata={"format": "pt"})
    targets = [p for p, _ in adapter_layers(model)]
    conf = peft_config(cfg, targets, base_model, extra)
    layout = mlx_lm_layout(model, cfg)
    if layout is not None:
        atomic_save_safetensors(out_dir / MLX_LM_WEIGHTS, layout[1], metadata={"format": "mlx"})
        conf.update(layout[0])
    atomic_write_json(out_dir / ADAPTER_CONFIG, conf)
    return out_dir


_ABSENT = object()


def _show(value) -> str:
    r = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


class _Fields:
    """Typed reads of an adapter config: each wrong type or value is an AdapterError naming the
    file and the key. A key that is absent or null takes its default (as PEFT's own reader does)."""

    def __init__(self, conf, path: Path, prefix: str = ""):
        if not isinstance(conf, dict):
            raise AdapterError(f"{path}: expected a JSON object, got {type(conf).__name__}")
        self.conf, self.path, self.prefix = conf, path, prefix

    def fail(self, key: str, message: str) -> AdapterError:
        return AdapterError(f"{self.path}: key '{self.prefix}{key}': {message}")

    def get(self, key: str, default=None):
        value = self.conf.get(key)
        return default if value is None else value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):  # "false" is a true string: only JSON booleans say it
            raise self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default=_ABSENT, lo: int = 1) -> int:
        value = self.get(key, default)
        if value is _ABSENT:
            raise self.fail(key, f"missing; expected an integer >= {lo}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer >= {lo}, got {_show(value)}")
        if value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        return value

    def number(self, key: str, default: float, lo: float, hi: Optional[float] = None, lo_open: bool = True) -> float:
        value = self.get(key, default)
        rng = f"{'>' if lo_open else '>='} {lo:g}" if hi is None else f"in [{lo:g}, {hi:g})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number {rng}, got {_show(value)}")
        x = float(value)
        low = x <= lo if lo_open else x < lo
        if not math.isfinite(x) or low or (hi is not None and x >= hi):
            raise self.fail(key, f"must be a number {rng}, got {_show(value)}")
        return x

    def text(self, key: str) -> Optional[str]:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_show(value)}")
        return value

    def mapping(self, key: str) -> dict:
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected an object, got {_show(value)}")
        return value

    def names(self, key: str) -> Optional[list[str]]:
        """Module names (a list), a PEFT regex (a string) or all linear layers (absent, "all-linear")."""
        value = self.get(key)
        if value is None or value == "all-linear":
            return None
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise self.fail(key, f"not a valid regular expression ({e})") from None
            return ["re:" + value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"expected a list of module names or a regex string, got {_show(value)}")
        if not value:
            raise self.fail(key, "empty list: it selects no layer")
        return list(value)

    def indices(self, key: str) -> Optional[list[int]]:
        value = self.get(key)
        if value is None:
            return None
        value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.fail(key, f"expected a non-empty list of block indices, got {_show(value)}")
        return value


def _lora_config_from_peft(conf: dict, path: Path) -> LoraConfig:
    f = _Fields(conf, path)
    peft_type = f.text("peft_type")
    if peft_type is not None and peft_type.upper() != "LORA":
        raise f.fail("peft_type", f"{_show(peft_type)} adapters are not supported (LORA only)")
    if f.boolean("fan_in_fan_out"):
        # Transposed weights (GPT-2's Conv1D): on a square layer they would load without a shape error.
        raise f.fail("fan_in_fan_out", "transposed (Conv1D-style) adapter weights are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if f.mapping(key):  # per-layer ranks or scales would be applied as one uniform r / alpha
            raise f.fail(key, "per-layer ranks and alphas are not supported")
    f.text("base_model_name_or_path")
    f.mapping("mlx_lora")
    return LoraConfig(
        r=f.integer("r"),
        alpha=f.number("lora_alpha", 8, 0),  # 8: PEFT's default when the key is absent
        dropout=f.number("lora_dropout", 0.0, 0, 1, lo_open=False),
        target_modules=f.names("target_modules"),
        layers_to_transform=f.indices("layers_to_transform"),
        use_dora=f.boolean("use_dora"),
        use_rslora=f.boolean("use_rslora"),
    )


def _read_mlx_lm_adapter(folder: Path, conf: dict, model: nn.Module):
    """Translate an mlx-lm adapter folder into (LoraConfig, PEFT-named weights)."""
    conf_path = folder / ADAPTER_CONFIG
    f = _Fields(conf, conf_path)
    kind = f.text("fine_tune_type")
    kind = "lora" if kind is None else kind
    if kind == "full":
        raise AdapterError(
            f"{folder}: mlx-lm full fine-tune weights, not an adapter; load that folder's weights as a model instead"
        )
    if kind not in ("lora", "dora"):
        raise f.fail("fine_tune_type", f"expected lora, dora or full, got {_show(kind)}")
    params = _Fields(f.mapping("lora_parameters"), conf_path, "lora_parameters.")
    r = params.integer("rank", 8)
    scale = params.number("scale", 20.0, 0)
    dropout = params.number("dropout", 0.0, 0, 1, lo_open=False)
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys)):
        raise params.fail("keys", f"expected a non-empty list of module names, got {_show(keys)}")
    f.text("model")
    n = len(transformer_blocks(model))
    num_layers = f.get("num_layers", n)
    if num_layers == -1:
        num_layers = n
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= n:
        raise f.fail(
            "num_layers", f"expected -1 or an integer in [1, {n}] (this model's blocks), got {_show(num_layers)}"
        )
    try:
        weights = mx.load(str(folder / MLX_LM_WEIGHTS))
    except Exception as e:
        raise AdapterError(f"{folder / MLX_LM_WEIGHTS}: cannot read ({e})") from None
    state, targets = {}, set()
    for k, v in weights.items():
        base, _, leaf = k.rpartition(".")
        key = PEFT_PREFIX + base
        # mlx-lm stores a linear layer's A as [in, r] and B as [r, out], an expert layer's as
        # [E, r, in] and [E, out, r] (already PEFT's orientation).
        if leaf == "lora_a":
            state[f"{key}.lora_A.weight"] = v.T if v.ndim == 2 else v
        elif leaf == "lora_b":
            state[f"{key}.lora_B.weight"] = v.T if v.ndim == 2 else v
        elif leaf == "m":
            state[f"{key}.lora_magnitude_vector"] = v
        else:
            continue
        targets.add(base)
    # mlx-lm's scale multiplies B A directly: alpha = scale * r reproduces it.
    cfg = LoraConfig(
        r=r,
        alpha=scale * r,
        dropout=dropout,
        target_modules=["re:" + "|".join(re.escape(t) for t in sorted(targets))] if targets else keys,
        layers_to_transform=list(range(n - num_layers, n)),
        use_dora=kind == "dora",
    )
    return cfg, state


MAX_ADAPTER_DELTA = 1e4
"""The largest change an adapter may make to one weight. Real fine-tunes change weights by far
less than 1; a larger change (a huge ``lora_alpha``, exploded training) overflows half precision
and gives garbage or NaN logits."""


MAX_ADAPTER_SCALE = BOUNDS["lora.alpha"].hi
"""The largest scale an adapter may have: the largest ``lora.alpha`` a run may set, at rank 1."""


def _max_abs(x: mx.array) -> float:
    return float(mx.max(mx.abs(x.astype(mx.float32))).item()) if x.size else 0.0


def check_adapter_values(
    lora: LoraConfig, state: dict, weights_file: Path, config_file: Path, key: str = "lora_alpha"
) -> None:
    """The one check of a loaded adapter's values, where every command loads one (generate, eval,
    chat, serve, fuse, export, a resumed run): every tensor is finite, the scale is at most
    :data:`MAX_ADAPTER_SCALE`, and no layer's update ``scale * B A`` changes a weight by more than
    :data:`MAX_ADAPTER_DELTA` (what fuse would otherwise find only while merging). A cheap bound per
    layer comes first; the exact product is computed only for a layer that fails it. Raises
    AdapterError naming the file and key."""
    for k, v in state.items():
        if not bool(mx.all(mx.isfinite(v)).item()):
            raise AdapterError(
                f"{weights_file}: tensor '{k}' has NaN or infinite values; the adapter is broken "
                f"(retrain it, or resume from an earlier checkpoint)"
            )
    scale = float(lora.scale)
    if not math.isfinite(scale) or scale > MAX_ADAPTER_SCALE:  # inf in float32 even where B is zero
        raise AdapterError(
            f"{config_file}: key '{key}': scale {scale:.3g} is over {MAX_ADAPTER_SCALE:g}, the "
            f"most a run may set (it overflows the computation); the adapter is broken"
        )
    for name in sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")):
        a, b = state[f"{name}.lora_A.weight"], state.get(f"{name}.lora_B.weight")
        if b is None:
            continue
        bound = scale * a.shape[-2] * _max_abs(a) * _max_abs(b)  # |scale (B A)_ij| <= scale r max|B| max|A|
        if math.isfinite(bound) and bound <= MAX_ADAPTER_DELTA:
            continue
        delta = _max_abs(mx.matmul(b.astype(mx.float32), a.astype(mx.float32))) * scale
        if math.isfinite(delta) and delta <= MAX_ADAPTER_DELTA:
            continue
        layer = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        size = "NaN or infinity" if not math.isfinite(delta) else f"{delta:.3g}"
        raise AdapterError(
            f"{config_file}: key '{key}': scale {scale:.3g} makes layer '{layer}' change its weights "
            f"by {size}, more than {MAX_ADAPTER_DELTA:g}; the adapter is broken"
        )


def _checked(info: "AdapterInfo", state: dict, folder: Path, weights: str) -> tuple["AdapterInfo", dict]:
    key = "lora_parameters.scale" if weights == MLX_LM_WEIGHTS else "lora_alpha"
    check_adapter_values(info.lora, state, folder / weights, folder / ADAPTER_CONFIG, key)
    return info, state


def read_adapter(folder, model: Optional[nn.Module] = None) -> tuple[AdapterInfo, dict]:
    """Read an adapter folder (PEFT or mlx-lm layout) without touching a model; a run folder's
    layout is checked (:func:`mlx_lora.model.run_layout.check_run_layout`) and the adapter's values
    too (:func:`check_adapter_values`)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    check_run_layout(folder)
    conf_path = folder / ADAPTER_CONFIG
    if not conf_path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG}; not an adapter folder")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{conf_path}: not valid JSON ({e})") from None
    if (folder / ADAPTER_WEIGHTS).is_file():
        lora = _lora_config_from_peft(conf, conf_path)
        try:
            state = mx.load(str(folder / ADAPTER_WEIGHTS))
        except Exception as e:
            raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: cannot read ({e})") from None
        model_type = getattr(model, "model_type", None) or (conf.get("mlx_lora") or {}).get("model_type")
        if isinstance(model_type, str):  # per-expert adapters (peft's layout) onto mlx-lm's stacked experts
            state = stack_expert_state(model_type, state)
        targets = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in state})
        info = AdapterInfo(lora, conf.get("base_model_name_or_path"), targets, "peft", conf.get("mlx_lora") or {})
        return _checked(info, state, folder, ADAPTER_WEIGHTS)
    if (folder / MLX_LM_WEIGHTS).is_file():
        if model is None:
            raise AdapterError(f"{folder}: an mlx-lm adapter needs the model to be read")
        lora, state = _read_mlx_lm_adapter(folder, conf, model)
        targets = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in state})
        return _checked(AdapterInfo(lora, conf.get("model"), targets, "mlx-lm", {}), state, folder, MLX_LM_WEIGHTS)
    raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (PEFT) or {MLX_LM_WEIGHTS} (mlx-lm) file")


def load_adapter(model: nn.Module, folder) -> AdapterInfo:
    """Wrap the model's layers as the adapter describes and load its weights.

    Every missing, unexpected or wrongly shaped tensor is reported in one AdapterError.
    """
    info, state = read_adapter(folder, model)
    if not info.targets:
        raise AdapterError(f"{folder}: the adapter file holds no LoRA tensors")
    # Wrap exactly the layers the file has weights for.
    lora = replace(
        info.lora, target_modules=["re:" + "|".join(re.escape(t) for t in info.targets)], layers_to_transform=None
    )
    modules = dict(model.named_modules())
    problems = [f"'{t}': no such layer in the model" for t in info.targets if t not in modules]
    if problems:
        raise AdapterError(
            f"{folder}: adapter does not fit this model:\n  - "
            + "\n  - ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    _check_against_model(model, info, folder)
    apply_lora(model, lora)
    expected = adapter_state(model)
    for k in sorted(set(state) | set(expected)):
        if k not in expected:
            problems.append(f"unexpected tensor '{k}'")
        elif k not in state:
            problems.append(f"missing tensor '{k}'")
        elif tuple(state[k].shape) != tuple(expected[k].shape):
            problems.append(
                f"'{k}': shape {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} expected by the model"
            )
    if problems:
        raise AdapterError(
            f"{folder}: adapter does not fit this model "
            f"({len(problems)} problems):\n  - "
            + "\n  - ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    set_adapter_state(model, state)
    return info


def _check_against_model(model: nn.Module, info: AdapterInfo, folder) -> None:
    """The config's selection and rank, checked against the model before anything is allocated."""
    _refuse_stacking(model)
    conf_path = _config_path(folder)
    if info.source_format == "peft" and (
        info.lora.target_modules is not None or info.lora.layers_to_transform is not None
    ):
        try:
            selected = candidate_layers(model, info.lora)
        except AdapterError as e:  # a block index past this model's blocks
            raise AdapterError(f"{conf_path}: key 'layers_to_transform': {str(e).split(': ', 1)[-1]}") from None
        if not selected:
            where = "" if info.lora.layers_to_transform is None else f" in blocks {info.lora.layers_to_transform}"
            names = [t[3:] if t.startswith("re:") else t for t in info.lora.target_modules or ["all-linear"]]
            raise AdapterError(
                f"{conf_path}: key 'target_modules': {names} match no linear layer or expert layer "
                f"of this model{where}; it has: {_linear_names(model)}"
            )
    layers = [(t, m) for t, m in model.named_modules() if t in set(info.targets) and wrappable(m)]
    problem = rank_problem(layers, info.lora.r)
    if problem:
        key = "r" if info.source_format == "peft" else "lora_parameters.rank"
        raise AdapterError(f"{conf_path}: key '{key}': {problem}")


def _config_path(folder) -> Path:
    folder = Path(folder)
    return (folder.parent if folder.is_file() else folder) / ADAPTER_CONFIG


def set_adapter_state(model: nn.Module, state: dict[str, mx.array]) -> None:
    updates = []
    for path, m in adapter_layers(model):
        key = PEFT_PREFIX + path
        updates.append((f"{path}.lora_a", state[f"{key}.lora_A.weight"].astype(mx.float32)))
        updates.append((f"{path}.lora_b", state[f"{key}.lora_B.weight"].astype(mx.float32)))
        if isinstance(m, (DoRALinear, DoRASwitchLinear)):
            updates.append((f"{path}.magnitude", state[f"{key}.lora_magnitude_vector"].astype(mx.float32)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def fuse_model(model: nn.Module) -> list[str]:
    """Replace every adapter layer by its fused plain layer, in place; returns the fused paths."""
    fused = [(p, m.fuse()) for p, m in adapter_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return [p for p, _ in fused]
