"""The architecture table: everything GGUF export, import and verification know about a model family.

One :class:`ArchSpec` per Hugging Face ``model_type`` (:data:`ARCHS`) holds the GGUF architecture
name, the HF class written to ``config.json``, the tensor transforms, and the ``<arch>.*``
metadata as one declarative list of entries, each mapping GGUF keys to ``config.json`` keys in
both directions (:func:`write_metadata` on export, :func:`hf_config` on import). Tensor names come
from the gguf package's own table (``gguf.get_tensor_name_map``) in both directions: the import
maps every HF tensor name of the model described by the file's metadata and inverts that.

Transforms (HF -> GGUF, all invertible):

- llama / mistral (GGUF arch ``llama``): llama.cpp applies rotary embeddings to adjacent pairs
  (GPT-J style), HF to the two halves of each head (NeoX style). The rows of ``q_proj`` and
  ``k_proj`` (weights and biases; ``k`` uses the key/value head count) are permuted per head so
  that HF row ``h*hd + t*hd/2 + j`` goes to GGUF row ``h*hd + 2*j + t`` (``t`` in {0, 1},
  ``j < hd/2``). Qwen2, Qwen3, Gemma 2 and Phi-3 use NeoX rotation in llama.cpp too: no permutation.
  The permutation moves whole rows, so it applies unchanged to quantized rows and their scales.
- gemma2: HF stores RMSNorm scales minus one (the layer computes ``x * (1 + w)``); GGUF stores the
  full scale, so ``1`` is added to every ``*norm.weight``.

- gemma3_text: the same norm offset, q/k norms included.
- Mixture of experts (qwen3_moe, mixtral): mlx-lm holds each projection of a layer's experts as
  one stacked ``switch_mlp.<proj>.weight`` (experts, out, in), exactly the ``ffn_<proj>_exps``
  tensor llama.cpp's converter builds by stacking the per-expert HF tensors; only the name
  changes (:attr:`ArchSpec.experts`). The router (``ffn_gate_inp``) stays F32 in every type.

GGUF cannot tell Mistral from Llama (llama.cpp reads both as ``llama``), so an imported Mistral
file comes back as a ``llama`` model with the same weights and logits. Mixtral is ``llama`` with
``llama.expert_count`` set, which the import uses to tell it apart.

A config that llama.cpp would run differently from the HF model (a layout it hard-codes, such as
SmolLM3's NoPE layers or Gemma's query scale) is refused before anything is written
(:attr:`ArchSpec.check`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from mlx_lora.converters.moe_layout import LAYOUTS as EXPERT_LAYOUTS
from mlx_lora.plumbing.errors import ExportError, ModelError

U32, F32, STR, BOOLS = "u32", "f32", "str", "bools"
REQUIRED = object()
"""Import default of a metadata key llama.cpp cannot load a file without."""


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_params(config: dict) -> dict:
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


# ---------------------------------------------------------------------------------------------
# Metadata entries: each writes GGUF keys from a config and reads them back into one


class _Reader:
    """What an entry reads on import: metadata values and the file's extra tensors."""

    def __init__(self, metadata: dict, arch: str, source: str, tensor: Callable[[str], np.ndarray | None]):
        self.metadata, self.arch, self.source, self.tensor = metadata, arch, source, tensor

    def get(self, key: str, default: Any = None) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if default is REQUIRED:
            raise ModelError(f"{self.source}: metadata key '{full}' is missing")
        return default


@dataclass(frozen=True)
class Key:
    """One ``<arch>.<key>`` value <-> one ``config.json`` key.

    Export writes ``get(config)`` (default: ``config[hf]``) unless it is None. Import sets
    ``config[hf] = to_hf(value, config)`` (default: the value as ``kind``), with ``default`` (a
    value, a function of the config read so far, or :data:`REQUIRED`) when the file lacks the
    key; ``hf=None`` marks a value derived on export and not read back, ``export=False`` one that
    llama.cpp's own converter never writes but other files may carry.
    """

    key: str
    hf: str | None
    kind: str
    default: Any = None
    get: Callable[[dict], Any] | None = None
    to_hf: Callable[[Any, dict], Any] | None = None
    export: bool = True
    tensor_names: tuple[str, ...] = ()

    def write(self, config: dict) -> list[tuple[str, Any, str]]:
        if not self.export:
            return []
        value = self.get(config) if self.get else config.get(self.hf)
        return [] if value is None else [(self.key, value, self.kind)]

    def read(self, r: _Reader, cfg: dict) -> None:
        if self.hf is None:
            return
        value = r.get(self.key, REQUIRED if self.default is REQUIRED else None)
        if value is None:
            cfg[self.hf] = self.default(cfg) if callable(self.default) else self.default
        elif self.to_hf:
            cfg[self.hf] = self.to_hf(value, cfg)
        else:
            cfg[self.hf] = int(value) if self.kind == U32 else float(value) if self.kind == F32 else value

    def tensors(self, config: dict) -> dict[str, np.ndarray]:
        return {}


FILE_TYPE = Key("general.file_type", None, U32)
"""Placeholder for the file type, which comes from the export type rather than the config."""


def _theta(config: dict):
    return config.get("rope_theta", _rope_params(config).get("rope_theta"))


GENERAL: tuple = (
    Key("block_count", "num_hidden_layers", U32, REQUIRED),
    Key("context_length", "max_position_embeddings", U32, 2048, get=lambda c: c.get("max_position_embeddings") or 2048),
    Key("embedding_length", "hidden_size", U32, REQUIRED),
    Key("feed_forward_length", "intermediate_size", U32, REQUIRED),
    Key("attention.head_count", "num_attention_heads", U32, REQUIRED),
    Key(
        "attention.head_count_kv",
        "num_key_value_heads",
        U32,
        lambda cfg: cfg["num_attention_heads"],
        get=lambda c: c.get("num_key_value_heads") or c["num_attention_heads"],
    ),
    Key("attention.layer_norm_rms_epsilon", "rms_norm_eps", F32, REQUIRED, get=lambda c: c.get("rms_norm_eps", 1e-6)),
    FILE_TYPE,
    Key("rope.freq_base", "rope_theta", F32, 10000.0, get=_theta),
    Key("attention.key_length", "head_dim", U32, lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
    # The importer supports key_length == value_length only; it checks that.
    Key("attention.value_length", None, U32, get=lambda c: c.get("head_dim")),
)
"""Keys every architecture has, in the order they are written."""


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp reads from ``rope_freqs.weight`` for Llama 3.1 scaling.

    Frequency ``f_i = theta^(-2i/d)`` with wavelength ``L = 2 pi / f_i`` is divided by
    ``factor`` when ``L > orig / low``, kept when ``L < orig / high``, and in between by
    ``1 / ((1 - s) / factor + s)`` with ``s = (orig / L - low) / (high - low)``.
    """
    rope = _rope_params(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    theta = float(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
    d = head_dim(config)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    orig = float(rope.get("original_max_position_embeddings", 8192))
    freqs = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    wavelen = 2 * math.pi / freqs
    s = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    out = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1.0 / ((1 - s) / factor + s)))
    return out.astype(np.float32)


@dataclass(frozen=True)
class RopeScaling:
    """``rope_scaling`` of linear and YaRN type as ``rope.scaling.*`` keys; with ``llama3``, Llama
    3.1 scaling as the per-frequency divisors of ``rope_freqs.weight`` (llama.cpp has no key for it)."""

    llama3: bool

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return ("rope_freqs.weight",) if self.llama3 else ()

    def write(self, config: dict) -> list[tuple[str, Any, str]]:
        rope = _rope_params(config)
        rope_type = str(rope.get("rope_type") or "").lower()
        if rope_type in ("", "default", "llama3"):
            return []
        factor = rope.get("factor")
        if rope_type == "linear" and factor:
            return [("rope.scaling.type", "linear", STR), ("rope.scaling.factor", float(factor), F32)]
        if rope_type == "yarn" and factor:
            out = [("rope.scaling.type", "yarn", STR), ("rope.scaling.factor", float(factor), F32)]
            if rope.get("original_max_position_embeddings"):
                out.append(("rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32))
            return out
        raise ExportError(f"config.json: rope_scaling type '{rope_type}' is not supported by the GGUF exporter")

    def tensors(self, config: dict) -> dict[str, np.ndarray]:
        f = llama3_rope_factors(config) if self.llama3 else None
        return {} if f is None else {"rope_freqs.weight": f}

    def read(self, r: _Reader, cfg: dict) -> None:
        stored = r.tensor("rope_freqs.weight") if self.llama3 else None
        if stored is not None:
            cfg["rope_scaling"] = self._llama3(r, cfg, stored.reshape(-1))
            return
        kind, factor = r.get("rope.scaling.type", "none"), r.get("rope.scaling.factor")
        if kind in ("none", None) or not factor or float(factor) == 1.0:
            cfg["rope_scaling"] = None
        elif kind in ("linear", "yarn"):
            cfg["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
            orig = r.get("rope.scaling.original_context_length")
            if kind == "yarn" and orig:
                cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
        else:
            raise ModelError(f"{r.source}: unsupported rope scaling '{kind}' (metadata '{r.arch}.rope.scaling.type')")

    @staticmethod
    def _llama3(r: _Reader, cfg: dict, stored: np.ndarray) -> dict:
        # The file keeps only the divisors; the published Llama 3.1+ models use low 1, high 4 and
        # an original context of 8192, and the largest divisor is the factor. Accepted only if
        # those reproduce the file.
        scaling = {
            "rope_type": "llama3",
            "factor": float(stored.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        expected = llama3_rope_factors({**cfg, "rope_scaling": scaling})
        if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-3):
            raise ModelError(
                f"{r.source}: tensor 'rope_freqs.weight' holds rope scaling that is not Llama 3 style "
                f"(factor {scaling['factor']}, low 1, high 4, original context 8192); this import does not support it"
            )
        return scaling


def _phi3_orig(config: dict):
    return config.get("original_max_position_embeddings", _rope_params(config).get("original_max_position_embeddings"))


def _phi3_attn_factor(rope_type: str, scale: float, orig: float) -> float:
    if rope_type in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    if rope_type == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise ExportError(f"config.json: phi3 rope_scaling type '{rope_type}' is not supported")


@dataclass(frozen=True)
class Phi3Rope:
    """Phi-3's LongRoPE: the per-frequency factors as ``rope_factors_long/short.weight`` and the
    attention scale that follows from the context extension as ``rope.scaling.attn_factor``."""

    tensor_names: tuple[str, ...] = ("rope_factors_long.weight", "rope_factors_short.weight")

    def write(self, config: dict) -> list[tuple[str, Any, str]]:
        rope = _rope_params(config)
        if not rope.get("long_factor"):
            return []
        orig = float(_phi3_orig(config))
        scale = float(config["max_position_embeddings"]) / orig
        rope_type = str(rope.get("rope_type") or "").lower()
        return [("rope.scaling.attn_factor", _phi3_attn_factor(rope_type, scale, orig), F32)]

    def tensors(self, config: dict) -> dict[str, np.ndarray]:
        rope = _rope_params(config)
        if not rope.get("long_factor"):
            return {}
        n = head_dim(config) * float(config.get("partial_rotary_factor", 1.0))
        long, short = rope["long_factor"], rope.get("short_factor")
        if short is None or len(long) != len(short) or len(long) != int(n) // 2:
            raise ExportError(f"rope_scaling long_factor/short_factor must each have {int(n) // 2} entries")
        return {
            "rope_factors_long.weight": np.asarray(long, np.float32),
            "rope_factors_short.weight": np.asarray(short, np.float32),
        }

    def read(self, r: _Reader, cfg: dict) -> None:
        long, short = (r.tensor(n) for n in self.tensor_names)
        if long is None or short is None:
            cfg["rope_scaling"] = None
            return
        # The attention factor tells LongRoPE from YaRN; files without it are LongRoPE (Phi-3.5, Phi-4).
        scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        stored = r.get("rope.scaling.attn_factor")
        kind = "longrope"
        if stored is not None and not math.isclose(
            float(stored), _phi3_attn_factor("longrope", scale, cfg["original_max_position_embeddings"]), rel_tol=1e-5
        ):
            kind = "yarn"
        cfg["rope_scaling"] = {
            "type": kind,
            "long_factor": [float(x) for x in long.reshape(-1)],
            "short_factor": [float(x) for x in short.reshape(-1)],
        }


@dataclass(frozen=True)
class SwaPattern:
    """Gemma 3's local/global layer pattern: layer ``i`` is global (full attention) when
    ``(i + 1) % sliding_window_pattern == 0``. llama.cpp assumes a pattern of 6 (the published
    checkpoints) unless the file carries ``attention.sliding_window_pattern`` (one bool per layer,
    true = sliding), which llama.cpp's converter never writes; it is written here for any other
    pattern so that llama.cpp runs the layers the HF model runs."""

    default: int = 6
    tensor_names: tuple[str, ...] = ()

    @staticmethod
    def layers(pattern: int, n: int) -> list[bool]:
        return [(i + 1) % pattern != 0 for i in range(n)]

    def write(self, config: dict) -> list[tuple[str, Any, str]]:
        pattern = int(config.get("sliding_window_pattern") or self.default)
        if pattern in (1, self.default):  # 1: no sliding layers, and then no window is written
            return []
        return [("attention.sliding_window_pattern", self.layers(pattern, int(config["num_hidden_layers"])), BOOLS)]

    def tensors(self, config: dict) -> dict[str, np.ndarray]:
        return {}

    def read(self, r: _Reader, cfg: dict) -> None:
        n = cfg["num_hidden_layers"]
        stored = r.get("attention.sliding_window_pattern")
        if stored is None:
            cfg["sliding_window_pattern"] = self.default if r.get("attention.sliding_window") else 1
            return
        if isinstance(stored, (int, float)):  # llama.cpp also reads one number
            cfg["sliding_window_pattern"] = int(stored)
            return
        flags = [bool(x) for x in stored]
        for pattern in range(1, n + 2):
            if flags == self.layers(pattern, n):
                cfg["sliding_window_pattern"] = pattern
                return
        raise ModelError(
            f"{r.source}: metadata '{r.arch}.attention.sliding_window_pattern' {flags} is not one global "
            f"layer every k layers; this import does not support it"
        )


def _query_scale_check(config: dict) -> str | None:
    # llama.cpp scales Gemma queries by head_dim^-0.5, except in the 27B model (hidden / heads)
    hd, scalar = head_dim(config), config.get("query_pre_attn_scalar")
    if scalar is None or float(scalar) == hd:
        return None
    if (
        int(config["num_hidden_layers"]) in (46, 62)
        and float(scalar) == config["hidden_size"] // config["num_attention_heads"]
    ):
        return None
    return f"query_pre_attn_scalar {scalar} is neither head_dim ({hd}) nor the 27B model's hidden_size / heads"


def _gemma2_check(config: dict) -> str | None:
    theta = _theta(config)
    if theta is not None and float(theta) != 10000.0:
        return f"rope_theta {theta} is not Gemma 2's 10000, the value llama.cpp uses (its converter writes none)"
    return _query_scale_check(config)


def _gemma3_check(config: dict) -> str | None:
    if config.get("attn_logit_softcapping"):
        return "attn_logit_softcapping is set, which Gemma 3 in llama.cpp does not apply"
    return _query_scale_check(config)


def _gemma3_query_scalar(n_layers: int, cfg: dict) -> float:
    if int(n_layers) == 62:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["head_dim"]


def no_rope_layers(n: int) -> list[int]:
    """SmolLM3's ``no_rope_layers`` as llama.cpp hard-codes it: every 4th layer has no rotary embedding (0)."""
    return [int((i + 1) % 4 != 0) for i in range(n)]


def _smollm3_check(config: dict) -> str | None:
    n = int(config["num_hidden_layers"])
    given = config.get("no_rope_layers")
    if given is None:
        interval = int(config.get("no_rope_layer_interval", 4))
        given = [int((i + 1) % interval != 0) for i in range(n)]
    if list(given) != no_rope_layers(n):
        return (
            f"no_rope_layers {list(given)} differs from llama.cpp's fixed layout "
            "(no rotary embedding in every 4th layer)"
        )
    if config.get("use_sliding_window"):
        return "use_sliding_window is true, which SmolLM3 in llama.cpp does not implement"
    return None


def _qwen3_moe_check(config: dict) -> str | None:
    if not config.get("norm_topk_prob", True):
        return "norm_topk_prob is false, while llama.cpp's qwen3moe always renormalises the top-k expert weights"
    if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
        return (
            "some layers are dense (decoder_sparse_step / mlp_only_layers), which llama.cpp's qwen3moe does not support"
        )
    return None


def _olmo2_check(config: dict) -> str | None:
    if config.get("sliding_window") or config.get("layer_types"):
        return "sliding window layers (OLMo 3 style) are not part of the olmo2 GGUF layout"
    return None


def _expert_names(model_type: str) -> dict:
    """mlx-lm's stacked expert projections -> the merged per-expert name gguf's tensor map knows
    (``mlp.switch_mlp.gate_proj`` -> ``mlp.experts.gate_proj``), from the one expert layout table
    (:data:`moe_layout.LAYOUTS`)."""
    lay = EXPERT_LAYOUTS[model_type]
    merged = lay.per_expert.replace(".{e}", "")
    return {f"{lay.stacked}.{ours}": f"{merged}.{hub}" for ours, hub in lay.names.items()}


def _experts(count_key: str) -> tuple:
    return (
        Key("expert_count", count_key, U32, REQUIRED),
        Key("expert_used_count", "num_experts_per_tok", U32, REQUIRED),
    )


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # Hugging Face model_type
    gguf_arch: str  # general.architecture
    hf_class: str  # config.json "architectures"
    permute_qk: bool  # GPT-J style rotary rows in llama.cpp
    norm_offset: float  # added to RMSNorm weights on export
    metadata: tuple = ()  # entries written after GENERAL, in this order
    hf_defaults: dict = field(default_factory=dict)
    """config.json keys GGUF does not carry (llama.cpp hard-codes them per architecture)."""
    tensor_flags: dict = field(default_factory=dict)
    """config.json key -> HF tensor whose presence in the file sets it (biases are optional)."""
    experts: dict = field(default_factory=dict)
    """MoE: mlx-lm's stacked module (``mlp.switch_mlp.gate_proj``) -> the merged HF name the gguf
    package maps (``mlp.experts.gate_proj``)."""
    check: Callable[[dict], str | None] | None = None
    """Why llama.cpp would run this config differently from the HF model (None: it runs it alike)."""
    skip: tuple[str, ...] = ()
    """Keys of :data:`GENERAL` this family's converter does not write (llama.cpp uses its own
    value; import still reads them from files that have them)."""
    peft: str = "yes"
    """PEFT export in the support matrix: ``yes``, or ``dense`` where expert layers are not yet
    exported as PEFT (flip it here when they are)."""
    gguf_lora: bool = True
    """llama.cpp applies GGUF LoRA adapters to this architecture."""

    @property
    def entries(self) -> tuple:
        return GENERAL + self.metadata

    @property
    def moe(self) -> bool:
        return bool(self.experts)

    def refuse(self, config: dict, what: str = "GGUF export") -> None:
        """Raise :class:`ExportError` if llama.cpp would not run ``config`` as the HF model does."""
        why = self.check(config) if self.check else None
        if why:
            raise ExportError(f"config.json: {why}; {what} refuses it (llama.cpp would compute other logits)")

    @property
    def extra_tensor_names(self) -> tuple[str, ...]:
        """GGUF tensors that carry configuration (rope factors), not weights."""
        return tuple(n for e in self.entries for n in e.tensor_names)


# llama.cpp's converter writes no sliding window for these; files from elsewhere may.
_WINDOW = Key(
    "attention.sliding_window", "sliding_window", U32, None, to_hf=lambda n, cfg: int(n) or None, export=False
)
_LLAMA_METADATA = (
    RopeScaling(llama3=True),
    Key("vocab_size", "vocab_size", U32),
    Key("rope.dimension_count", None, U32, get=head_dim),
)
_LLAMA_FLAGS = {
    "attention_bias": "model.layers.0.self_attn.q_proj.bias",
    "mlp_bias": "model.layers.0.mlp.gate_proj.bias",
}

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        "llama", "llama", "LlamaForCausalLM", True, 0.0, _LLAMA_METADATA, {"hidden_act": "silu"}, _LLAMA_FLAGS
    ),
    "mistral": ArchSpec(
        "mistral",
        "llama",
        "MistralForCausalLM",
        True,
        0.0,
        _LLAMA_METADATA + (_WINDOW,),
        {"hidden_act": "silu"},
        _LLAMA_FLAGS,
    ),
    "qwen2": ArchSpec(
        "qwen2",
        "qwen2",
        "Qwen2ForCausalLM",
        False,
        0.0,
        (RopeScaling(llama3=False), _WINDOW),
        {"hidden_act": "silu", "use_sliding_window": False},
    ),
    "qwen3": ArchSpec(
        "qwen3",
        "qwen3",
        "Qwen3ForCausalLM",
        False,
        0.0,
        (RopeScaling(llama3=False), _WINDOW),
        {"hidden_act": "silu", "use_sliding_window": False},
        {"attention_bias": "model.layers.0.self_attn.q_proj.bias"},
    ),
    "gemma2": ArchSpec(
        "gemma2",
        "gemma2",
        "Gemma2ForCausalLM",
        False,
        1.0,
        (
            RopeScaling(llama3=False),
            # llama.cpp needs the head size even where config.json leaves it implicit
            Key("attention.key_length", None, U32, get=lambda c: None if c.get("head_dim") else head_dim(c)),
            Key("attention.value_length", None, U32, get=lambda c: None if c.get("head_dim") else head_dim(c)),
            # llama.cpp's defaults when a file lacks them
            Key("attn_logit_softcapping", "attn_logit_softcapping", F32, 50.0),
            Key("final_logit_softcapping", "final_logit_softcapping", F32, 30.0),
            Key("attention.sliding_window", "sliding_window", U32, 4096, get=lambda c: c.get("sliding_window") or None),
            # llama.cpp scales queries by head_dim^-0.5, except for the 46-layer 27B model
            # (hidden / heads); GGUF has no key for it.
            Key(
                "block_count",
                "query_pre_attn_scalar",
                U32,
                export=False,
                to_hf=lambda n, cfg: (
                    cfg["hidden_size"] // cfg["num_attention_heads"] if int(n) == 46 else cfg["head_dim"]
                ),
            ),
        ),
        {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        check=_gemma2_check,
        skip=("rope.freq_base",),
    ),
    "phi3": ArchSpec(
        "phi3",
        "phi3",
        "Phi3ForCausalLM",
        False,
        0.0,
        (
            Key(
                "rope.scaling.original_context_length",
                "original_max_position_embeddings",
                U32,
                lambda cfg: cfg["max_position_embeddings"],
                get=_phi3_orig,
            ),
            Key(
                "rope.dimension_count",
                "partial_rotary_factor",
                U32,
                get=lambda c: (
                    int(float(c.get("partial_rotary_factor", 1.0)) * int(c["hidden_size"]))
                    // int(c["num_attention_heads"])
                ),
                to_hf=lambda n, cfg: int(n) * cfg["num_attention_heads"] / cfg["hidden_size"],
            ),
            # 0 marks "no sliding window" to llama.cpp (Phi-4 style models)
            Key(
                "attention.sliding_window",
                "sliding_window",
                U32,
                get=lambda c: int(c.get("sliding_window") or 0),
                to_hf=lambda n, cfg: int(n) or None,
            ),
            Phi3Rope(),
        ),
        {"hidden_act": "silu"},
    ),
    "smollm3": ArchSpec(
        "smollm3",
        "smollm3",
        "SmolLM3ForCausalLM",
        True,
        0.0,
        _LLAMA_METADATA
        + (Key("block_count", "no_rope_layers", U32, export=False, to_hf=lambda n, cfg: no_rope_layers(int(n))),),
        {"hidden_act": "silu", "no_rope_layer_interval": 4, "use_sliding_window": False, "sliding_window": None},
        _LLAMA_FLAGS,
        check=_smollm3_check,
    ),
    "gemma3_text": ArchSpec(
        "gemma3_text",
        "gemma3",
        "Gemma3ForCausalLM",
        False,
        1.0,
        (
            RopeScaling(llama3=False),
            # llama.cpp's converter writes Gemma 3's default head size when config.json has none
            Key("attention.key_length", None, U32, get=lambda c: None if c.get("head_dim") else 256),
            Key("attention.value_length", None, U32, get=lambda c: None if c.get("head_dim") else 256),
            Key(
                "rope.freq_base_swa",
                "rope_local_base_freq",
                F32,
                10000.0,
                get=lambda c: c.get("rope_local_base_freq", 10000.0),
            ),
            Key("final_logit_softcapping", "final_logit_softcapping", F32, None),
            Key(
                "attention.sliding_window",
                "sliding_window",
                U32,
                512,
                get=lambda c: None if c.get("sliding_window_pattern") == 1 else c.get("sliding_window"),
            ),
            SwaPattern(),
            Key("block_count", "query_pre_attn_scalar", U32, export=False, to_hf=_gemma3_query_scalar),
        ),
        {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attn_logit_softcapping": None},
        check=_gemma3_check,
    ),
    "olmo2": ArchSpec(
        "olmo2",
        "olmo2",
        "Olmo2ForCausalLM",
        False,
        0.0,
        (RopeScaling(llama3=False),),
        {"hidden_act": "silu"},
        {"attention_bias": "model.layers.0.self_attn.q_proj.bias"},
        check=_olmo2_check,
    ),
    "granite": ArchSpec(
        "granite",
        "granite",
        "GraniteForCausalLM",
        True,
        0.0,
        _LLAMA_METADATA
        + (
            Key(
                "attention.scale",
                "attention_multiplier",
                F32,
                lambda cfg: (cfg["hidden_size"] // cfg["num_attention_heads"]) ** -0.5,
            ),
            Key("embedding_scale", "embedding_multiplier", F32, 1.0),
            Key("residual_scale", "residual_multiplier", F32, 1.0),
            Key("logit_scale", "logits_scaling", F32, REQUIRED),
        ),
        {"hidden_act": "silu"},
        _LLAMA_FLAGS,
        # Granite's head size is always hidden_size / heads: the converter drops head_dim
        skip=("attention.key_length", "attention.value_length"),
    ),
    "qwen3_moe": ArchSpec(
        "qwen3_moe",
        "qwen3moe",
        "Qwen3MoeForCausalLM",
        False,
        0.0,
        (RopeScaling(llama3=False), _WINDOW)
        + _experts("num_experts")
        + (Key("expert_feed_forward_length", "moe_intermediate_size", U32, REQUIRED),),
        {
            "hidden_act": "silu",
            "use_sliding_window": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        },
        {"attention_bias": "model.layers.0.self_attn.q_proj.bias"},
        experts=_expert_names("qwen3_moe"),
        check=_qwen3_moe_check,
    ),
    "mixtral": ArchSpec(
        "mixtral",
        "llama",
        "MixtralForCausalLM",
        True,
        0.0,
        _LLAMA_METADATA + (_WINDOW,) + _experts("num_local_experts"),
        {"hidden_act": "silu"},
        experts=_expert_names("mixtral"),
    ),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export does not support architecture '{model_type}'; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def spec_for_gguf(gguf_arch: str, metadata: dict | None = None) -> ArchSpec | None:
    """The spec an import uses for ``general.architecture``: the first table entry written under
    that name (``llama`` for llama and mistral; ``mixtral`` when ``llama.expert_count`` is set),
    else the entry of that model_type."""
    moe = bool((metadata or {}).get(f"{gguf_arch}.expert_count"))
    candidates = [s for s in ARCHS.values() if s.gguf_arch == gguf_arch]
    return next((s for s in candidates if s.moe == moe), None) or next(iter(candidates), None) or ARCHS.get(gguf_arch)


def _gguf_arch_enum(spec: ArchSpec):

    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == spec.gguf_arch:
            return enum
    raise ExportError(f"the installed gguf package does not know architecture '{spec.gguf_arch}'")


class TensorNames:
    """HF tensor name <-> GGUF tensor name for one model (``gguf``'s mapping table)."""

    def __init__(self, spec: ArchSpec, n_blocks: int):

        self.spec = spec
        self._map = gguf.get_tensor_name_map(_gguf_arch_enum(spec), n_blocks)

    def gguf_name(self, hf_name: str) -> str:
        lookup = hf_name
        for stacked, merged in self.spec.experts.items():
            lookup = lookup.replace(f".{stacked}.", f".{merged}.")
        name = self._map.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"tensor '{hf_name}' has no GGUF counterpart in llama.cpp's '{self.spec.gguf_arch}' architecture"
            )
        return name

    def gguf_module(self, hf_module: str) -> str:
        """``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight`` (a LoRA target's weight)."""
        return self.gguf_name(hf_module + ".weight")

    def hf_names(self, hf_names: Iterable[str]) -> dict[str, str]:
        """GGUF name -> HF name for every tensor of a model with parameters ``hf_names``."""
        return {self.gguf_name(n): n for n in hf_names}


# ---------------------------------------------------------------------------------------------
# Tensor transforms


def qk_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row index ``p`` with ``gguf = hf[p]`` for llama.cpp's q/k layout.

    HF row ``h*hd + t*hd/2 + j`` -> GGUF row ``h*hd + 2*j + t``; as a gather index, GGUF row
    ``h*hd + 2*j + t`` reads HF row ``h*hd + t*hd/2 + j``.
    """
    if n_head <= 0 or n_rows % n_head or (n_rows // n_head) % 2:
        raise ExportError(f"{n_rows} rows cannot be split into {n_head} heads of even size")
    hd = n_rows // n_head
    h, j, t = np.meshgrid(np.arange(n_head), np.arange(hd // 2), np.arange(2), indexing="ij")
    return (h * hd + t * (hd // 2) + j).reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """``inv`` with ``x[perm][inv] == x``."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def _heads(config: dict, hf_name: str) -> int | None:
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def row_permutation(spec: ArchSpec, config: dict, hf_name: str, n_rows: int) -> np.ndarray | None:
    """The gather index applied to the rows of ``hf_name`` on export, or None."""
    if not spec.permute_qk:
        return None
    n_head = _heads(config, hf_name)
    return None if n_head is None else qk_permutation(n_rows, n_head)


def is_f32_tensor(gguf_name: str) -> bool:
    """Matrices llama.cpp keeps in F32 whatever the file type (MoE routers)."""
    return gguf_name.endswith((".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight"))


def is_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def to_gguf(spec: ArchSpec, config: dict, hf_name: str, w: np.ndarray) -> np.ndarray:
    """HF tensor (float32, numpy order) -> the values llama.cpp expects under the GGUF name."""
    perm = row_permutation(spec, config, hf_name, w.shape[0])
    if perm is not None:
        w = w[perm]
    if spec.norm_offset and is_norm(hf_name):
        w = w + np.float32(spec.norm_offset)
    return w


def hf_row_order(spec: ArchSpec, config: dict, hf_name: str, n_rows: int) -> np.ndarray | None:
    """The gather index that undoes :func:`row_permutation` (``hf = gguf[index]``), or None.

    It moves whole rows, so an importer applies it to packed quantized rows and their scales alike."""
    perm = row_permutation(spec, config, hf_name, n_rows)
    return None if perm is None else inverse_permutation(perm)


def values_from_gguf(spec: ArchSpec, hf_name: str, w: np.ndarray) -> np.ndarray:
    """The element-wise part of :func:`from_gguf` (float32 values, any row range)."""
    if spec.norm_offset and is_norm(hf_name):
        w = w - np.float32(spec.norm_offset)
    return w


def from_gguf(spec: ArchSpec, config: dict, hf_name: str, w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_gguf`: :func:`values_from_gguf`, then the rows in :func:`hf_row_order`."""
    w = values_from_gguf(spec, hf_name, w)
    order = hf_row_order(spec, config, hf_name, w.shape[0])
    return w if order is None else w[order]


# ---------------------------------------------------------------------------------------------
# Metadata and configuration tensors


def extra_tensors(spec: ArchSpec, config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the HF checkpoint does not hold (rope factors)."""
    out: dict[str, np.ndarray] = {}
    for e in spec.entries:
        out.update(e.tensors(config))
    return out


def write_metadata(writer, spec: ArchSpec, config: dict, file_type: int) -> None:
    """The ``<arch>.*`` hyper-parameters llama.cpp reads for ``spec``."""
    add = {
        U32: lambda k, v: writer.add_uint32(k, int(v)),
        F32: lambda k, v: writer.add_float32(k, float(v)),
        STR: writer.add_string,
        BOOLS: lambda k, v: writer.add_array(k, [bool(x) for x in v]),
    }
    for e in spec.entries:
        if e is FILE_TYPE:
            writer.add_uint32(e.key, int(file_type))
            continue
        if e in GENERAL and e.key in spec.skip:
            continue
        for key, value, kind in e.write(config):
            add[kind](f"{spec.gguf_arch}.{key}", value)


def hf_config(
    spec: ArchSpec,
    metadata: dict,
    *,
    source: str,
    tensor_names: Iterable[str],
    tensor: Callable[[str], np.ndarray | None],
    gguf_arch: str | None = None,
) -> dict:
    """The HF ``config.json`` (without ``torch_dtype`` and ``vocab_size``) that :func:`write_metadata`
    read back: the entries of ``spec``, its fixed keys, the bias flags from ``tensor_names`` (the
    file's tensors) and the special token ids. ``tensor(name)`` returns a configuration tensor's
    float32 values or None; ``gguf_arch`` is the file's key prefix (default ``spec.gguf_arch``)."""
    reader = _Reader(metadata, gguf_arch or spec.gguf_arch, source, tensor)
    cfg: dict[str, Any] = {"architectures": [spec.hf_class], "model_type": spec.model_type, **spec.hf_defaults}
    for e in spec.entries:
        e.read(reader, cfg)
    key_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    value_dim = reader.get("attention.value_length", key_dim)
    if int(value_dim) != key_dim:
        raise ModelError(
            f"{source}: key_length {key_dim} != value_length {value_dim} is not supported for {reader.arch}"
        )
    present = set(tensor_names)
    cfg["tie_word_embeddings"] = "output.weight" not in present
    if spec.tensor_flags:
        names = TensorNames(spec, 1)
        for key, hf in spec.tensor_flags.items():
            cfg[key] = names.gguf_name(hf) in present
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if (v := metadata.get(f"tokenizer.ggml.{name}_token_id")) is not None:
            cfg[key] = int(v)
    return cfg


# ---------------------------------------------------------------------------------------------
# The support matrix (README), generated from the table

MATRIX_COLUMNS = ("train", "QLoRA", "fuse", "GGUF export", "GGUF import", "GGUF LoRA", "PEFT")


def support_row(spec: ArchSpec) -> dict[str, str]:
    """What the tool does for ``spec``'s family, column by column (each backed by a test that runs
    the family's tiny model through it)."""
    back = spec_for_gguf(spec.gguf_arch, {f"{spec.gguf_arch}.expert_count": 1} if spec.moe else {})
    return {
        "train": "yes",
        "QLoRA": "yes, fuse onto the float base" if spec.moe else "yes",
        "fuse": "yes",
        "GGUF export": "yes",
        "GGUF import": "yes" if back is spec else f"yes, as `{back.model_type}`",
        "GGUF LoRA": ("attention, router" if spec.moe else "yes") if spec.gguf_lora else "no",
        "PEFT": "yes" if spec.peft == "yes" else "non-expert layers (experts: fuse)",
    }


def support_matrix_markdown() -> str:
    """The README's support matrix: one row per family of :data:`ARCHS`."""
    head = ["family (`model_type`)", "GGUF architecture", *MATRIX_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in ARCHS.values():
        row = support_row(spec)
        lines.append(
            "| " + " | ".join([f"`{spec.model_type}`", f"`{spec.gguf_arch}`", *(row[c] for c in MATRIX_COLUMNS)]) + " |"
        )
    return "\n".join(lines)
