"""Shared disk helpers for the converters: atomic output folders, safetensors files.

Safetensors layout (the whole format): an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the end of the header, plus an optional ``"__metadata__"`` string map), then the raw
little-endian tensor bytes. Reading validates the header against the file size first so a
truncated or corrupt file is reported by file and tensor name; the tensors themselves are loaded
with ``mx.load``, which maps them lazily. Writing streams one tensor at a time, so converting a
model never holds more than the tensor in flight (see :func:`write_safetensors_streaming`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_lora.plumbing import ownership
from mlx_lora.plumbing.errors import ExportError, ModelError
from mlx_lora.plumbing.io import atomic_dir, atomic_write_json
from mlx_lora.plumbing.ownership import building, check_output_dir
from mlx_lora.plumbing.progress import ByteProgress

PathLike = Union[str, os.PathLike]

MAX_SHARD_BYTES = 5 * 2**30
"""Output shards hold at most this many bytes of tensor data (mlx-lm and transformers use 5 GB)."""

# safetensors dtype name -> (bytes per element, MLX dtype name, or None for a dtype MLX reads but
# has no array type of its own: FP8 weights, which mlx-lm models dequantize when they load)
SAFETENSORS_DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
}
_MLX_TO_SAFETENSORS = {mlx: st for st, (_, mlx) in SAFETENSORS_DTYPES.items() if mlx is not None}
# Raw bytes leave MLX through a same-width unsigned view (numpy has no bfloat16).
_UINT_OF_WIDTH = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def mx_dtype(name: str):
    """The MLX dtype called ``name`` (one of :data:`FLOAT_DTYPES`)."""

    if name not in FLOAT_DTYPES:
        raise ExportError(f"unsupported dtype '{name}'; choose one of {', '.join(FLOAT_DTYPES)}")
    return getattr(mx, name)


def dtype_name(dtype) -> str:
    """``mx.float16`` -> ``"float16"``."""
    return str(dtype).rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Atomic output folders


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: PathLike, *, overwrite: bool = False, kind: str = "model", command: str = "convert"
) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out_dir``; on success move it to ``out_dir``.

    On any exception the temporary folder is deleted and ``out_dir`` is left as it was, so a
    reader never sees a half-written model. An existing non-empty ``out_dir`` is an error unless
    ``overwrite`` and the tool wrote it (see :func:`mlx_lora.plumbing.ownership.check_output_dir`); then it
    is replaced only after the new folder is complete, and only where it still matches the
    marker's records. The new folder carries the ownership marker of ``kind``. If ``out_dir``
    appears while we write (another process converting to the same place), it is replaced with
    ``overwrite`` when the tool can prove it wrote it, and raises :class:`OutputAppeared` without.
    """
    out = check_output_dir(out_dir, kind, overwrite=overwrite)
    if not overwrite:  # a folder that appears meanwhile is another process's: never replaced
        with atomic_dir(out, False, suffix=".partial", set_aside=False) as tmp:
            yield tmp
            ownership.write_marker(tmp, kind, command)
        return
    with building(out, kind, command, suffix=".partial") as tmp:
        yield tmp


def write_json(path: PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (UTF-8, non-ASCII kept as is) to ``path`` atomically."""
    try:
        atomic_write_json(path, obj, ensure_ascii=False)
    except OSError as e:
        raise disk_error(e, Path(path)) from None


def read_json(path: PathLike, what: str = "file") -> dict:
    """Parse a JSON object file, naming the file (and line) on failure."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def disk_error(e: OSError, path: Path, tensor: Optional[str] = None) -> ExportError:
    what = f" (tensor '{tensor}')" if tensor else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(
            f"out of disk space while writing {path}{what}; nothing was left in the output folder "
            f"(free space, or write to another disk)"
        )
    return ExportError(f"cannot write {path}{what}: {e.strerror or e}")


# ---------------------------------------------------------------------------------------------
# Reading safetensors


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # where its data starts, in bytes from the start of the file


MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header is kilobytes to a few megabytes; a larger length is a corrupt file."""


def read_safetensors_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors file's header against its size; return (tensors, metadata).

    Raises :class:`ModelError` naming the file and, where one is at fault, the tensor: a file
    shorter than its header says (interrupted download or copy), an unknown dtype, a shape that
    does not match the byte range, or overlapping ranges. Reads only the header.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ModelError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor '{name}': malformed header entry {info!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelError(f"{path}: tensor '{name}': unsupported dtype {dtype}")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]
        if end - begin != expected or begin < 0 or any(d < 0 for d in shape):
            raise ModelError(
                f"{path}: tensor '{name}': shape {list(shape)} of {dtype} needs {expected} bytes, "
                f"header gives {end - begin}"
            )
        if end > data_len:
            raise ModelError(
                f"{path}: tensor '{name}' extends past the end of the file ({end} > {data_len} data bytes): "
                f"the file is truncated (interrupted download or copy?)"
            )
        tensors[name] = TensorInfo(name, dtype, shape, expected, data_start + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelError(f"{path}: tensors '{n0}' and '{n1}' overlap: corrupt file")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def load_safetensors(path: PathLike) -> dict:
    """Validate ``path`` and return its tensors as lazily loaded MLX arrays."""

    tensors, _ = read_safetensors_header(path)
    for t in tensors.values():
        if SAFETENSORS_DTYPES[t.dtype][1] is None:
            raise ModelError(f"{path}: tensor '{t.name}': unsupported dtype {t.dtype}")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: cannot load ({e})") from None


# ---------------------------------------------------------------------------------------------
# Writing safetensors, one tensor at a time


@dataclass
class PendingTensor:
    """An output tensor's name, final shape and dtype (an MLX dtype name).

    Shapes and dtypes are known before any data is read, so a file's header is written first
    and the data streamed after it (see :func:`write_safetensors_streaming`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # MLX dtype name


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Split ``(group_key, nbytes)`` items, in order, into consecutive shards of at most
    ``max_bytes`` (a single item larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, ``model-0000i-of-0000n.safetensors`` for several."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return math.prod(shape) * SAFETENSORS_DTYPES[_MLX_TO_SAFETENSORS[dtype]][0]


def write_safetensors_streaming(
    path: PathLike,
    groups: Sequence[tuple[list[PendingTensor], Callable[[], Sequence]]],
    *,
    metadata: Optional[dict[str, str]] = None,
    progress: Optional[ByteProgress] = None,
) -> dict[str, int]:
    """Write a safetensors file whose tensors are computed one group at a time.

    ``groups`` is a list of ``(tensors, compute)``: ``compute()`` returns one array (MLX or
    numpy) per entry of ``tensors`` (several outputs of one computation, e.g. a quantized weight
    with its scales and biases, are evaluated together and never computed twice). Only one group
    is held in memory at once. Returns ``{name: nbytes}``. Disk errors raise
    :class:`ExportError` naming the file and the tensor being written.
    """

    path = Path(path)
    header: dict = {}
    offset = 0
    for tensors, _ in groups:
        for t in tensors:
            n = _nbytes(t.shape, t.dtype)
            header[t.name] = {
                "dtype": _MLX_TO_SAFETENSORS[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    current = None
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for tensors, compute in groups:
                current = tensors[0].name
                arrays = compute()
                if len(arrays) != len(tensors):
                    raise RuntimeError(f"{current}: expected {len(tensors)} arrays, got {len(arrays)}")
                mx.eval(*[a for a in arrays if isinstance(a, mx.array)])
                for t, a in zip(tensors, arrays):
                    current = t.name
                    f.write(_tensor_bytes(t, a))
                    if progress is not None:
                        progress.update(a.nbytes)
                del arrays
                mx.clear_cache()  # freed buffers go back to the system, not MLX's cache
    except OSError as e:
        raise disk_error(e, path, current) from None
    return {name: v["data_offsets"][1] - v["data_offsets"][0] for name, v in header.items() if name != "__metadata__"}


def _tensor_bytes(t: PendingTensor, a) -> memoryview:
    """The raw bytes of ``a`` after checking it against the plan ``t``.

    ``a`` is an MLX array or a numpy array; a numpy ``bfloat16`` tensor is passed as its raw
    ``uint16`` bits (numpy has no bfloat16).
    """

    if isinstance(a, np.ndarray):
        want = "uint16" if t.dtype == "bfloat16" else t.dtype
        got = a.dtype.name
        arr = a
    else:
        want, got = t.dtype, dtype_name(a.dtype)
        arr = np.asarray(a.reshape(-1).view(getattr(mx, _UINT_OF_WIDTH[a.dtype.size])))
    if tuple(a.shape) != tuple(t.shape) or got != want:
        raise RuntimeError(f"tensor '{t.name}': planned {want}{list(t.shape)}, computed {got}{list(a.shape)}")
    return memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")


def write_sharded(
    out_dir: Path,
    groups: Sequence[tuple[list[PendingTensor], Callable[[], Sequence]]],
    *,
    metadata: Optional[dict[str, str]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: Optional[bool] = None,
) -> list[str]:
    """Write ``groups`` into ``out_dir`` as one ``model.safetensors`` or several shards plus
    ``model.safetensors.index.json``; returns the shard file names. One progress bar per shard."""
    sizes = [(str(i), sum(_nbytes(t.shape, t.dtype) for t in ts)) for i, (ts, _) in enumerate(groups)]
    check_free_space(out_dir, sum(n for _, n in sizes))
    plan = plan_shards(sizes, max_shard_bytes)
    names = shard_file_names(len(plan))
    weight_map: dict[str, str] = {}
    total = 0
    for shard_name, keys in zip(names, plan):
        shard_groups = [groups[int(k)] for k in keys]
        nbytes = sum(_nbytes(t.shape, t.dtype) for ts, _ in shard_groups for t in ts)
        with ByteProgress(nbytes, shard_name, show=show_progress) as bar:
            written = write_safetensors_streaming(out_dir / shard_name, shard_groups, metadata=metadata, progress=bar)
        for name, n in written.items():
            weight_map[name] = shard_name
            total += n
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out_dir / "model.safetensors.index.json", index)
    return names


def check_free_space(folder: Path, needed: int, margin: int = 64 * 2**20) -> None:
    """Fail before writing anything when ``folder``'s disk cannot hold ``needed`` more bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise ExportError(
            f"not enough disk space in {folder}: the model needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB is free"
        )


# ---------------------------------------------------------------------------------------------
# Misc


def copy_files(src: Path, dst: Path, names: Sequence[str]) -> list[str]:
    """Copy the files among ``names`` (glob patterns) that exist in ``src``; returns what was copied."""
    copied = []
    for pattern in names:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.name not in copied:
                try:
                    shutil.copyfile(p, dst / p.name)
                except OSError as e:
                    raise disk_error(e, dst / p.name) from None
                copied.append(p.name)
    return copied
