"""Integrity of what a run produces: which base model an adapter belongs to, and errors that
say what to change when the machine runs out of memory or disk.

:func:`base_model_fingerprint` reduces a model folder to a short, stable digest::

    sha256( "mlx-lora-fingerprint/1", model_type,
            for each tensor of the folder's weight files (model*.safetensors), sorted by name:
                name, dtype, shape, SAMPLE bytes at the start, middle and end of its data )

It reads one header per weight file and three small pieces per tensor, so it costs milliseconds
for a model of any size, does not depend on how the weights are sharded, and changes when a
tensor is added, removed, reshaped or stored in another dtype, or when values at the sampled
places differ (a fine-tune of the same architecture differs at nearly all of them; an edit of a
few weights elsewhere goes unseen, which is the price of not hashing gigabytes). A converted copy of a model
(another dtype, quantized) is therefore a different base: its adapters still load, with a
warning.

Training stores the digest in ``adapter_config.json`` (``mlx_lora.base_model_fingerprint``) of
the run folder and of every checkpoint; :func:`check_adapter_base` compares it with the model an
adapter is being loaded onto, and warns or, when ``strict``, refuses.

:func:`resource_error` turns the backends' out-of-memory errors (MLX raises ``RuntimeError``
"[metal::malloc] ...", "[malloc] Unable to allocate ...", "cudaMalloc... failed: out of memory";
``MemoryError`` from a failed host allocation) and a full disk into a :class:`ResourceError` that
names the remedies and the checkpoint that survived, if any. A full disk shows up as ``OSError``
ENOSPC/EDQUOT from Python's own writes, possibly as the cause or context of another exception,
and as a ``RuntimeError`` "[write] Unable to write N bytes to file." from MLX's file writer
(``mx.save_safetensors``, ``mx.save``), whose ``write(2)`` errno is lost on the way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

from mlx_lora.converters.io import read_safetensors_header
from mlx_lora.plumbing.errors import AdapterError, MlxLoraError, ModelError

FINGERPRINT_KEY = "base_model_fingerprint"
"""Key of the digest in the ``mlx_lora`` section of ``adapter_config.json`` (and in exported metadata)."""
_VERSION = b"mlx-lora-fingerprint/1"
SAMPLE = 64
"""Bytes hashed at each of the three sampled places of a tensor."""


def check_safetensors(path: Union[str, Path]) -> None:
    """Raise :class:`ModelError` naming the file and tensor when a safetensors file is truncated
    or its header is corrupt (reads only the header)."""
    read_safetensors_header(path)


def base_model_fingerprint(folder: Union[str, Path]) -> str:
    """The digest described in the module docstring, as 64 hex digits.

    ``folder`` is a model folder (``config.json`` + ``*.safetensors``), e.g.
    ``ModelInfo.local_path`` of a loaded model. Raises :class:`ModelError` for a folder without
    weights or with a truncated or corrupt weight file (naming the file and tensor).
    """
    folder = Path(folder)
    # The weight files a loader reads (mlx-lm reads model*.safetensors; some repositories also ship
    # the same weights as consolidated.safetensors).
    files = (
        (sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))) if folder.is_dir() else []
    )
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weight files to fingerprint")
    model_type = ""
    try:
        model_type = str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        pass  # the weights alone still identify the model
    entries = []
    for path in files:
        entries += [
            (t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes, path)
            for t in read_safetensors_header(path)[0].values()
        ]
    entries.sort(key=lambda e: e[0])
    h = hashlib.sha256(_VERSION + b"\0" + model_type.encode() + b"\0")
    try:
        with contextlib.ExitStack() as stack:
            handles = {path: stack.enter_context(open(path, "rb")) for path in files}
            for name, dtype, shape, begin, end, path in entries:
                h.update(f"{name}\0{dtype}\0{','.join(map(str, shape))}\0".encode())
                f, n = handles[path], end - begin
                for at in sorted({begin, begin + max(n - SAMPLE, 0) // 2, max(end - SAMPLE, begin)}):
                    f.seek(at)
                    h.update(f.read(min(SAMPLE, end - at)))
    except OSError as e:
        raise ModelError(f"{folder}: cannot read the weights ({e.strerror or e})") from None
    return h.hexdigest()


def recorded_fingerprint(adapter_info) -> Optional[str]:
    """The base-model digest an adapter records, or None. Accepts an
    :class:`~mlx_lora.model.adapters.AdapterInfo`, a parsed ``adapter_config.json``, or its ``mlx_lora``
    section."""
    extra = getattr(adapter_info, "extra", adapter_info)
    if not isinstance(extra, Mapping):
        return None
    if FINGERPRINT_KEY not in extra and isinstance(extra.get("mlx_lora"), Mapping):
        extra = extra["mlx_lora"]
    value = extra.get(FINGERPRINT_KEY)
    return value if isinstance(value, str) and value else None


def check_adapter_base(
    adapter_info, model_folder: Union[str, Path], strict: bool = False, adapter_name: Optional[str] = None
) -> Optional[str]:
    """Compare the base model an adapter was trained on with ``model_folder``.

    Returns None when they match and a warning message (for the caller to show) when they
    differ. With ``strict`` a mismatch raises :class:`AdapterError` instead, and so does an
    adapter that records no fingerprint, since it cannot be verified; without ``strict`` such an
    adapter (e.g. one from the Hugging Face hub) is accepted silently.
    """
    what = f"adapter {adapter_name}" if adapter_name else "the adapter"
    recorded = recorded_fingerprint(adapter_info)
    if recorded is None:
        if strict:
            raise AdapterError(
                f"{what} records no base-model fingerprint, so --strict cannot verify that it "
                f"belongs to {model_folder}; drop --strict to load it anyway"
            )
        return None
    actual = base_model_fingerprint(model_folder)
    if actual == recorded:
        return None
    trained_on = getattr(adapter_info, "base_model_name_or_path", None)
    if trained_on is None and isinstance(adapter_info, Mapping):
        trained_on = adapter_info.get("base_model_name_or_path")
    origin = f" ({trained_on})" if trained_on else ""
    msg = (
        f"{what} was trained on a different base model{origin}: its fingerprint is {recorded[:16]}, "
        f"{model_folder} has {actual[:16]}; outputs may be wrong"
    )
    if strict:
        raise AdapterError(msg + "; refusing because of --strict")
    return msg


# ----------------------------------------------------------------------------------------------
# running out of memory or disk


class ResourceError(MlxLoraError):
    """The machine ran out of memory or disk; the message says what to change."""


_OOM = re.compile(
    r"\[(?:metal::|cuda::)?malloc\]|out of memory|unable to allocate|attempting to allocate"
    r"|resource limit \(\d+\) exceeded|bad_alloc",
    re.IGNORECASE,
)
TRAIN_MEMORY_HINT = (
    "lower train.batch_size (raise train.grad_accum to keep the same examples per step), "
    "lower data.max_seq_length, turn on train.grad_checkpoint (--grad-checkpoint), or train "
    "on a quantized base (mlx-lora convert MODEL --out DIR -q)"
)
INFERENCE_MEMORY_HINT = "lower --batch-size or --max-seq-length, or use a quantized base (mlx-lora convert -q)"


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and bool(_OOM.search(str(e))))


# MLX's FileWriter (mlx/io/load.h) on a failed write(2). A file it cannot create reads
# "[save_safetensors] Failed to open file PATH", which may be a full disk or a permission: the
# file system of PATH then tells which.
_MLX_WRITE_FAILED = re.compile(r"^\[write\] Unable to write \d+ bytes")
_MLX_OPEN_FAILED = re.compile(r"^\[\w+\] Failed to open file (?P<path>.+?)\.?$")


def _no_space_at(path: str) -> bool:
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return False
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks == 0 or (st.f_files > 0 and st.f_favail == 0)


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from or while handling."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _disk_full_error(e: BaseException) -> Optional[BaseException]:
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        if isinstance(x, RuntimeError):
            m = _MLX_OPEN_FAILED.match(str(x))
            if _MLX_WRITE_FAILED.match(str(x)) or (m and _no_space_at(m["path"])):
                return x
    return None


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it came from) says a write found no space left."""
    return _disk_full_error(e) is not None


def resource_error(
    e: BaseException, *, run_dir=None, last_checkpoint=None, memory_hint: str = TRAIN_MEMORY_HINT
) -> Optional[ResourceError]:
    """A :class:`ResourceError` for an out-of-memory or disk-full exception ``e``, else None.

    With ``run_dir`` the message says how to continue the run; ``last_checkpoint`` is named as
    the one that was kept (checkpoints are written atomically, so a failure never damages it).
    """
    if is_out_of_memory(e):
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        msg = f"out of memory ({detail}); to fit, {memory_hint}"
    elif is_disk_full(e):
        full = _disk_full_error(e)
        if getattr(full, "filename", None):
            where = f" writing {full.filename}"
        elif isinstance(full, RuntimeError):
            where = f" ({str(full).strip()})"
        else:
            where = ""
        msg = f"out of disk space{where}; free space or write to another disk (--out, MLX_LORA_CACHE)"
    else:
        return None
    if run_dir is not None:
        if last_checkpoint:
            msg += (
                f". The last good checkpoint {last_checkpoint} is kept; continue with: "
                f"mlx-lora train --resume {run_dir}"
            )
        else:
            msg += (
                ". No checkpoint was saved yet, so there is nothing to resume: run the same command with "
                "--overwrite to start over"
            )
    return ResourceError(msg)
