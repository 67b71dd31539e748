"""Per-architecture facts for writing GGUF files the way llama.cpp reads them.

For each supported Hugging Face ``model_type``: the GGUF architecture name, how tensor names map
(``gguf.get_tensor_name_map``, the gguf package's own table), which tensors are transformed on
the way and the ``<arch>.*`` metadata keys llama.cpp's loader reads.

Transforms (HF -> GGUF, all invertible):

- llama / mistral (GGUF arch ``llama``): llama.cpp applies rotary embeddings to adjacent pairs
  (GPT-J style), HF to the two halves of each head (NeoX style). The rows of ``q_proj`` and
  ``k_proj`` (weights and biases; ``k`` uses the key/value head count) are permuted per head so
  that HF row ``h*hd + t*hd/2 + j`` goes to GGUF row ``h*hd + 2*j + t`` (``t`` in {0, 1},
  ``j < hd/2``). Qwen2, Qwen3, Gemma 2 and Phi-3 use NeoX rotation in llama.cpp too: no permutation.
- gemma2: HF stores RMSNorm scales minus one (the layer computes ``x * (1 + w)``); GGUF stores the
  full scale, so ``1`` is added to every ``*norm.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlx_lora.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str        # Hugging Face model_type
    gguf_arch: str         # general.architecture
    permute_qk: bool       # GPT-J style rotary rows in llama.cpp
    norm_offset: float     # added to RMSNorm weights on export


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", True, 0.0),
    "mistral": ArchSpec("mistral", "llama", True, 0.0),
    "qwen2": ArchSpec("qwen2", "qwen2", False, 0.0),
    "qwen3": ArchSpec("qwen3", "qwen3", False, 0.0),
    "gemma2": ArchSpec("gemma2", "gemma2", False, 1.0),
    "phi3": ArchSpec("phi3", "phi3", False, 0.0),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise ExportError(
            f"GGUF export does not support architecture '{model_type}'; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[model_type]


def _gguf_arch_enum(spec: ArchSpec):
    import gguf

    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == spec.gguf_arch:
            return enum
    raise ExportError(f"the installed gguf package does not know architecture '{spec.gguf_arch}'")


class TensorNames:
    """HF tensor name -> GGUF tensor name for one model (``gguf``'s mapping table)."""

    def __init__(self, spec: ArchSpec, n_blocks: int):
        import gguf

        self.spec = spec
        self._map = gguf.get_tensor_name_map(_gguf_arch_enum(spec), n_blocks)

    def gguf_name(self, hf_name: str) -> str:
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"tensor '{hf_name}' has no GGUF counterpart in llama.cpp's '{self.spec.gguf_arch}' architecture"
            )
        return name

    def gguf_module(self, hf_module: str) -> str:
        """``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight`` (a LoRA target's weight)."""
        return self.gguf_name(hf_module + ".weight")


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


def from_gguf(spec: ArchSpec, config: dict, hf_name: str, w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_gguf`."""
    if spec.norm_offset and is_norm(hf_name):
        w = w - np.float32(spec.norm_offset)
    perm = row_permutation(spec, config, hf_name, w.shape[0])
    if perm is not None:
        out = np.empty_like(w)
        out[perm] = w
        w = out
    return w


# ---------------------------------------------------------------------------------------------
# Metadata


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_params(config: dict) -> dict:
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


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


def extra_tensors(spec: ArchSpec, config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the HF checkpoint does not hold (rope factors)."""
    out = {}
    if spec.gguf_arch == "llama" and (f := llama3_rope_factors(config)) is not None:
        out["rope_freqs.weight"] = f
    if spec.gguf_arch == "phi3":
        rope = _rope_params(config)
        if rope.get("long_factor"):
            n = head_dim(config) * float(config.get("partial_rotary_factor", 1.0))
            long, short = rope["long_factor"], rope.get("short_factor")
            if short is None or len(long) != len(short) or len(long) != int(n) // 2:
                raise ExportError(f"rope_scaling long_factor/short_factor must each have {int(n) // 2} entries")
            out["rope_factors_long.weight"] = np.asarray(long, np.float32)
            out["rope_factors_short.weight"] = np.asarray(short, np.float32)
    return out


def write_metadata(writer, spec: ArchSpec, config: dict, file_type: int) -> None:
    """The ``<arch>.*`` hyper-parameters llama.cpp reads for ``spec``."""
    import gguf

    c = config
    n_head = int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    writer.add_block_count(int(c["num_hidden_layers"]))
    writer.add_context_length(int(c.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(int(file_type))
    rope = _rope_params(c)
    theta = c.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if c.get("head_dim"):
        writer.add_key_length(int(c["head_dim"]))
        writer.add_value_length(int(c["head_dim"]))

    rope_type = str(rope.get("rope_type") or "").lower()
    if spec.gguf_arch != "phi3" and rope_type not in ("", "default", "llama3"):
        factor = rope.get("factor")
        if rope_type == "linear" and factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(factor))
        elif rope_type == "yarn" and factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(factor))
            if rope.get("original_max_position_embeddings"):
                writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        else:
            raise ExportError(f"config.json: rope_scaling type '{rope_type}' is not supported by the GGUF exporter")

    if spec.gguf_arch == "llama":
        writer.add_vocab_size(int(c["vocab_size"]))
        writer.add_rope_dimension_count(head_dim(c))
    elif spec.gguf_arch == "gemma2":
        if not c.get("head_dim"):
            writer.add_key_length(head_dim(c))
            writer.add_value_length(head_dim(c))
        if c.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(c["attn_logit_softcapping"]))
        if c.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        if c.get("sliding_window"):
            writer.add_sliding_window(int(c["sliding_window"]))
    elif spec.gguf_arch == "phi3":
        orig = c.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
        rot = float(c.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(rot * int(c["hidden_size"])) // n_head)
        # 0 marks "no sliding window" to llama.cpp (Phi-4 style models)
        writer.add_sliding_window(int(c.get("sliding_window") or 0))
        if rope.get("long_factor"):
            scale = float(c["max_position_embeddings"]) / float(orig)
            if rope_type in ("su", "longrope"):
                attn = math.sqrt(1 + math.log(scale) / math.log(float(orig))) if scale > 1.0 else 1.0
            elif rope_type == "yarn":
                attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
            else:
                raise ExportError(f"config.json: phi3 rope_scaling type '{rope_type}' is not supported")
            writer.add_rope_scaling_attn_factors(attn)

