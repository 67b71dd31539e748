"""Resolve a model from any source and load it with mlx-lm's architectures.

Sources: a local Hugging Face folder (HF tensor names; mlx-lm's ``sanitize`` maps them), an
MLX-converted folder (possibly quantized: QLoRA base), a Hugging Face repo id (downloaded with
huggingface-hub), or a ``.gguf`` file (imported once into a cache folder by ``converters``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from mlx_lora.config import CHOICES, Bound, show
from mlx_lora.converters.config_spellings import normalize as normalize_spelling
from mlx_lora.converters.gguf_import import gguf_cache_dir, import_gguf
from mlx_lora.model.integrity import check_safetensors
from mlx_lora.model.lora import dense_weight, make_switch_linear
from mlx_lora.plumbing import backend
from mlx_lora.plumbing.backend import backend_name, compute_dtype, fmt_bytes
from mlx_lora.plumbing.errors import ModelError
from mlx_lora.plumbing.hub import download
from mlx_lora.plumbing.mlx_lm_compat import model_classes, switch_linear_classes

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelInfo:
    source: str  # what the user asked for
    local_path: Path  # the folder actually loaded
    kind: str  # "folder", "hub" or "gguf"
    model_type: str
    config: dict
    quantization: Optional[dict]
    dtype: Any  # compute dtype (mx.Dtype)
    compute: Optional[str] = None  # how a quantized base is computed, for the banner (see plan_cpu_compute)


def resolve(source: str, revision: Optional[str] = None, keep_quantized: bool = False) -> tuple[Path, str]:
    """Turn a model reference into a local folder; returns (folder, kind)."""
    if not source:
        raise ModelError("no model given: pass --model PATH_OR_HF_ID")
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")

        out = gguf_cache_dir(path, keep_quantized=keep_quantized)
        if not (out / "config.json").is_file():
            import_gguf(path, out, keep_quantized=keep_quantized)
        return out, "gguf"
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; expected a model folder (config.json + *.safetensors) or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder: it has no config.json")
        if not any(path.glob("*.safetensors")):
            hint = " (PyTorch .bin weights: convert them to safetensors first)" if any(path.glob("*.bin")) else ""
            raise ModelError(f"{path} has no *.safetensors weight files{hint}")
        return path, "folder"
    if source.startswith((".", "/", "~")) or not REPO_ID.match(source):
        raise ModelError(f"model path does not exist: {path}")

    return download(source, revision), "hub"


MAX_CONFIG_BYTES = 64 * 2**20
"""A config.json is kilobytes; a larger file is not one, and reading it whole could exhaust memory."""

# Sizes that config.json gives and the architectures build layers from, with bounds far beyond any
# published model: a value past them is a typo (an extra zero) that would make mlx-lm build
# millions of layers or allocate terabytes before any weight is read. Several names mean the same
# size in different families (GPT-2's n_layer). intermediate_size may be a list (one per layer).
SIZE_KEYS = {
    "hidden_size": ("hidden", 2**17),
    "n_embd": ("hidden", 2**17),
    "d_model": ("hidden", 2**17),
    "num_hidden_layers": ("layers", 4096),
    "n_layer": ("layers", 4096),
    "num_layers": ("layers", 4096),
    "intermediate_size": ("intermediate", 2**20),
    "n_inner": ("intermediate", 2**20),
    "num_attention_heads": ("heads", 4096),
    "n_head": ("heads", 4096),
    "num_key_value_heads": ("kv_heads", 4096),
    "head_dim": ("head_dim", 2**14),
    "vocab_size": ("vocab", 2**24),
    "num_local_experts": ("experts", 4096),
    "num_experts": ("experts", 4096),
    "n_routed_experts": ("experts", 4096),
}
# Sizes that may be null (the architecture then derives them, or has none), and sizes that may be 0.
NULLABLE_SIZES = {
    "num_key_value_heads",
    "head_dim",
    "n_inner",
    "intermediate_size",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
}
MAY_BE_ZERO = {"intermediate", "experts"}


def read_config(folder: Path, spelling: bool = True) -> dict:
    """config.json of a model folder, with the types and sizes of the keys that decide what gets
    built checked (see :func:`check_config`); with ``spelling``, transformers 5 names come with
    the transformers 4 names mlx-lm reads (:mod:`mlx_lora.converters.config_spellings`)."""
    cfg_path = folder / "config.json"
    try:
        size = cfg_path.stat().st_size
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if size <= MAX_CONFIG_BYTES else None
    except RecursionError:
        raise ModelError(f"{cfg_path}: cannot read (JSON nested too deeply)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path}: cannot read ({str(e)[:200]})") from None
    if size > MAX_CONFIG_BYTES:
        raise ModelError(f"{cfg_path}: {size:,} bytes is far too large for a model config")
    check_config(config, cfg_path)
    return normalize_spelling(config) if spelling else config


REMOTE_CODE_FLAG = (
    "model.trust_remote_code: true (train: in the config or --set) or --trust-remote-code (generate, "
    "eval, chat, serve), "
    "only if you trust the code in it"
)
"""How a user lets a model folder run its own code, named by every refusal."""


def remote_code(folder: Path) -> list[tuple[Path, str, str]]:
    """Where ``folder`` asks to run code it ships: (file, field, what) for ``auto_map`` in
    ``config.json`` / ``tokenizer_config.json`` and mlx-lm's ``model_file``. Reading only."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        try:
            data = (
                json.loads(path.read_text(encoding="utf-8"))
                if path.is_file() and path.stat().st_size <= MAX_CONFIG_BYTES
                else None
            )
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        auto = data.get("auto_map")
        refs = list(auto.values()) if isinstance(auto, dict) else auto if isinstance(auto, list) else []
        refs = [r for ref in refs for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str) and r]
        if refs:
            found.append((path, "auto_map", refs[0]))
        if name == "config.json" and isinstance(data.get("model_file"), str):
            found.append((path, "model_file", data["model_file"]))
    return found


def remote_code_error(folder: Path, asks: list[tuple[Path, str, str]]) -> ModelError:
    path, field, what = asks[0]
    return ModelError(
        f"{path}: field '{field}' asks to run code shipped in {folder} ({what}); it was not run. "
        f"To allow it, set {REMOTE_CODE_FLAG}"
    )


class _NoAnswer(io.StringIO):
    """Standard input while a model loads: every read is at its end, so a library that asks
    (transformers' "Do you wish to run the custom code? [y/N]") gets no answer from a pipe."""

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def no_stdin():
    """Nothing a library reads from standard input inside this block comes from the user: a
    question on stdin (``input()``) ends at once with EOFError. Restores ``sys.stdin`` after."""
    saved = sys.stdin
    sys.stdin = _NoAnswer()
    try:
        yield
    finally:
        sys.stdin = saved


def _size_keys(config: dict) -> list[tuple[str, str, Any]]:
    """(name for messages, meaning, value) of every size key, top level and in text_config."""
    found = []
    for prefix, section in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(section, dict):
            found += [(prefix + k, SIZE_KEYS[k][0], section[k]) for k in SIZE_KEYS if k in section]
    return found


def _sizes(config: dict) -> dict[str, tuple[str, int]]:
    """meaning -> (key, value) of the first size key given for each meaning; a per-layer list
    counts as its smallest entry. Call after :func:`check_config`."""
    sizes: dict[str, tuple[str, int]] = {}
    for key, meaning, value in _size_keys(config):
        if value is not None and meaning not in sizes:
            sizes[meaning] = (key, min(value) if isinstance(value, list) else value)
    return sizes


def check_config(config: Any, cfg_path: Path) -> None:
    """Refuse a config.json whose keys have the wrong type or absurd sizes, or whose sizes need far
    more weights than the folder's safetensors files hold, before anything is built from it.
    Every message names config.json and the key."""

    def bad(key: str, problem: str):
        raise ModelError(f"{cfg_path}: '{key}': {problem}")

    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path}: expected a JSON object, got {show(config)}")
    model_type = config.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or not model_type.strip()):
        bad("model_type", f"must be an architecture name (a string), got {show(model_type)}")
    if config.get("text_config") is not None and not isinstance(config["text_config"], dict):
        bad("text_config", f"must be an object, got {show(config['text_config'])}")
    eos = config.get("eos_token_id")  # handed to the tokenizer
    token_id = Bound(int, 0, 2**31 - 1)
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and (not eos_ids or any(token_id.violation(t) for t in eos_ids)):
        bad("eos_token_id", f"must be a token id or a list of token ids, got {show(eos)}")
    if config.get("tie_word_embeddings") is not None and not isinstance(config["tie_word_embeddings"], bool):
        bad("tie_word_embeddings", f"must be true or false, got {show(config['tie_word_embeddings'])}")
    quant = config.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict):
            bad("quantization", f"must be an object with bits and group_size, got {show(quant)}")
        for key, bound in (("bits", Bound(int, 1, 8)), ("group_size", Bound(int, 1, 2**16))):
            problem = bound.violation(quant.get(key))
            if problem:
                bad(f"quantization.{key}", problem)
    for key, meaning, value in _size_keys(config):
        name = key.rsplit(".", 1)[-1]
        bound = Bound(int, 0 if meaning in MAY_BE_ZERO else 1, SIZE_KEYS[name][1], nullable=name in NULLABLE_SIZES)
        for v in value if meaning == "intermediate" and isinstance(value, list) and value else [value]:
            problem = bound.violation(v)
            if problem:
                bad(key, problem)

    files = [f for f in cfg_path.parent.glob("*.safetensors") if f.is_file()]
    sizes = _sizes(config)
    if not files or "hidden" not in sizes:
        return  # nothing to compare with (a folder being assembled, an unusual family)
    on_disk = sum(f.stat().st_size for f in files)
    need = weight_lower_bound(sizes) * (_fewest_bits(config) or 8) / 8  # 8 bits: FP8, the smallest float
    # Twice the files leaves room for architectures where the bound is loose; a wrong size is off
    # by orders of magnitude.
    if need > 2 * on_disk + 2**20:
        raise ModelError(
            f"{cfg_path}: its sizes ({_size_summary(sizes)}) mean at least {fmt_bytes(need)} of "
            f"weights, but the weight files hold {fmt_bytes(on_disk)}; config.json does not match "
            f"the weights"
        )


def weight_lower_bound(sizes: dict[str, tuple[str, int]]) -> int:
    """Fewest weights a model with these sizes can have: the embedding table, and per block at least
    one hidden x hidden projection (attention, or what replaces it) and an MLP (up and down) of
    intermediate_size. No architecture has less; mixture-of-experts ones have far more."""

    def get(meaning):
        return sizes[meaning][1] if meaning in sizes else 0

    h = get("hidden")
    return get("vocab") * h + get("layers") * (h * h + 2 * h * get("intermediate"))


def _fewest_bits(config: dict) -> Optional[float]:
    """Fewest bits a weight of this quantized model is stored in; None when it is not quantized."""
    quant = config.get("quantization")
    if isinstance(quant, dict):
        # per-layer overrides (mixed-precision quantization) are objects of their own
        bits = [
            v
            for v in [quant.get("bits")] + [q.get("bits") for q in quant.values() if isinstance(q, dict)]
            if isinstance(v, int)
        ]
        return min(bits or [1])
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if "quantization_config" in config or "quantization_config" in text:
        return 1  # GPTQ, AWQ, bitsandbytes, ternary...: some pack weights below 2 bits
    return None


def _size_summary(sizes: dict[str, tuple[str, int]]) -> str:
    return ", ".join(
        f"{sizes[m][0]}={sizes[m][1]}" for m in ("layers", "hidden", "intermediate", "vocab") if m in sizes
    )


def check_fits_in_memory(config: dict, cfg_path: Path, dtype) -> None:
    """Refuse a model whose weights alone, at the compute ``dtype`` (quantized ones stay packed),
    exceed the machine's memory: loading it would only end in an out-of-memory kill."""

    sizes = _sizes(config)
    if "hidden" not in sizes:
        return
    bits = _fewest_bits(config)  # quantized weights stay packed; the others take the compute dtype
    need = weight_lower_bound(sizes) * (dtype.size if bits is None else bits / 8)
    total = backend.total_memory_bytes()
    if total and need > total:
        raise ModelError(
            f"{cfg_path}: its sizes ({_size_summary(sizes)}) mean at least {fmt_bytes(need)} of "
            f"weights in {str(dtype).replace('mlx.core.', '')}, more than this machine's "
            f"{fmt_bytes(total)} of memory"
        )


def _name_damaged_weight_file(folder: Path) -> None:
    """Raise a ModelError naming the truncated or corrupt weight file and tensor, if one is."""

    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)


QUANTIZED_CPU_SLOWDOWN = "10-30x"
"""How much slower a step is with quantized matmuls than with float32 weights on the CPU backend
(mlx has no fast CPU kernel for them), measured on a 2-core x86 box with OpenBLAS: 13-15x per
step for SmolLM2-135M on short rows (batch 4, ~90 tokens), 31-35x per layer forward+backward at
its shapes (matmuls weigh more as rows grow)."""
DEQUANTIZE_MEMORY_SHARE = 0.5
"""Dequantized weights may take at most this share of the available memory: the rest is for the
activations, the logits and their gradients, which on long rows outgrow a small model's weights."""


def _quantized_modules(model) -> list[tuple[str, Any]]:
    """Quantized linear, embedding and expert (``QuantizedSwitchLinear``) layers."""

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, switch_linear_classes()[1])
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kinds)]


def _logical_size(m) -> int:
    *lead, packed = m.weight.shape
    return math.prod(lead) * (packed * 32 // m.bits)


def dequantized_bytes(model, dtype) -> int:
    """Size of the model's quantized layers once dequantized to ``dtype``."""
    return sum(_logical_size(m) * dtype.size for _, m in _quantized_modules(model))


def dequantize_layers(model, dtype) -> int:
    """Replace every ``QuantizedLinear`` / ``QuantizedEmbedding`` / ``QuantizedSwitchLinear`` with a
    float ``Linear`` / ``Embedding`` / ``SwitchLinear`` holding exactly the values the quantized
    layer computes with; returns how many. One layer at a time, so the packed and dense copies
    never both exist for the whole model."""

    found = _quantized_modules(model)
    for path, m in found:
        w = dense_weight(m).astype(dtype)
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):  # experts
            new = make_switch_linear(w, m.get("bias"))
        else:
            # Built without __init__: the constructors draw random initial weights, which would move
            # the seeded random stream and give the LoRA matrices another start than on the quantized path.
            cls = nn.Embedding if isinstance(m, nn.QuantizedEmbedding) else nn.Linear
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            new.weight = w
            if "bias" in m:
                new.bias = m.bias
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(path, new)]))
    return len(found)


def plan_cpu_compute(model, info: "ModelInfo", mode: str) -> Optional[str]:
    """Decide how a quantized base computes on the CPU backend and do it: with ``mode`` auto
    (dequantize when it fits in :data:`DEQUANTIZE_MEMORY_SHARE` of the available memory), true or
    false. Returns the banner's line (None when there is nothing to decide: a float base, a GPU).

    Only the computation changes: ``info`` keeps the quantized folder, so the adapter records that
    folder and its fingerprint, and fuse/export load it quantized as before."""

    if not info.quantization or backend_name() != "cpu" or not _quantized_modules(model):
        return None
    need, avail = dequantized_bytes(model, info.dtype), backend.available_memory_bytes()
    fits = avail is None or need <= DEQUANTIZE_MEMORY_SHARE * avail
    dtype = str(info.dtype).replace("mlx.core.", "")
    room = f"{fmt_bytes(need)} of {fmt_bytes(avail)} available"
    if mode == "true" or (mode == "auto" and fits):
        n = dequantize_layers(model, info.dtype)
        forced = "" if fits else "; forced by model.dequantize_on_cpu: true past the safe share"
        return (
            f"dequantized: {n} quantized layers computed as {dtype} ({room}{forced}), since the CPU "
            f"backend has no fast quantized matmul; the adapter's base stays the quantized folder"
        )
    why = (
        "model.dequantize_on_cpu: false"
        if mode == "false"
        else f"dequantized weights need {room}, more than the safe share"
    )
    return (
        f"quantized: WARNING: {QUANTIZED_CPU_SLOWDOWN} slower per step than {dtype} weights "
        f"(the CPU backend has no fast quantized matmul); {why}"
    )


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    keep_quantized: bool = False,
    with_tokenizer: bool = True,
    dequantize_on_cpu: Optional[str] = None,
):
    """Load (model, tokenizer, ModelInfo). Float weights are cast to the compute dtype; quantized
    weights stay packed (QLoRA); LoRA weights are float32 whatever the compute dtype.

    ``dequantize_on_cpu`` (auto, true, false; see :func:`plan_cpu_compute`) lets a quantized base
    compute dequantized on the CPU backend; None (fuse, export) keeps the layers quantized."""

    if dtype not in CHOICES["model.dtype"]:
        raise ModelError(f"dtype {show(dtype)} is not one of {', '.join(CHOICES['model.dtype'])}")
    if dequantize_on_cpu is not None and dequantize_on_cpu not in CHOICES["model.dequantize_on_cpu"]:
        raise ModelError(
            f"dequantize_on_cpu {show(dequantize_on_cpu)} is not one of {', '.join(CHOICES['model.dequantize_on_cpu'])}"
        )
    # Resolve first: a wrong path is reported before the multi-second mlx-lm import.
    folder, kind = resolve(source, revision, keep_quantized=keep_quantized)

    raw = read_config(folder, spelling=False)
    config = normalize_spelling(raw)
    # mlx-lm reads config.json itself: it gets the names normalize_spelling added
    added = {k: v for k, v in config.items() if k not in raw or raw[k] != v}
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(f"{folder / 'config.json'}: field 'model_type' is missing")
    target = compute_dtype(dtype)
    check_fits_in_memory(config, folder / "config.json", target)
    try:
        model_classes(config)
    except (ValueError, ImportError, ModuleNotFoundError):
        raise ModelError(
            f"{folder / 'config.json'}: architecture '{model_type}' is not supported by the installed "
            f"mlx-lm; upgrade mlx-lm or use a supported model"
        ) from None
    trust_remote_code = trust_remote_code is True  # always an explicit bool: None would let transformers ask
    asks = remote_code(folder)
    if not trust_remote_code and any(field == "model_file" for _, field, _ in asks):
        raise remote_code_error(folder, [a for a in asks if a[1] == "model_file"])
    try:
        with no_stdin():
            model, config = mlx_lm_load_model(
                folder, lazy=True, strict=True, model_config=added, trust_remote_code=trust_remote_code
            )
    except ValueError as e:
        msg = str(e)
        raise ModelError(f"{folder}: weights do not match the '{model_type}' architecture: {msg[:400]}") from None
    except FileNotFoundError as e:
        raise ModelError(f"{folder}: {e}") from None
    except Exception as e:  # truncated / corrupt safetensors surface here
        _name_damaged_weight_file(folder)
        raise ModelError(f"{folder}: cannot read the weights ({type(e).__name__}: {str(e)[:300]})") from None

    model.set_dtype(target, lambda x: mx.issubdtype(x, mx.floating))
    try:
        mx.eval(model.parameters())
    except Exception as e:
        _name_damaged_weight_file(folder)
        raise ModelError(f"{folder}: cannot read the weights ({type(e).__name__}: {str(e)[:300]})") from None
    tokenizer = None
    if with_tokenizer:
        try:
            # The flag goes to transformers explicitly (None would make it ask on stdin), and stdin
            # cannot answer any question it asks anyway.
            with no_stdin():
                tokenizer = load_tokenizer(
                    folder, {"trust_remote_code": trust_remote_code}, eos_token_ids=config.get("eos_token_id")
                )
        except Exception as e:
            if asks and not trust_remote_code and "trust_remote_code" in str(e):
                raise remote_code_error(folder, asks) from None
            raise ModelError(
                f"{folder}: cannot load the tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            ) from None
    info = ModelInfo(
        source=source,
        local_path=folder,
        kind=kind,
        model_type=model_type,
        config=config,
        quantization=config.get("quantization"),
        dtype=target,
    )
    if dequantize_on_cpu is not None:
        info.compute = plan_cpu_compute(model, info, dequantize_on_cpu)
    return model, tokenizer, info
