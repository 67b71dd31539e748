"""Export a (fused) model to a GGUF file for llama.cpp, Ollama and LM Studio.

The file is written with the gguf package (``GGUFWriter``: header, metadata, tensor table, then
each tensor's data streamed one at a time so only one tensor is in memory beyond the model).
Tensor names, q/k permutation and architecture metadata follow llama.cpp (:mod:`.gguf_arch`),
the vocabulary too (:mod:`.gguf_vocab`).

Types. ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` are quantized
in numpy by ``gguf.quants``; 1-D tensors and norms stay F32 as llama.cpp expects, a matrix whose
rows are not whole 32-value blocks falls back to F16, and in the 4- and 5-bit types the output
projection (``output.weight``, or the tied ``token_embd.weight``) is Q8_0, as llama.cpp's own
quantizer keeps it at 6 or 8 bits. K-quants (``q4_k_m``, ``q5_k_m``,
``q6_k``) are made by llama.cpp's own quantizer (``llama_model_quantize`` from the optional
llama-cpp-python package) from a float GGUF written first.

Quantized sources. MLX affine quantization with group size 32 stores ``w = s * q + b`` per block
of 32 values with unsigned ``q``, exactly the Q4_1 (4-bit) and Q5_1 (5-bit) block formats
``w = d * q + m``, so such layers are repacked bit for bit when the scales and biases are
representable in float16. Q4_0, Q5_0 and Q8_0 are the same with ``m = -8 d``, ``-16 d``,
``-128 d`` (what an import of those GGUF types produces), and are repacked when that holds.
Every other combination is dequantized and re-quantized, and the error it adds is reported.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.converters import gguf_arch, gguf_vocab
from mlx_lora.converters import verify as V
from mlx_lora.converters.fuse import dequantized, ensure_output_path, load_fused, made_dirs
from mlx_lora.converters.io import disk_error
from mlx_lora.plumbing.errors import ExportError
from mlx_lora.plumbing.io import atomic_path, temp_file

logger = logging.getLogger(__name__)

NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
KQUANT_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
"""K-quant name -> llama_ftype of llama.cpp's quantizer."""
EXPORT_TYPES = NUMPY_TYPES + tuple(KQUANT_TYPES)
LOW_BIT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP_EXTRA = "pip install 'mlx-lora[llama-cpp]' (installs llama-cpp-python)"


def _qtype(name: str):

    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(name: str) -> int:

    if name in KQUANT_TYPES:
        return KQUANT_TYPES[name]
    return int(
        {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
            name, getattr(gguf.LlamaFileType, f"MOSTLY_{name.upper()}", 0)
        )
    )


def check_type(type_name: str) -> str:
    t = type_name.lower()
    if t not in EXPORT_TYPES:
        raise ExportError(f"unknown GGUF type '{type_name}'; choose one of {', '.join(EXPORT_TYPES)}")
    return t


# ---------------------------------------------------------------------------------------------
# Block packing of MLX-quantized weights


def unpack_mlx(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values of an MLX-packed weight (rows, cols * bits / 32) -> (rows, cols).

    MLX packs value ``i`` of a row at bit offset ``bits * i`` of the row's little-endian
    bit stream (for every bit width)."""
    rows = packed.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1), axis=-1, bitorder="little")
    vals = stream.reshape(rows, -1, bits).astype(np.uint8)
    return (vals << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def pack_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, kind: str) -> np.ndarray:
    """GGUF block bytes (rows, blocks * block_bytes) from unsigned values ``q`` (rows, cols),
    per-block scales ``d`` and minimums ``m`` (rows, cols / 32).

    Q4: byte ``j`` of a block holds value ``j`` in its low and ``j + 16`` in its high nibble.
    Q5 adds a little-endian 32-bit word whose bit ``j`` is bit 4 of value ``j``. Q8_0 stores
    ``q - 128`` as int8. Block layouts: Q4_0 [d, qs], Q4_1 [d, m, qs], Q5_0 [d, qh, qs],
    Q5_1 [d, m, qh, qs], Q8_0 [d, qs]; ``d`` and ``m`` are float16."""
    rows = q.shape[0]
    qb = q.reshape(rows, -1, 32)
    parts = [_f16(d)]
    if kind in ("q4_1", "q5_1"):
        parts.append(_f16(m))
    if kind == "q8_0":
        parts.append((qb.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if kind in ("q5_0", "q5_1"):
            high = ((qb >> 4) & 1).astype(np.uint8)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))
        low = qb & 0x0F
        parts.append((low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


_REPACK = {  # target type -> (MLX bits, m as a multiple of d, or None for a free minimum)
    "q4_1": (4, None),
    "q5_1": (5, None),
    "q4_0": (4, -8.0),
    "q5_0": (5, -16.0),
    "q8_0": (8, -128.0),
}


def repack(layer, kind: str, perm: np.ndarray | None) -> np.ndarray | None:
    """GGUF bytes of an MLX-quantized layer in block type ``kind`` without re-quantizing, or None
    when the formats do not line up exactly (bits, group size, fp16 scales, fixed minimum)."""

    if kind not in _REPACK or getattr(layer, "mode", "affine") != "affine" or layer.group_size != 32:
        return None
    bits, fixed = _REPACK[kind]
    if layer.bits != bits or layer.get("biases") is None:
        return None
    s = np.array(layer.scales.astype(mx.float32))
    b = np.array(layer.biases.astype(mx.float32))
    if not (
        np.array_equal(s.astype(np.float16).astype(np.float32), s)
        and np.array_equal(b.astype(np.float16).astype(np.float32), b)
    ):
        return None
    if fixed is not None and not np.array_equal(b, s * np.float32(fixed)):
        return None
    q = unpack_mlx(np.array(layer.weight), bits)
    if perm is not None:
        q, s, b = q[perm], s[perm], b[perm]
    return pack_blocks(q, s, None if fixed is not None else b, kind)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str | None
    shape: tuple[int, ...]  # numpy order
    qtype: str  # f32, f16, bf16, q8_0, ...
    source: str  # "float", "repack", "requant" (quantized source re-quantized), "extra"
    compute: Callable[[], np.ndarray]
    nbytes: int = 0


@dataclass
class GGUFStats:
    path: Path
    type: str
    tensors: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    repacked: int = 0
    requant_errors: dict[str, float] = field(default_factory=dict)  # gguf name -> ||Q(w) - w|| / ||w||
    delta_errors: dict[str, float] = field(default_factory=dict)  # gguf name -> ||Q(W') - W'|| / ||W' - W||
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verify: object | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        size = self.path.stat().st_size / 2**20 if self.path.exists() else 0.0
        kinds = ", ".join(f"{n} {k.upper()}" for k, n in sorted(self.counts.items()))
        out = [
            f"wrote {self.path} ({self.type}, {size:.1f} MiB, {self.tensors} tensors: {kinds}) in {self.seconds:.1f} s"
        ]
        if self.repacked:
            out.append(f"  {self.repacked} quantized tensors repacked bit for bit (no re-quantization)")
        if self.requant_errors:
            v = np.array(list(self.requant_errors.values()))
            out.append(
                f"  {len(v)} quantized tensors had to be dequantized and re-quantized to {self.type}: added "
                f"relative error ||Q(w)-w||/||w|| median {np.median(v):.3g}, max {v.max():.3g}"
            )
        if self.delta_errors:
            v = np.array(list(self.delta_errors.values()))
            out.append(
                f"  quantization error relative to the adapter's change ||Q(W')-W'||/||W'-W||: median "
                f"{np.median(v):.3g}, max {v.max():.3g}"
            )
        if self.fallbacks:
            out.append(
                f"  {len(self.fallbacks)} tensors kept as F16 (rows not whole 32-value blocks): "
                f"{', '.join(self.fallbacks[:4])}{' ...' if len(self.fallbacks) > 4 else ''}"
            )
        out += [f"  {n}" for n in self.notes]
        if self.verify is not None:
            out += self.verify.lines()
        return out


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:

    if qtype == "f32":
        return int(np.prod(shape)) * 4
    if qtype in ("f16", "bf16"):
        return int(np.prod(shape)) * 2
    block, size = gguf.GGML_QUANT_SIZES[_qtype(qtype)]
    return int(np.prod(shape[:-1])) * (shape[-1] // block) * size


def _encode(w: np.ndarray, qtype: str) -> np.ndarray:

    if qtype == "f32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == "f16":
        return np.ascontiguousarray(w.astype(np.float16))
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _qtype(qtype)))


def _rel(a: np.ndarray, b: np.ndarray, denom: float) -> float:
    return float(np.linalg.norm((a - b).reshape(-1)) / max(denom, 1e-30))


def plan_tensors(fm, type_name: str, stats: GGUFStats) -> list[TensorPlan]:
    """One :class:`TensorPlan` per GGUF tensor of the fused model ``fm`` at ``type_name``
    (a numpy type; K-quant exports plan their float intermediate)."""

    spec = gguf_arch.arch_spec(fm.model_type)
    config = fm.config
    spec.refuse(config)
    names = gguf_arch.TensorNames(spec, int(config["num_hidden_layers"]))
    modules = dict(fm.model.named_modules())
    quant_target = type_name not in ("f32", "f16", "bf16")
    # The output projection (output.weight, or token_embd.weight when the embeddings are tied)
    # stays at Q8_0 in 4- and 5-bit exports, as llama.cpp's own quantizer keeps it at Q6_K/Q8_0:
    # its error goes straight into the logits.
    params = dict(tree_flatten(fm.model.parameters()))
    output_name = "output.weight" if "lm_head.weight" in params else "token_embd.weight"
    plans: list[TensorPlan] = []

    for hf_name, arr in tree_flatten(fm.model.parameters()):
        owner, _, leaf = hf_name.rpartition(".")
        if owner in fm.quantized and leaf != "weight":
            continue  # scales/biases travel with their weight
        gname = names.gguf_name(hf_name)
        shape = (
            tuple(arr.shape)
            if owner not in fm.quantized
            else (*arr.shape[:-1], arr.shape[-1] * 32 // fm.quantized[owner]["bits"])
        )
        if len(shape) == 1 or gname.endswith("_norm.weight") or gguf_arch.is_f32_tensor(gname):
            qtype = "f32"
        else:
            qtype = "q8_0" if type_name in LOW_BIT_TYPES and gname == output_name else type_name
            if quant_target and shape[-1] % gguf.GGML_QUANT_SIZES[_qtype(qtype)][0]:
                qtype = "f16"
                stats.fallbacks.append(gname)
        perm = gguf_arch.row_permutation(spec, config, hf_name, shape[0])

        if owner in fm.quantized:
            layer = modules[owner]
            # Blocks that are already in a GGUF block format are copied: into the preferred type,
            # else into the requested one (a 4-bit output projection is not worth re-rounding to 8).
            packed = None
            for candidate in dict.fromkeys([qtype, type_name]) if quant_target and qtype != "f16" else ():
                packed = repack(layer, candidate, perm)
                if packed is not None:
                    plans.append(TensorPlan(gname, hf_name, shape, candidate, "repack", lambda p=packed: p))
                    break
            if packed is not None:
                continue

            def compute(layer=layer, hf_name=hf_name, gname=gname, qtype=qtype):
                w = gguf_arch.to_gguf(spec, config, hf_name, np.array(dequantized(layer)))
                out = _encode(w, qtype)
                if qtype not in ("f32", "f16", "bf16"):
                    back = np.asarray(gguf.quants.dequantize(out, _qtype(qtype)), np.float32).reshape(w.shape)
                    stats.requant_errors[gname] = _rel(back, w, float(np.linalg.norm(w.reshape(-1))))
                return out

            plans.append(TensorPlan(gname, hf_name, shape, qtype, "requant" if quant_target else "float", compute))
            continue

        def compute(arr=arr, hf_name=hf_name, gname=gname, qtype=qtype, owner=owner):
            w = gguf_arch.to_gguf(spec, config, hf_name, np.array(arr.astype(mx.float32)))
            out = _encode(w, qtype)
            if owner in fm.delta_norms and qtype not in ("f32", "f16", "bf16"):
                back = np.asarray(gguf.quants.dequantize(out, _qtype(qtype)), np.float32).reshape(w.shape)
                stats.delta_errors[gname] = _rel(back, w, fm.delta_norms[owner])
            return out

        plans.append(TensorPlan(gname, hf_name, shape, qtype, "float", compute))

    for gname, w in gguf_arch.extra_tensors(spec, config).items():
        plans.append(TensorPlan(gname, None, tuple(w.shape), "f32", "extra", lambda w=w: w))
    for p in plans:
        p.nbytes = _nbytes(p.shape, p.qtype)
    return plans


# ---------------------------------------------------------------------------------------------
# Writing


_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(fm, name: str | None, tokens: list[str]) -> str:
    if not name:
        base = Path(str(fm.info.source)).name or "model"
        name = Path(base).stem
        if fm.adapter_path is not None:
            name = f"{name}-{fm.adapter_path.resolve().name}"
    # llama.cpp sets token attributes of </s>, <unk>, <s>, <|endoftext|> for any model whose
    # general.name contains "phi3"/"phi-3", and fails to load when one of them is missing.
    if re.search(r"phi-?3", name, re.IGNORECASE) and not set(_PHI3_TOKENS) <= set(tokens):
        name = re.sub(r"(?i)phi-?3", "phi", name)
    return name


def _size_label(plans: list[TensorPlan]) -> str:
    """``general.size_label`` as llama.cpp's converter computes it: the parameter count, or for
    MoE ``<experts>x<parameters with one expert per stacked tensor>`` (e.g. ``4x6.4M``)."""

    total = shared = expert = 0
    counts = []
    for p in plans:
        if p.source == "extra":
            continue
        size = int(np.prod(p.shape))
        total += size
        if "_exps." in p.gguf_name and len(p.shape) >= 3:
            expert += size // p.shape[0]
            counts.append(p.shape[0])
        else:
            shared += size
    return gguf.size_label(total, shared, expert, sum(counts) // len(counts) if counts else 0)


def write_gguf(
    fm,
    path: Path,
    type_name: str,
    *,
    name: str | None = None,
    pre_tokenizer: str | None = None,
    stats: GGUFStats | None = None,
) -> GGUFStats:
    """Write the fused model ``fm`` as a GGUF file at ``path`` (no atomic rename here) in a
    numpy-quantizable ``type_name``."""

    if type_name not in NUMPY_TYPES:
        raise ExportError(f"write_gguf: '{type_name}' is not a type the gguf package quantizes")
    spec = gguf_arch.arch_spec(fm.model_type)
    stats = stats or GGUFStats(path, type_name)
    vocab = gguf_vocab.read_vocab(fm.info.local_path, fm.config, pre_tokenizer, fm.tokenizer)
    plans = plan_tensors(fm, type_name, stats)

    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(fm, name, vocab.tokens))
    if fm.adapter is not None and fm.adapter.base_model_name_or_path:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(fm.adapter.base_model_name_or_path))
    writer.add_size_label(_size_label(plans))
    gguf_arch.write_metadata(writer, spec, fm.config, _file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.write_vocab(writer, vocab)
    for p in plans:
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=_qtype(p.qtype))
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plans:
            data = p.compute()
            if data.nbytes != p.nbytes:
                raise ExportError(f"tensor '{p.gguf_name}': computed {data.nbytes} bytes, planned {p.nbytes}")
            writer.write_tensor_data(data)
            stats.counts[p.qtype] = stats.counts.get(p.qtype, 0) + 1
            stats.repacked += p.source == "repack"
    finally:
        writer.close()
    stats.tensors = len(plans)
    return stats


def llama_cpp_quantize(src: Path, dst: Path, type_name: str) -> None:
    """Quantize the GGUF file ``src`` to ``dst`` with llama.cpp's ``llama_model_quantize``."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"GGUF type '{type_name}' (a K-quant) is made by llama.cpp's own quantizer, which needs "
            f"the optional llama-cpp extra: {LLAMA_CPP_EXTRA}"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = KQUANT_TYPES[type_name]
    params.nthread = os.cpu_count() or 1
    # llama.cpp logs every tensor from C straight to file descriptors 1 and 2; keep that out of
    # the user's terminal and show its tail only if quantizing fails.
    with tempfile.TemporaryFile() as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        if rc != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            raise ExportError(f"llama.cpp's quantizer failed on {src} (code {rc}):\n  " + "\n  ".join(tail))


def _intermediate_type(fm) -> str:
    """Float type of the file llama.cpp K-quantizes from: the source precision, so nothing is
    rounded twice."""
    return {"bfloat16": "bf16", "float16": "f16"}.get(fm.default_dtype, "f32")


def export_gguf(
    model: str | None,
    adapter,
    out,
    *,
    type_name: str = "f16",
    verify: bool = True,
    overwrite: bool = False,
    name: str | None = None,
    pre_tokenizer: str | None = None,
    fused=None,
    log: "Callable[[str], None] | None" = None,
) -> GGUFStats:
    """Fuse ``adapter`` into ``model`` (if given) and write ``out`` as GGUF ``type_name``.

    The file is written next to ``out`` under a temporary name and renamed into place only after
    verification (reload, compare logits and tokenization with the in-memory fused model) passes.
    ``fused`` reuses an already loaded :class:`~mlx_lora.converters.fuse.FusedModel`.
    """

    t0 = time.perf_counter()
    type_name = check_type(type_name)
    out = ensure_output_path(Path(out), overwrite, is_dir=False)
    if type_name in KQUANT_TYPES:
        try:
            import llama_cpp  # noqa: F401  (fail before any work when the extra is missing)
        except ImportError:
            raise ExportError(
                f"GGUF type '{type_name}' (a K-quant) is made by llama.cpp's own quantizer, which "
                f"needs the optional llama-cpp extra: {LLAMA_CPP_EXTRA}"
            ) from None
    fm = fused or load_fused(model, adapter)
    gguf_arch.arch_spec(fm.model_type).refuse(fm.config)
    with made_dirs(out.parent):
        try:
            # Published only once verification passes; removed on any failure.
            with atomic_path(out, temp_suffix=".partial") as tmp:
                if type_name in KQUANT_TYPES:
                    with temp_file(out, ".f.partial") as inter:
                        stats = write_gguf(fm, inter, _intermediate_type(fm), name=name, pre_tokenizer=pre_tokenizer)
                        stats.path, stats.type = out, type_name
                        if fm.quantized:
                            stats.notes.append(
                                f"{len(fm.quantized)} quantized layers were dequantized for llama.cpp's K-quantizer"
                            )
                        llama_cpp_quantize(inter, tmp, type_name)
                    stats.counts = {}
                    _, tensors = V.read_gguf(tmp)
                    for t, _, _ in tensors.values():
                        k = gguf.GGMLQuantizationType(t).name.lower()
                        stats.counts[k] = stats.counts.get(k, 0) + 1
                else:
                    stats = write_gguf(
                        fm, tmp, type_name, name=name, pre_tokenizer=pre_tokenizer, stats=GGUFStats(out, type_name)
                    )
                if verify:
                    stats.verify = verify_gguf(fm, tmp, type_name)
                    stats.verify.raise_if_failed(str(out), _failure_hint(stats, type_name))
        except OSError as e:
            raise disk_error(e, out) from None
    stats.seconds = time.perf_counter() - t0
    for line in stats.lines():
        (log or logger.info)(line)
    return stats


def _failure_hint(stats: GGUFStats, type_name: str) -> str:
    if type_name in ("f32", "f16", "bf16"):
        return ""
    hint = (
        f"{type_name} rounds the weights by more than this model tolerates; quantization steps larger than "
        f"the fine-tune's change put the weights back on the base model's grid. Try q8_0 (or f16), or a K-quant."
    )
    if stats.delta_errors:
        hint += f" (median ||Q(W')-W'||/||W'-W|| here: {np.median(list(stats.delta_errors.values())):.2g})"
    return hint


def verify_gguf(fm, path: Path, type_name: str):
    """Reload ``path`` into an MLX model, compare its logits with ``fm`` on the verification
    prompts, and check that its tokenizer metadata encodes like the source tokenizer."""

    tokens = V.prompts(fm.tokenizer)
    ref = V.logits(fm.model, tokens)
    model, meta = V.model_from_gguf(path, fm.config)
    report = V.VerifyReport([V.compare_models(ref, model, tokens, "GGUF", type_name)])
    notes, problems = V.check_gguf_tokenizer(meta, fm.tokenizer)
    report.notes += notes
    report.problems += problems
    return report
