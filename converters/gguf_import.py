"""Import a GGUF file (llama.cpp, Ollama, LM Studio) as a Hugging Face-layout model folder.

The output folder has ``config.json`` (HF keys and ``architectures``), ``model.safetensors`` with
HF tensor names, ``tokenizer.json`` / ``tokenizer_config.json`` (with the chat template) and
``generation_config.json``; mlx-lm's ``load_model`` / ``load_tokenizer`` and transformers read it.

Tensors. F32, F16 and BF16 are copied (cast to the output dtype). Q4_0, Q4_1 and Q8_0 blocks of
32 values map exactly onto MLX affine quantization with group size 32, ``w = scale * q + bias``:

- Q4_1: ``w = d * q + m`` (q in 0..15)        -> 4 bits, scale ``d``, bias ``m``
- Q4_0: ``w = d * (q - 8)`` (q in 0..15)      -> 4 bits, scale ``d``, bias ``-8 d``
- Q8_0: ``w = d * q`` (q in -128..127)        -> 8 bits of ``q + 128``, scale ``d``, bias ``-128 d``

so ``keep_quantized`` stores them MLX-quantized without a lossy round trip, and the dequantized
import evaluates the same formula. Every other type the ``gguf`` package can dequantize
(K-quants, IQ-quants, ...) is dequantized with it; with ``keep_quantized`` those are re-quantized
with MLX at :data:`REQUANT_BITS` (lossy, but never below the source's bits per value).

Names, transforms and config. Everything architecture-specific comes from the table in
:mod:`.gguf_arch`, the one the exporter writes with: the ``<arch>.*`` metadata becomes
``config.json`` (:func:`.gguf_arch.hf_config`), the GGUF tensor names are those the gguf package
gives each HF tensor of the model that config describes, and the export's transforms are undone
(q/k rows un-permuted for llama, Gemma's norm offset removed). The q/k permutation moves whole
rows and quantization groups run along rows, so packed weights, scales and biases are permuted
with the same row index.

The file is parsed here (header, metadata, tensor table) rather than with ``gguf.GGUFReader``,
which builds a Python object per array element and takes ~10 s on a 49k-token vocabulary; the
parser checks every length against the file size so a truncated download is reported by the
metadata key or tensor where the file ends.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from mlx.utils import tree_flatten

from mlx_lora.converters import gguf_arch, io
from mlx_lora.converters.gguf_tokenizer import tokenizer_files
from mlx_lora.plumbing.cache import cache_root
from mlx_lora.plumbing.errors import ExportError, ModelError
from mlx_lora.plumbing.io import OutputAppeared
from mlx_lora.plumbing.mlx_lm_compat import model_classes as _get_classes

PathLike = Union[str, os.PathLike]

IMPORTER_VERSION = 1
"""Part of the cache key: bump when the folder an import writes changes."""

GGUF_MAGIC = b"GGUF"
# GGUF value type id -> numpy dtype (scalars and arrays); 7 (BOOL), 8 (STRING), 9 (ARRAY) are special.
_SCALAR = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# ggml type ids used directly (the rest go through gguf.quants by id).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
AFFINE_TYPES = {Q4_0: 4, Q4_1: 4, Q8_0: 8}
"""Block types that map exactly onto MLX affine quantization (bits), group size 32."""
REQUANT_BITS = {"Q2_K": 3, "Q3_K": 4, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5}
"""MLX bits for other quantized types under ``keep_quantized`` (anything not listed: 8)."""
GROUP_SIZE = 32

# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (rows first); GGUF stores the reverse
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    _map: Optional[np.ndarray] = None

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a read-only ``uint8`` view of the mapped file, one row per row."""
        rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
        return self._map[t.offset : t.offset + t.nbytes].reshape(rows, t.nbytes // rows)


def ggml_type_name(type_id: int) -> str:

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type id {type_id}"


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path, self.where = buf, 0, path, "header"

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ModelError(
                f"{self.path}: {self.where} extends past the end of the file (byte {self.pos + n} of "
                f"{len(self.buf)}): the file is truncated (interrupted download?)"
            )

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        # The hot loop of a 150k-token vocabulary: bounds are checked inline, not via need().
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.need(n)
            # Some vocabularies hold invalid UTF-8 pieces; llama.cpp keeps them, we replace them.
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return self.strings(count)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            if etype not in _SCALAR:
                raise ModelError(f"{self.path}: {self.where}: unknown array element type {etype}")
            dt = np.dtype(_SCALAR[etype])
            self.need(count * dt.itemsize)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
        if vtype not in _SCALAR:
            raise ModelError(f"{self.path}: {self.where}: unknown value type {vtype}")
        v = self.unpack(_STRUCT[vtype])
        return bool(v) if vtype == _BOOL else v


def read_gguf(path: PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (tensor data stays on disk, mapped).

    Raises :class:`ModelError` naming the file and the metadata key or tensor at fault.
    """

    path = Path(path)
    try:
        size = path.stat().st_size
        mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    cur = _Cursor(memoryview(mm), path)
    cur.need(4)
    if bytes(mm[:4]) != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (starts with {bytes(mm[:4])!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        hint = " (big-endian GGUF files are not supported)" if version > 0xFFFF else ""
        raise ModelError(f"{path}: unsupported GGUF version {version}{hint}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        cur.where = f"metadata entry {i}"
        key = cur.string()
        cur.where = f"metadata key '{key}'"
        meta[key] = cur.value(cur.unpack("<I"))
    infos = []
    for i in range(n_tensors):
        cur.where = f"tensor info {i}"
        name = cur.string()
        cur.where = f"tensor info of '{name}'"
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ModelError(f"{path}: tensor '{name}': {n_dims} dimensions; the file is corrupt")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = cur.pos + (-cur.pos % align)
    gf = GGUFFile(path, version, meta, _map=mm)
    for name, dims, type_id, rel in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: tensor '{name}' has unknown tensor type id {type_id}") from None
        if not dims or dims[0] % block:
            raise ModelError(
                f"{path}: tensor '{name}' ({qtype.name}) has shape {dims[::-1]} that is not whole blocks of {block}"
            )
        nbytes = math.prod(dims[1:]) * (dims[0] // block) * type_size
        start = data_start + rel
        if start + nbytes > size:
            raise ModelError(
                f"{path}: tensor '{name}' ({qtype.name}, bytes {start}..{start + nbytes}) extends past the end of "
                f"the file ({size} bytes): the file is truncated (interrupted download?)"
            )
        if name in gf.tensors:
            raise ModelError(f"{path}: tensor '{name}' appears twice; the file is corrupt")
        gf.tensors[name] = GGUFTensor(name, type_id, tuple(int(d) for d in reversed(dims)), start, nbytes)
    return gf


# ---------------------------------------------------------------------------------------------
# Tensor decoding


def _block_fields(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Q4_0/Q4_1/Q8_0 rows into ``q`` (rows, blocks, 32) uint8 in MLX's unsigned form and
    float32 ``scale``, ``bias`` (rows, blocks) such that ``w = scale * q + bias``."""
    rows = raw.shape[0]
    if qtype == Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, -128.0 * d
    width = 18 if qtype == Q4_0 else 20
    blocks = raw.reshape(rows, -1, width)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., width - 16 :]
    # Byte j of a block holds value j in its low nibble and value j + 16 in its high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if qtype == Q4_0:
        return q, d, -8.0 * d
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return q, d, m


def _pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values (rows, blocks, 32) the way ``mx.quantize`` does: element ``i`` of
    each uint32 word sits at bits ``[bits*i, bits*(i+1))``, words little-endian."""
    rows = q.shape[0]
    q = q.reshape(rows, -1)
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed).view(np.uint32)


def _to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the output dtype; bfloat16 comes back as its raw uint16 bits (round to nearest even)."""
    if dtype == "bfloat16":
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    return a.astype(np.float16 if dtype == "float16" else np.float32)


def _dequantize_rows(gf: GGUFFile, t: GGUFTensor, rows: slice) -> np.ndarray:
    """float32 values of a row range of ``t`` (2-D view: rows x last dim)."""

    raw = gf.raw(t)[rows]
    if t.ggml_type == F32:
        return raw.view(np.float32)
    if t.ggml_type == F16:
        return raw.view(np.float16).astype(np.float32)
    if t.ggml_type == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if t.ggml_type in AFFINE_TYPES:
        q, d, b = _block_fields(raw, t.ggml_type)
        return (q.astype(np.float32) * d[..., None] + b[..., None]).reshape(raw.shape[0], -1)
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type)).reshape(raw.shape[0], -1)


def _check_decodable(gf: GGUFFile, t: GGUFTensor) -> None:
    """Raise naming the tensor if its type cannot be decoded (probed on its first row)."""

    if t.ggml_type in (F32, F16, BF16) or t.ggml_type in AFFINE_TYPES:
        return
    try:
        gguf.quants.dequantize(gf.raw(t)[:1], gguf.GGMLQuantizationType(t.ggml_type))
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ModelError(
            f"{gf.path}: tensor '{t.name}' has type {t.type_name}, which cannot be decoded "
            f"(supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0 and the types gguf.quants dequantizes; {e})"
        ) from None


_ROW_CHUNK_ELEMENTS = 1 << 22  # bounds the float32 temporaries of one tensor


def _dense(
    gf: GGUFFile,
    t: GGUFTensor,
    dtype: str,
    perm: Optional[np.ndarray],
    values: Callable[[np.ndarray], np.ndarray] = lambda w: w,
) -> np.ndarray:
    """The tensor in ``dtype``: ``values`` applied to float32 row chunks, then rows gathered by ``perm``."""
    rows = gf.raw(t).shape[0]
    cols = math.prod(t.shape) // rows
    out = np.empty((rows, cols), dtype=np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    step = max(1, _ROW_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = _to_dtype(values(_dequantize_rows(gf, t, slice(r0, r0 + step))), dtype)
    out = out.reshape(t.shape)
    return out[perm] if perm is not None else out


def _affine(gf: GGUFFile, t: GGUFTensor, dtype: str, perm: Optional[np.ndarray]):
    bits = AFFINE_TYPES[t.ggml_type]
    q, d, b = _block_fields(gf.raw(t), t.ggml_type)
    w, s, bb = _pack_mlx(q, bits), _to_dtype(d, dtype), _to_dtype(b, dtype)
    if dtype == "float16" and not (np.isfinite(s).all() and np.isfinite(bb).all()):
        # -128 d overflows float16 for block scales above 511.
        raise ModelError(f"{gf.path}: tensor '{t.name}': block scales overflow float16; import with dtype float32")
    if perm is not None:
        w, s, bb = w[perm], s[perm], bb[perm]
    return [w, s, bb]


def _requantized(gf: GGUFFile, t: GGUFTensor, bits: int, dtype: str, perm: Optional[np.ndarray], values):

    w = mx.array(_dense(gf, t, "float32", perm, values))
    wq, s, b = mx.quantize(w, group_size=GROUP_SIZE, bits=bits)
    return [wq, s.astype(io.mx_dtype(dtype)), b.astype(io.mx_dtype(dtype))]


# ---------------------------------------------------------------------------------------------
# Config


def _spec(gf: GGUFFile) -> gguf_arch.ArchSpec:
    arch = gf.metadata.get("general.architecture")
    if arch is None:
        raise ModelError(f"{gf.path}: metadata key 'general.architecture' is missing")
    spec = gguf_arch.spec_for_gguf(arch, gf.metadata)
    if spec is None:
        raise ModelError(
            f"{gf.path}: unsupported architecture '{arch}' (metadata 'general.architecture'); "
            f"supported: {', '.join(gguf_arch.ARCHS)}"
        )
    return spec


def hf_config(gf: GGUFFile, dtype: str) -> tuple[gguf_arch.ArchSpec, dict]:
    """The architecture spec and HF ``config.json`` for ``gf``."""
    spec = _spec(gf)
    if "token_embd.weight" not in gf.tensors:
        raise ModelError(f"{gf.path}: tensor 'token_embd.weight' is missing")

    def tensor(name: str) -> Optional[np.ndarray]:
        t = gf.tensors.get(name)
        return None if t is None else _dequantize_rows(gf, t, slice(None)).reshape(t.shape).astype(np.float64)

    cfg = gguf_arch.hf_config(
        spec,
        gf.metadata,
        source=str(gf.path),
        tensor_names=gf.tensors,
        tensor=tensor,
        gguf_arch=gf.metadata["general.architecture"],
    )
    cfg["vocab_size"] = gf.tensors["token_embd.weight"].shape[0]
    cfg["torch_dtype"] = dtype
    return spec, dict(sorted(cfg.items()))


def _default_dtype(gf: GGUFFile) -> str:
    types = {t.ggml_type for t in gf.tensors.values()}
    if BF16 in types:
        return "bfloat16"
    if types <= {F32}:
        return "float32"
    return "float16"


# ---------------------------------------------------------------------------------------------
# Import


def gguf_cache_dir(gguf_path: PathLike, keep_quantized: bool = False) -> Path:
    """``<cache>/gguf/<stem>-<key>``: where :func:`import_gguf` output for this file is cached.

    ``<cache>`` is ``$MLX_LORA_CACHE`` or ``~/.cache/mlx-lora``. The key hashes the resolved path,
    size, modification time, ``keep_quantized`` and :data:`IMPORTER_VERSION`, so an edited or
    replaced file (or a newer importer) gets a fresh import.
    """
    p = Path(gguf_path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ModelError(f"{p}: cannot read ({e.strerror or e})") from None

    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|q={int(bool(keep_quantized))}|v={IMPORTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{digest}"


@dataclass
class _Plan:
    gguf: GGUFTensor
    hf_name: str
    perm: Optional[np.ndarray]
    values: Callable[[np.ndarray], np.ndarray]
    mode: str  # "dense", "affine" or "requant"
    bits: int = 0


def _plan(gf: GGUFFile, spec: gguf_arch.ArchSpec, cfg: dict, keep_quantized: bool) -> list[_Plan]:
    # GGUF name -> HF name: the export's mapping applied to every tensor of the model cfg describes.
    hf_names = gguf_arch.TensorNames(spec, cfg["num_hidden_layers"]).hf_names(_expected_parameters(cfg, None))
    skip = set(spec.extra_tensor_names)  # read into config["rope_scaling"] by hf_config
    plans = []
    for t in gf.tensors.values():
        if t.name in skip:
            continue
        hf = hf_names.get(t.name)
        if hf is None:
            raise ModelError(
                f"{gf.path}: tensor '{t.name}' has no Hugging Face {spec.model_type} counterpart; cannot import it"
            )
        _check_decodable(gf, t)
        try:
            perm = gguf_arch.hf_row_order(spec, cfg, hf, t.shape[0])
        except ExportError as e:
            raise ModelError(f"{gf.path}: tensor '{t.name}': {e}") from None
        values = lambda w, hf=hf: gguf_arch.values_from_gguf(spec, hf, w)
        quantized = t.ggml_type not in (F32, F16, BF16)
        if keep_quantized and quantized and len(t.shape) == 2 and t.shape[1] % GROUP_SIZE == 0:
            if t.ggml_type in AFFINE_TYPES:
                plans.append(_Plan(t, hf, perm, values, "affine", AFFINE_TYPES[t.ggml_type]))
            else:
                plans.append(_Plan(t, hf, perm, values, "requant", REQUANT_BITS.get(t.type_name, 8)))
        else:
            plans.append(_Plan(t, hf, perm, values, "dense"))
    return plans


def _expected_parameters(cfg: dict, quantization: Optional[dict], quantized_weights=frozenset()) -> dict[str, tuple]:
    """Parameter names and shapes of mlx-lm's model for ``cfg`` (built lazily: no memory)."""

    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    if quantization:

        def predicate(path, module):
            spec = quantization.get(path)
            if isinstance(spec, dict):
                return spec
            return hasattr(module, "to_quantized") and f"{path}.weight" in quantized_weights

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"], class_predicate=predicate)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if cfg.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)  # a head gemma3_text builds and its loader drops when tied
    return shapes


def import_gguf(
    gguf_path: PathLike,
    out_dir: PathLike,
    *,
    keep_quantized: bool = False,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    show_progress: Optional[bool] = None,
) -> Path:
    """Import ``gguf_path`` as an HF-layout folder at ``out_dir`` (written atomically); return it.

    ``dtype``: float32, float16 or bfloat16 for every float tensor and for quantization scales;
    default bfloat16 if the file has BF16 tensors, float32 if all are F32, else float16.
    ``keep_quantized``: store quantized linear/embedding weights MLX-quantized (``weight``,
    ``scales``, ``biases``; ``config["quantization"]``) so mlx-lm builds ``QuantizedLinear`` layers.
    Everything is checked (architecture, tensor names and types, tokenizer) before anything is
    written; errors raise :class:`ModelError` naming the file and the key or tensor.
    """
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelError(f"GGUF file not found: {src}")
    gf = read_gguf(src)
    dtype = dtype or _default_dtype(gf)
    io.mx_dtype(dtype)  # validates the name
    spec, cfg = hf_config(gf, dtype)

    tok_files = tokenizer_files(gf.metadata, str(src), model_max_length=cfg["max_position_embeddings"])
    plans = _plan(gf, spec, cfg, keep_quantized)

    quantization = None
    quantized = [p for p in plans if p.mode != "dense"]
    if quantized:
        main_bits = Counter(p.bits for p in quantized).most_common(1)[0][0]
        quantization = {"group_size": GROUP_SIZE, "bits": main_bits, "mode": "affine"}
        for p in quantized:
            if p.bits != main_bits:  # mlx-lm reads the rest from the default (and from the shapes)
                quantization[p.hf_name.rsplit(".", 1)[0]] = {"group_size": GROUP_SIZE, "bits": p.bits, "mode": "affine"}
        cfg["quantization"] = quantization
        cfg["quantization_config"] = quantization

    groups = []
    produced: dict[str, tuple] = {}
    for p in plans:
        t = p.gguf
        if p.mode == "dense":
            tensors = [io.PendingTensor(p.hf_name, t.shape, dtype)]
            compute: Callable = lambda p=p: [_dense(gf, p.gguf, dtype, p.perm, p.values)]
        else:
            rows, cols = t.shape
            base = p.hf_name[: -len(".weight")]
            tensors = [
                io.PendingTensor(f"{base}.weight", (rows, cols * p.bits // 32), "uint32"),
                io.PendingTensor(f"{base}.scales", (rows, cols // GROUP_SIZE), dtype),
                io.PendingTensor(f"{base}.biases", (rows, cols // GROUP_SIZE), dtype),
            ]
            if p.mode == "affine":
                compute = lambda p=p: _affine(gf, p.gguf, dtype, p.perm)
            else:
                compute = lambda p=p: _requantized(gf, p.gguf, p.bits, dtype, p.perm, p.values)
        for pt in tensors:
            produced[pt.name] = pt.shape
        groups.append((tensors, compute))

    # The folder must load in mlx-lm: compare names and shapes with its model before writing.
    expected = _expected_parameters(cfg, quantization, {p.hf_name for p in quantized})
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{src}: tensors do not match a {cfg['model_type']} model with this file's metadata"
            + (f"; missing: {', '.join(missing[:8])}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:8])}" if unexpected else "")
        )
    for name, shape in produced.items():
        if tuple(expected[name]) != tuple(shape):
            gname = next((p.gguf.name for p in plans if p.hf_name.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]), name)
            raise ModelError(
                f"{src}: tensor '{gname}' has shape {list(shape)}, the model expects {list(expected[name])}"
            )

    generation = {k: cfg[k] for k in ("bos_token_id", "pad_token_id") if k in cfg}
    eos = [int(v) for k in ("eos", "eot", "eom") if (v := gf.metadata.get(f"tokenizer.ggml.{k}_token_id")) is not None]
    eos = list(dict.fromkeys(eos))
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos

    fmt = "mlx" if quantization else "pt"
    out = Path(out_dir).expanduser()
    try:
        with io.atomic_output_dir(out, overwrite=overwrite) as tmp:
            io.write_sharded(tmp, groups, metadata={"format": fmt}, show_progress=show_progress)
            io.write_json(tmp / "config.json", cfg)
            io.write_json(tmp / "generation_config.json", generation)
            io.write_json(tmp / "tokenizer_config.json", tok_files["tokenizer_config.json"])
            io.write_json(tmp / "special_tokens_map.json", tok_files["special_tokens_map.json"])
            try:
                (tmp / "tokenizer.json").write_text(tok_files["tokenizer.json"], encoding="utf-8")
            except OSError as e:
                raise io.disk_error(e, tmp / "tokenizer.json") from None
    except OutputAppeared:
        # Several processes (e.g. training ranks) importing the same file into the cache: the
        # first complete folder wins and is identical to ours, since the cache key covers the
        # file and the options.
        if out.resolve() == gguf_cache_dir(src, keep_quantized).resolve() and (out / "config.json").is_file():
            return out
        raise
    return out
