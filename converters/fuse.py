"""Fuse an adapter into its base model and write a Hugging Face-format folder.

Fusing replaces each adapted layer by one plain layer with

    LoRA:  W' = W + s B A                    (s = alpha / r, or alpha / sqrt(r) with rsLoRA)
    DoRA:  W' = m * (W + s B A) / ||W + s B A||_row

computed in float32 (``LoRALinear.fuse``). A quantized base is dequantized first. Each tensor is
then written in the precision it had in the source files (a bf16 checkpoint stays bf16; a
dequantized layer takes the dtype of its quantization scales), so fusing never silently
re-quantizes. Re-quantizing is an explicit option that reports, for every re-quantized layer,
the error it adds relative to the adapter's change ``||Q(W') - W'||_F / ||W' - W||_F``: a value
near or above 1 means quantization noise as large as the fine-tune itself.

Expert layers of mixture-of-experts models fuse per expert (``LoRASwitchLinear.fuse``) and are
written one matrix per expert, under the hub's names (:mod:`moe_layout`); an MLX-quantized output
keeps mlx-lm's stacked experts.

The output folder (``config.json``, ``model*.safetensors``, tokenizer files,
``generation_config.json``) loads in transformers and mlx-lm. It is assembled in a temporary
sibling folder and renamed into place only after verification passes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import make_shards

from mlx_lora.converters import verify as V
from mlx_lora.converters.io import disk_error, read_safetensors_header
from mlx_lora.converters.moe_layout import unstack_experts
from mlx_lora.model.adapters import adapter_layers, load_adapter, read_adapter
from mlx_lora.model.loading import load_model, read_config
from mlx_lora.model.lora import dense_weight, is_expert_layer
from mlx_lora.plumbing.errors import AdapterError, ExportError, ModelError
from mlx_lora.plumbing.io import atomic_write_json
from mlx_lora.plumbing.ownership import building, check_output_dir, check_output_file

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
QUANT_KEYS = ("quantization", "quantization_config")
MAX_SHARD_GB = 5


@dataclass
class FusedModel:
    """A base model with its adapter fused, held in float32, plus what is known about its source."""

    model: object  # mlx-lm nn.Module
    tokenizer: object
    info: object  # mlx_lora.model.loading.ModelInfo
    config: dict  # the source config.json
    adapter: object | None  # mlx_lora.model.adapters.AdapterInfo
    adapter_path: Path | None
    fused: list[str]  # module paths that were fused
    delta_norms: dict[str, float]  # path -> ||W' - W||_F
    source_dtypes: dict[str, str]  # tensor name -> dtype it is stored in
    default_dtype: str
    quantized: dict[str, dict] = field(default_factory=dict)  # module path -> {bits, group_size, mode}

    @property
    def model_type(self) -> str:
        return self.info.model_type

    def storage_dtype(self, name: str) -> str:
        """The dtype tensor ``name`` had in the source files (scales' dtype for a quantized weight)."""
        if name in self.source_dtypes:
            return self.source_dtypes[name]
        base = name.rsplit(".", 1)[0]
        return self.source_dtypes.get(base + ".scales", self.default_dtype)


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def safetensors_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> float dtype name, read from the headers of ``folder/*.safetensors``."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_safetensors_header(f)[0].items():
            if info.dtype in _ST_DTYPES:
                out[name] = _ST_DTYPES[info.dtype]
    return out


def _check_adapter_fits(adapter_path: Path, model_type: str) -> None:

    info, _ = read_adapter(adapter_path)
    trained_on = (info.extra or {}).get("model_type")
    if trained_on and trained_on != model_type:
        raise AdapterError(
            f"{adapter_path}: the adapter was trained on a '{trained_on}' model; this model is '{model_type}'"
        )


def resolve_model_source(model: str | None, adapter) -> str:
    """``--model``, or the adapter's ``base_model_name_or_path`` when it is not given."""
    if model:
        return model
    if adapter is None:
        raise ModelError("no model given: pass --model")

    info, _ = read_adapter(adapter)
    if not info.base_model_name_or_path:
        raise ModelError(f"{adapter}: adapter_config.json names no base model; pass --model")
    return info.base_model_name_or_path


def load_fused(
    model: str | None, adapter=None, *, revision: str | None = None, keep_quantized: bool = True
) -> FusedModel:
    """Load ``model`` in float32, apply the adapter folder ``adapter`` (PEFT or mlx-lm layout, or
    a run folder) and fuse it. Layers without an adapter keep their quantization, if any."""

    adapter_path = Path(adapter).expanduser() if adapter else None
    source = resolve_model_source(model, adapter_path)
    m, tok, info = load_model(source, dtype="float32", revision=revision, keep_quantized=keep_quantized)
    if adapter_path is not None:
        _check_adapter_fits(adapter_path, info.model_type)
    adapter_info = load_adapter(m, adapter_path) if adapter_path is not None else None
    fused, norms = [], {}
    for path, layer in adapter_layers(m):
        try:
            new = layer.fuse()
        except ValueError as e:  # non-finite fused weight
            raise AdapterError(f"{adapter_path}: layer '{path}': {e}") from None
        d = new.weight.astype(mx.float32) - dense_weight(layer.base).astype(mx.float32)
        norms[path] = float(mx.linalg.norm(d.reshape(-1)).item())
        fused.append((path, new))
    if fused:
        m.update_modules(tree_unflatten(fused))
    mx.eval(m.parameters())
    m.eval()
    quantized = {
        p: {"bits": q.bits, "group_size": q.group_size, "mode": getattr(q, "mode", "affine")}
        for p, q in m.named_modules()
        if isinstance(q, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (is_expert_layer(q) and "scales" in q)
    }
    dtypes = safetensors_dtypes(info.local_path)
    counts = Counter(dtypes.values())
    default = counts.most_common(1)[0][0] if counts else "float32"
    return FusedModel(
        m,
        tok,
        info,
        read_config(info.local_path),
        adapter_info,
        adapter_path,
        [p for p, _ in fused],
        norms,
        dtypes,
        default,
        quantized,
    )


def dense_tensors(fm: FusedModel) -> Iterator[tuple[str, object]]:
    """(name, float32 mx.array) for every parameter, quantized modules dequantized."""

    modules = dict(fm.model.named_modules())
    for name, a in tree_flatten(fm.model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner in fm.quantized:
            if leaf == "weight":
                yield name, dequantized(modules[owner])
            continue
        yield name, a.astype(mx.float32)


def dequantized(m):
    """float32 dense weight of a quantized layer (experts: [experts, out, in])."""

    return dense_weight(m).astype(mx.float32)


# ---------------------------------------------------------------------------------------------
# Re-quantization


@dataclass
class RequantReport:
    bits: int
    group_size: int
    layers: int
    delta_errors: dict[str, float]  # path -> ||Q(W') - W'|| / ||W' - W||
    weight_errors: dict[str, float]  # path -> ||Q(W') - W'|| / ||W'||

    def lines(self) -> list[str]:
        out = [f"re-quantized {self.layers} layers to {self.bits}-bit (group size {self.group_size})"]
        if self.delta_errors:
            v = np.array(list(self.delta_errors.values()))
            worst = max(self.delta_errors, key=self.delta_errors.get)
            out.append(
                f"  error added relative to the adapter's change ||Q(W')-W'||/||W'-W||: median {np.median(v):.3g}, "
                f"max {v.max():.3g} ({worst})"
            )
            if np.median(v) >= 0.5:
                out.append(
                    "  WARNING: quantization noise is comparable to the fine-tune itself; keep the fused "
                    "model unquantized or use more bits"
                )
        if self.weight_errors:
            v = np.array(list(self.weight_errors.values()))
            out.append(
                f"  error relative to the weights ||Q(W')-W'||/||W'||: median {np.median(v):.3g}, max {v.max():.3g}"
            )
        return out


def requantize(fm: FusedModel, bits: int | None = None, group_size: int | None = None) -> RequantReport:
    """Quantize the fused layers (MLX affine) in place, with the base's quantization settings by
    default; for a float base, every linear and embedding layer is quantized."""

    base_q = fm.info.quantization or {}
    bits = int(bits or base_q.get("bits") or 4)
    group_size = int(group_size or base_q.get("group_size") or 64)
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ExportError(f"--q-bits {bits}: MLX quantizes to 2, 3, 4, 5, 6 or 8 bits")
    if group_size not in (32, 64, 128):
        raise ExportError(f"--q-group-size {group_size}: MLX supports group sizes 32, 64 and 128")
    if base_q:
        targets = list(fm.fused)
    else:
        targets = [
            p
            for p, m in fm.model.named_modules()
            if (isinstance(m, (nn.Linear, nn.Embedding)) or is_expert_layer(m))
            and p
            and m.weight.shape[-1] % group_size == 0
        ]
    delta_err, weight_err, new = {}, {}, []
    modules = dict(fm.model.named_modules())
    for path in targets:
        m = modules[path]
        if m.weight.shape[-1] % group_size:
            raise ExportError(
                f"layer '{path}' has {m.weight.shape[-1]} inputs, not a multiple of the group size {group_size}"
            )
        w = m.weight.astype(mx.float32)
        q = m.to_quantized(group_size=group_size, bits=bits)
        deq = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=group_size, bits=bits)
        err = float(mx.linalg.norm((deq - w).reshape(-1)).item())
        weight_err[path] = err / max(float(mx.linalg.norm(w.reshape(-1)).item()), 1e-30)
        if path in fm.delta_norms:
            delta_err[path] = err / max(fm.delta_norms[path], 1e-30)
        new.append((path, q))
        fm.quantized[path] = {"bits": bits, "group_size": group_size, "mode": "affine"}
    if new:
        fm.model.update_modules(tree_unflatten(new))
        mx.eval(fm.model.parameters())
    return RequantReport(bits, group_size, len(new), delta_err, weight_err)


# ---------------------------------------------------------------------------------------------
# Writing


def _output_config(fm: FusedModel, dtype: str, quantization: dict | None) -> dict:

    # The base's own spelling (transformers 4 or 5), not the names added for mlx-lm.
    cfg = {k: v for k, v in read_config(fm.info.local_path, spelling=False).items() if k not in QUANT_KEYS}
    if quantization:
        cfg["quantization"] = quantization
        cfg["quantization_config"] = quantization
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = dtype
    else:
        cfg["torch_dtype"] = dtype
    return cfg


def _generation_config(fm: FusedModel) -> dict:
    path = fm.info.local_path / "generation_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return {k: fm.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if fm.config.get(k) is not None}


def output_tensors(fm: FusedModel, dtype: str | None = None, keep_quantized: bool = False) -> dict:
    """name -> mx.array as written: float tensors in their source dtype (or ``dtype``),
    quantized modules dequantized unless ``keep_quantized``."""

    out = {}
    if keep_quantized:
        for name, a in tree_flatten(fm.model.parameters()):
            owner = name.rpartition(".")[0]
            if owner in fm.quantized and a.dtype == mx.uint32:
                out[name] = a
            else:
                out[name] = a.astype(getattr(mx, dtype or fm.storage_dtype(name)))
        return out
    for name, a in dense_tensors(fm):
        out[name] = a.astype(getattr(mx, dtype or fm.storage_dtype(name)))
    return out


def ensure_output_path(out: Path, overwrite: bool, is_dir: bool, kind: str | None = None) -> Path:
    """Fail early (before any work) when ``out`` cannot be written or may not be replaced.

    A folder output (``is_dir``) of ``kind`` follows the ownership rule of
    :func:`mlx_lora.plumbing.ownership.check_output_dir`; a file output may replace only a GGUF file.
    Returns the path to write (a symbolic link followed)."""

    out = check_output_dir(out, kind, overwrite=overwrite) if is_dir else check_output_file(out, overwrite=overwrite)
    probe = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"output {out} is not writable ({probe} denies write access)")
    return out


@contextlib.contextmanager
def made_dirs(folder: Path, written: list | None = None) -> Iterator[Path]:
    """Create ``folder`` and its missing parents; if the block fails, delete the files listed in
    ``written`` and the folders created here (when empty), so a failed export leaves nothing."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for f in written or ():
            with contextlib.suppress(OSError):
                Path(f).unlink()
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


@dataclass
class FuseResult:
    out_dir: Path
    dtype: str
    fused_layers: int
    seconds: float
    requant: RequantReport | None = None
    verify: object | None = None

    def lines(self) -> list[str]:
        out = [f"fused {self.fused_layers} layers -> {self.out_dir} ({self.dtype}) in {self.seconds:.1f} s"]
        if self.requant:
            out += self.requant.lines()
        if self.verify:
            out += self.verify.lines()
        return out


def write_hf_folder(fm: FusedModel, tmp: Path, dtype: str | None, quantized: bool) -> str:
    """Write weights, config, tokenizer and generation config into the (empty) folder ``tmp``;
    returns the dtype recorded in config.json."""

    tensors = output_tensors(fm, dtype, keep_quantized=quantized)
    if not quantized:  # MLX-quantized folders keep mlx-lm's stacked experts, as mlx-community's do
        tensors = unstack_experts(fm.model_type, tensors)
    floats = Counter(str(a.dtype).rsplit(".", 1)[-1] for a in tensors.values() if a.dtype != mx.uint32)
    main_dtype = dtype or (floats.most_common(1)[0][0] if floats else fm.default_dtype)
    shards = make_shards(tensors, MAX_SHARD_GB)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for shard, name in zip(shards, names):
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx" if quantized else "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(a.nbytes for a in tensors.values())
        atomic_write_json(
            tmp / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    quant = None
    if quantized:
        default = Counter((q["bits"], q["group_size"]) for q in fm.quantized.values()).most_common(1)[0][0]
        quant = {"group_size": default[1], "bits": default[0], "mode": "affine"}
        for path, q in fm.quantized.items():
            if (q["bits"], q["group_size"]) != default:
                quant[path] = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
    atomic_write_json(tmp / "config.json", _output_config(fm, main_dtype, quant))
    atomic_write_json(tmp / "generation_config.json", _generation_config(fm))
    for name in TOKENIZER_FILES:
        src = fm.info.local_path / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
    return main_dtype


def fuse(
    model: str | None,
    adapter,
    out_dir,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
    log: "Callable[[str], None] | None" = None,
) -> FuseResult:
    """Fuse ``adapter`` into ``model`` and write an HF-format folder at ``out_dir``.

    ``dtype`` (float32, float16, bfloat16) overrides the source precision; ``quantize``
    re-quantizes the fused layers (see :func:`requantize`). With ``verify`` the written folder is
    reloaded and its logits compared with the in-memory fused model before it is moved into place.
    """

    t0 = time.perf_counter()
    if dtype is not None and dtype not in V.DTYPE_KIND:
        raise ExportError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
    out = ensure_output_path(Path(out_dir), overwrite, is_dir=True, kind="model")
    fm = load_fused(model, adapter)
    if not fm.fused and adapter is not None:
        raise AdapterError(f"{adapter}: the adapter has no layers to fuse")
    report = requantize(fm, q_bits, q_group_size) if quantize else None
    ref_tokens = V.prompts(fm.tokenizer) if verify else None
    ref_logits = V.logits(fm.model, ref_tokens) if verify else None
    result = None
    try:
        with building(out, "model", "fuse", suffix=".tmp") as tmp:
            main_dtype = write_hf_folder(fm, tmp, dtype, quantized=bool(fm.quantized) and quantize)
            vr = None
            if verify:
                reloaded, _, _ = load_model(str(tmp), dtype="float32", with_tokenizer=False)
                reloaded.eval()
                # With re-quantization the reference is the re-quantized model itself, so only
                # the storage precision of weights and scales can differ.
                kind = V.DTYPE_KIND[main_dtype]
                vr = V.VerifyReport([V.compare_models(ref_logits, reloaded, ref_tokens, "fused folder", kind)])
                vr.raise_if_failed(str(out))
            result = FuseResult(out, main_dtype, len(fm.fused), time.perf_counter() - t0, report, vr)
    except OSError as e:
        raise disk_error(e, out) from None
    for line in result.lines():
        (log or logger.info)(line)
    return result
