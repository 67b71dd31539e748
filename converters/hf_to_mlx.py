"""Convert a Hugging Face checkpoint (folder or hub repo) or a GGUF file into an MLX model folder.

The MLX folder is what mlx-lm's ``convert`` writes and its ``load`` reads: ``config.json`` (with
``"quantization": {"group_size", "bits", "mode"}`` and per-layer overrides when quantized),
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
with mlx-lm parameter names (its ``sanitize`` applied), the tokenizer files and
``generation_config.json``.

Memory: every source tensor is mapped lazily (``mx.load`` on safetensors) and each output
tensor is computed, written and freed before the next, so the peak is about one tensor (its
source, cast and quantized forms), never a second copy of the model. mlx-lm's ``sanitize`` runs
on the lazy arrays of all shards at once, so renames and merges that span shards are exact.

Quantization is MLX affine: each group of ``group_size`` consecutive input weights of a row
stores ``bits``-bit integers ``q`` with ``w ~ scale * q + bias``. Linear and embedding layers
whose input size is a multiple of ``group_size`` are quantized, except those matched by ``keep``
(left in the float dtype, or given their own bit width with ``PATTERN=BITS``).
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora.converters import io
from mlx_lora.converters.config_spellings import normalize as normalize_spelling
from mlx_lora.converters.gguf_import import import_gguf
from mlx_lora.model.loading import resolve
from mlx_lora.plumbing.errors import ExportError, ModelError
from mlx_lora.plumbing.io import temp_prefix
from mlx_lora.plumbing.mlx_lm_compat import model_classes as _get_classes
from mlx_lora.plumbing.ownership import check_output_dir

PathLike = Union[str, os.PathLike]

QUANT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
)
_TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def convert(
    src: str,
    out_dir: PathLike,
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    keep: Optional[list[str]] = None,
    revision: Optional[str] = None,
    keep_quantized: bool = False,
    hf: bool = False,
    overwrite: bool = False,
    show_progress: Optional[bool] = None,
    max_shard_bytes: int = io.MAX_SHARD_BYTES,
) -> Path:
    """Convert ``src`` (local HF folder, hub repo id, or ``.gguf`` file) into ``out_dir``.

    ``dtype``: float32, float16 or bfloat16 for float tensors (default: as stored).
    ``quantize``: MLX affine quantization with ``bits`` (2, 3, 4, 5, 6, 8) and ``group_size``
    (32, 64, 128); ``keep`` lists module patterns kept in float (``lm_head``, ``embeddings``,
    ``*.down_proj``, ``re:...``) or quantized at other bits (``lm_head=8``).
    GGUF only: ``keep_quantized`` stores the file's Q4_0/Q4_1/Q8_0 weights MLX-quantized as they
    are; ``hf`` asks for a plain Hugging Face folder (dequantized, loadable by transformers).
    The output is written atomically: it is complete or absent. Returns ``out_dir``.
    """

    _check_options(quantize, bits, group_size, keep, dtype)
    out_dir = check_output_dir(out_dir, "model", overwrite=overwrite)  # before any download or work
    src_path = Path(str(src)).expanduser()
    if src_path.suffix.lower() == ".gguf":
        return _convert_gguf(
            src_path,
            out_dir,
            dtype=dtype,
            quantize=quantize,
            bits=bits,
            group_size=group_size,
            keep=keep,
            keep_quantized=keep_quantized,
            hf=hf,
            overwrite=overwrite,
            show_progress=show_progress,
            max_shard_bytes=max_shard_bytes,
        )
    if keep_quantized:
        raise ExportError("--keep-quantized applies to GGUF sources only")
    if hf:
        raise ExportError("--hf applies to GGUF sources only (a Hugging Face folder is already in HF layout)")

    folder, _ = resolve(str(src), revision)
    return convert_folder(
        folder,
        out_dir,
        dtype=dtype,
        quantize=quantize,
        bits=bits,
        group_size=group_size,
        keep=keep,
        overwrite=overwrite,
        show_progress=show_progress,
        max_shard_bytes=max_shard_bytes,
    )


def _check_options(quantize: bool, bits: int, group_size: int, keep: Optional[list[str]], dtype: Optional[str]) -> None:
    if dtype is not None:
        io.mx_dtype(dtype)
    if quantize:
        if bits not in QUANT_BITS:
            raise ExportError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, QUANT_BITS))}")
        if group_size not in GROUP_SIZES:
            raise ExportError(
                f"--group-size {group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}"
            )
    elif keep:
        raise ExportError("--keep chooses layers to leave unquantized; it needs -q/--quantize")


def _convert_gguf(
    src: Path,
    out_dir,
    *,
    dtype,
    quantize,
    bits,
    group_size,
    keep,
    keep_quantized,
    hf,
    overwrite,
    show_progress,
    max_shard_bytes,
) -> Path:

    if hf and (quantize or keep_quantized):
        raise ExportError(
            "--hf writes a plain (dequantized) Hugging Face folder; it cannot be combined with -q or --keep-quantized"
        )
    if quantize and keep_quantized:
        raise ExportError(
            "choose either -q (re-quantize with MLX) or --keep-quantized (keep the GGUF's own quantization)"
        )
    if not quantize:
        return import_gguf(
            src, out_dir, keep_quantized=keep_quantized, dtype=dtype, overwrite=overwrite, show_progress=show_progress
        )
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Dequantize next to the output (same disk), then quantize from there.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=temp_prefix(out.name), suffix=".gguf-import.tmp") as tmp:
        staged = import_gguf(src, Path(tmp) / "hf", dtype=dtype, show_progress=show_progress)
        return convert_folder(
            staged,
            out,
            quantize=True,
            bits=bits,
            group_size=group_size,
            keep=keep,
            overwrite=overwrite,
            show_progress=show_progress,
            max_shard_bytes=max_shard_bytes,
        )


# ---------------------------------------------------------------------------------------------
# Keep patterns


def parse_keep(keep: Optional[list[str]]) -> list[tuple[str, Optional[int]]]:
    """``["lm_head", "embeddings=8"]`` -> ``[("lm_head", None), ("embeddings", 8)]``."""
    out = []
    for item in keep or []:
        pattern, bits = item, None
        if "=" in item and item.rsplit("=", 1)[1].strip().isdigit():
            pattern, b = item.rsplit("=", 1)
            bits = int(b)
            if bits not in QUANT_BITS:
                raise ExportError(f"--keep {item!r}: bits must be one of {', '.join(map(str, QUANT_BITS))}")
        pattern = pattern.strip()
        if not pattern:
            raise ExportError(f"--keep {item!r}: empty pattern")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ExportError(f"--keep {item!r}: invalid regular expression ({e})") from None
        out.append((pattern, bits))
    return out


def _matches(pattern: str, path: str, module) -> bool:
    """Whether a keep pattern selects the module at ``path``.

    ``embeddings`` selects every embedding table; ``re:X`` is a regex matched against the whole
    path; anything else is a glob matched against the path or any dotted suffix of it, so
    ``lm_head``, ``down_proj``, ``mlp.*`` and ``model.layers.0.*`` all work.
    """

    if pattern == "embeddings":
        return isinstance(module, nn.Embedding)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


# ---------------------------------------------------------------------------------------------
# Folder conversion


def _model_for(config: dict, config_path: Path):

    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(f"{config_path}: field 'model_type' is missing")
    if "quantization" in config or "quantization_config" in config:
        raise ModelError(
            f"{config_path}: the model is already quantized (field "
            f"'{'quantization' if 'quantization' in config else 'quantization_config'}'); "
            "convert from the unquantized checkpoint"
        )
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, ImportError):
        raise ModelError(
            f"{config_path}: unsupported architecture '{model_type}' (field 'model_type'): "
            "mlx-lm has no implementation of it"
        ) from None
    try:
        return model_class(args_class.from_dict(config))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(
            f"{config_path}: cannot build a '{model_type}' model from this config ({type(e).__name__}: {e})"
        ) from None


def _weight_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = io.read_json(index_path, "weight index")
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"{index_path}: field 'weight_map' is missing or empty")
        files = list(dict.fromkeys(wmap.values()))
        for f in files:
            if not (folder / f).is_file():
                raise ModelError(
                    f"{index_path}: names shard '{f}', which is missing from {folder} (incomplete download?)"
                )
        return [folder / f for f in files]
    files = sorted(folder.glob("model*.safetensors")) or sorted(
        p for p in folder.glob("*.safetensors") if not p.name.startswith(("adapter", "consolidated"))
    )
    if not files:
        hint = " (PyTorch .bin weights: convert them to safetensors first)" if any(folder.glob("*.bin")) else ""
        raise ModelError(f"{folder}: no *.safetensors weight files{hint}")
    return files


def _check_tokenizer(folder: Path) -> None:
    if not any(any(folder.glob(p)) for p in _TOKENIZER_MODELS):
        raise ModelError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or *.tiktoken); "
            f"copy the tokenizer from the original checkpoint into this folder"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            io.read_json(folder / name, "tokenizer file")


def convert_folder(
    folder: PathLike,
    out_dir: PathLike,
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    keep: Optional[list[str]] = None,
    overwrite: bool = False,
    show_progress: Optional[bool] = None,
    max_shard_bytes: int = io.MAX_SHARD_BYTES,
) -> Path:
    """Convert a local Hugging Face folder to an MLX folder; see :func:`convert`."""

    _check_options(quantize, bits, group_size, keep, dtype)
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder}: config.json not found; not a model folder")
    config = io.read_json(config_path, "model config")
    model = _model_for(normalize_spelling(config), config_path)
    _check_tokenizer(folder)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    # Map every shard lazily; remember where each tensor came from for error messages.
    origin: dict[str, Path] = {}
    weights: dict = {}
    for f in _weight_files(folder):
        for name, arr in io.load_safetensors(f).items():
            if name in origin:
                raise ModelError(f"{f}: tensor '{name}' is also in {origin[name].name}")
            origin[name] = f
            weights[name] = arr
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelError(
            f"{folder}: weight files lack {len(missing)} tensor(s) the model needs: {', '.join(missing[:8])}"
        )
    for name, arr in weights.items():
        where = origin[name] if name in origin else folder
        if name not in expected:
            raise ModelError(
                f"{where}: tensor '{name}' does not belong to a '{config['model_type']}' model (unexpected tensor)"
            )
        if tuple(arr.shape) != expected[name]:
            raise ModelError(
                f"{where}: tensor '{name}' has shape {list(arr.shape)}, the config implies {list(expected[name])}"
            )

    target = io.mx_dtype(dtype) if dtype else None
    cast_ok = getattr(model, "cast_predicate", lambda _k: True)

    def out_dtype(name, arr):
        if target is not None and mx.issubdtype(arr.dtype, mx.floating) and cast_ok(name):
            return target
        return arr.dtype

    quant_specs = _quantization_plan(model, weights, bits, group_size, keep) if quantize else {}

    # Output in source order (sequential reads); tensors sanitize created go last.
    order = sorted(weights, key=lambda n: (str(origin.get(n, "~")), n))
    groups = []
    for name in order:
        arr = weights[name]
        dt = out_dtype(name, arr)
        module_path = name.rsplit(".", 1)[0]
        spec = quant_specs.get(module_path) if name.endswith(".weight") else None
        if spec is None:
            tensors = [io.PendingTensor(name, tuple(arr.shape), io.dtype_name(dt))]

            def compute(name=name, dt=dt):
                a = weights.pop(name)
                return [a.astype(dt) if a.dtype != dt else a]
        else:
            g, b = spec["group_size"], spec["bits"]
            rows, cols = arr.shape[:-1], arr.shape[-1]
            tensors = [
                io.PendingTensor(f"{module_path}.weight", (*rows, cols * b // 32), "uint32"),
                io.PendingTensor(f"{module_path}.scales", (*rows, cols // g), io.dtype_name(dt)),
                io.PendingTensor(f"{module_path}.biases", (*rows, cols // g), io.dtype_name(dt)),
            ]

            def compute(name=name, dt=dt, g=g, b=b):
                a = weights.pop(name)
                return list(mx.quantize(a.astype(dt), group_size=g, bits=b))

        groups.append((tensors, compute))

    out_config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if dtype:
        out_config["torch_dtype"] = dtype
        if "dtype" in out_config:  # transformers 5 spelling
            out_config["dtype"] = dtype
    if quantize:
        quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
        for path, spec in sorted(quant_specs.items()):
            if (spec["bits"], spec["group_size"]) != (bits, group_size):
                quantization[path] = spec
        for path in sorted(_kept(model, keep, quant_specs)):
            quantization[path] = False
        out_config["quantization"] = quantization
        out_config["quantization_config"] = quantization

    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        io.write_sharded(
            tmp, groups, metadata={"format": "mlx"}, max_shard_bytes=max_shard_bytes, show_progress=show_progress
        )
        io.write_json(tmp / "config.json", dict(sorted(out_config.items())))
        io.copy_files(folder, tmp, list(TOKENIZER_FILES) + ["generation_config.json"])
    return Path(out_dir).expanduser()


def _quantization_plan(model, weights: dict, bits: int, group_size: int, keep: Optional[list[str]]) -> dict[str, dict]:
    """``{module_path: {"group_size", "bits", "mode"}}`` for every layer to quantize."""
    patterns = parse_keep(keep)
    used = set()
    predicate = getattr(model, "quant_predicate", None)
    plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or f"{path}.weight" not in weights:
            continue
        spec = {"group_size": group_size, "bits": bits, "mode": "affine"}
        hit = next(((p, b) for p, b in patterns if _matches(p, path, module)), None)
        if hit is not None:
            used.add(hit[0])
            if hit[1] is None:
                continue
            spec["bits"] = hit[1]
        if weights[f"{path}.weight"].shape[-1] % spec["group_size"]:
            continue  # mlx-lm leaves such layers unquantized too
        if predicate is not None:
            verdict = predicate(path, module)
            if verdict is False:
                continue
            if isinstance(verdict, dict):
                spec = {**spec, **verdict}
        plan[path] = spec
    if not plan and not patterns:
        raise ExportError(
            f"nothing to quantize: no linear or embedding layer has an input size that is a multiple of the "
            f"group size {group_size}; choose a smaller --group-size"
        )
    unused = [p for p, _ in patterns if p not in used]
    if unused:
        raise ExportError(f"--keep pattern(s) {', '.join(map(repr, unused))} match no quantizable layer of this model")
    return plan


def _kept(model, keep: Optional[list[str]], plan: dict) -> set[str]:
    patterns = [p for p, b in parse_keep(keep) if b is None]
    return {
        path
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and path not in plan and any(_matches(p, path, module) for p in patterns)
    }
