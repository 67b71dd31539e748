"""The small-batch product kernel (``small_gemm.c``): built once with the system C compiler, cached.

A decode step of a few requests multiplies a handful of rows by every weight. A BLAS (OpenBLAS
here) packs each weight into its own layout before such a product, and on a 2-core AMD EPYC that
packing made the 210 weight products of a batch-8 step of SmolLM2-135M take 104-114 ms against
61-65 ms for this kernel, which reads each weight row once (``bench/RESULTS.md``). The library is
preloaded in front of the BLAS (see :func:`mlx_lora.plumbing.backend.reexec_with_fast_blas`); it
takes only ``cblas_sgemm`` calls of at most 16 rows (against a transposed weight of depth 64 or more,
or a matrix that is not transposed) and passes every other call to the BLAS.

Used on Linux x86-64 CPUs with AVX2 and FMA when a C compiler is found (``$CC``, else ``cc``/``gcc``/
``clang``). ``MLX_LORA_SMALL_GEMM=off`` leaves it out. A failed build is remembered (the compiler's
message is kept beside the cache) so that every start does not try again.

This module must not import mlx: the CLI calls it before deciding whether to re-execute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mlx_lora.plumbing.cache import cache_root

SOURCE = Path(__file__).with_name("small_gemm.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
SWITCH = "MLX_LORA_SMALL_GEMM"
MARK = "mlx_lora_small_gemm"
"""A prefix of the library's file name (``loaded_blas`` tells it from the BLAS by it)."""
log = logging.getLogger(__name__)


def cpuinfo_field(name: str) -> str:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (``vendor_id``, ``flags``), or ""."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _switched_off() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("0", "off", "no", "false")


def wanted() -> bool:
    """False when ``MLX_LORA_SMALL_GEMM`` is ``0``/``off``/``no``/``false``, or the machine cannot run it."""
    if _switched_off():
        return False
    flags = cpuinfo_field("flags").split()
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return sys.platform == "linux" and is_x86 and "avx2" in flags and "fma" in flags


def compiler() -> Optional[str]:
    """``$CC`` when set (even when missing: then none), else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _target(cc: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"{MARK}-{digest}.so"


def build(quiet: bool = True) -> Optional[Path]:
    """The built library (building it on first use), or None when it cannot be had here.

    The compiler writes to a temporary file beside the target, renamed into place when it
    succeeded, so that a process starting meanwhile never loads half a library."""
    if not wanted() or not SOURCE.exists():
        return None
    cc = compiler()
    if cc is None:
        log.debug("small-batch kernel: no C compiler found (set CC)")
        return None
    target = _target(cc)
    if target.exists():
        return target
    failed = target.with_suffix(".failed")
    if failed.exists():
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        log.debug("small-batch kernel: cannot write %s: %s", target.parent, e)
        return None
    try:
        done = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp, "-ldl", "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            failed.write_text(f"{cc} {' '.join(FLAGS)} {SOURCE}\n{done.stderr}", encoding="utf-8")
            if not quiet:
                log.warning("small-batch kernel: %s failed; see %s", Path(cc).name, failed)
            return None
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("small-batch kernel: build failed: %s", e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state() -> str:
    """Why the kernel is or is not there, in a few words (``mlx-lora doctor``)."""
    if _switched_off():
        return f"off ({SWITCH}={os.environ[SWITCH]})"
    if not wanted():
        return "not for this machine (Linux x86-64 CPUs with AVX2 and FMA)"
    cc = compiler()
    if cc is None:
        return "not built: no C compiler found (install gcc, or set CC)"
    target = _target(cc)
    if target.exists():
        return f"built, not preloaded in this process: {target}"
    failed = target.with_suffix(".failed")
    if failed.exists():
        return f"not built: {Path(cc).name} failed, see {failed}"
    return "not built yet (the mlx-lora command builds it when it starts)"


def is_kernel(path: str) -> bool:
    return Path(path).name.startswith(MARK)
