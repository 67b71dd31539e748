"""Facts about the compute backend: device, dtype, BLAS, memory, versions.

On Linux the ``mlx[cpu]`` wheel links a bundled reference BLAS that is ~40x slower than OpenBLAS
for the matmuls LoRA training is made of (2048^3 float32: ~3 vs ~140 GFLOP/s on a 2-core x86 box).
The BLAS is chosen by the dynamic loader when the process starts, so the CLI re-executes itself
once with ``LD_PRELOAD`` pointing at the fastest BLAS installed (see :func:`reexec_with_fast_blas`):
Intel's MKL from the ``mkl`` Python package on an Intel CPU (``pip install mkl``; on a 2-core
AVX-512 Xeon its float32 matmuls ran at 250-310 GFLOP/s against OpenBLAS's 40-64, and a batch-8 decode
step of a 135M model in 0.7x the time), else a system OpenBLAS. ``MLX_LORA_BLAS`` (``auto``, ``mkl``,
``openblas``, ``off``) overrides the choice. Library users can set ``LD_PRELOAD`` themselves;
``doctor`` says how.

This module must not import mlx at import time: the CLI calls it before deciding whether to
re-execute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import site
import sys
from pathlib import Path
from typing import Optional

from mlx_lora.plumbing import native

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), Fedora, Arch, conda-style prefixes.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)
INSTALL_HINT = (
    "install a fast BLAS: `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
    "`sudo dnf install openblas` (Fedora), and on an Intel CPU `pip install mkl`; mlx-lora then uses "
    "the fastest one automatically"
)
# Where pip and conda put the `mkl` package's runtime library: <prefix>/lib.
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")
BLAS_CHOICES = ("auto", "mkl", "openblas", "off")
BLAS_LABELS = {"mkl": "Intel MKL", "openblas": "OpenBLAS"}
"""How :func:`loaded_blas` names each kind :func:`fast_blas` picks (its text starts with it)."""
REEXEC_FLAG = "MLX_LORA_BLAS_REEXEC"
log = logging.getLogger(__name__)


def find_openblas() -> Optional[str]:
    override = os.environ.get("MLX_LORA_OPENBLAS")
    if override:
        return override if Path(override).exists() else None
    for c in OPENBLAS_CANDIDATES:
        if Path(c).exists():
            return c
    return None


def find_mkl() -> Optional[str]:
    """Intel MKL's runtime library from the ``mkl`` package installed for this Python (x86-64
    Linux), or None. ``MLX_LORA_MKL`` names the file instead."""
    override = os.environ.get("MLX_LORA_MKL")
    if override:
        return override if Path(override).exists() else None
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    roots = [sys.prefix, sys.base_prefix]
    try:
        roots.append(site.getuserbase())
    except Exception:
        pass
    for root in dict.fromkeys(roots):
        for name in MKL_NAMES:
            lib = Path(root) / "lib" / name
            if lib.exists():
                return str(lib)
    return None


def _intel_cpu() -> bool:
    """MKL is Intel's: picked by itself only on Intel CPUs (``MLX_LORA_BLAS=mkl`` elsewhere)."""
    return native.cpuinfo_field("vendor_id") == "GenuineIntel"


_warned_blas_choice = False


def blas_choice() -> str:
    """``MLX_LORA_BLAS`` (``auto`` when unset); another value is named in one warning and read as ``auto``."""
    global _warned_blas_choice
    raw = os.environ.get("MLX_LORA_BLAS", "")
    choice = raw.strip().lower() or "auto"
    if choice in BLAS_CHOICES:
        return choice
    if not _warned_blas_choice:
        _warned_blas_choice = True
        log.warning("MLX_LORA_BLAS=%s is not one of %s; choosing as with auto", raw, ", ".join(BLAS_CHOICES))
    return "auto"


def blas_for(kind: str) -> Optional[tuple[str, str, dict]]:
    """``(kind, library, environment)`` that preload ``kind`` (``"mkl"`` or ``"openblas"``), or None
    when it is not installed. MKL runs its threads on GNU OpenMP when the system has it (the same
    runtime as the rest of the process's libraries), else on Intel's, which its package brings; a
    ``MKL_THREADING_LAYER`` already set is kept."""
    if kind == "mkl":
        mkl = find_mkl()
        if mkl is None:
            return None
        layer = os.environ.get("MKL_THREADING_LAYER") or ("GNU" if ctypes.util.find_library("gomp") else "INTEL")
        return "mkl", mkl, {"MKL_THREADING_LAYER": layer}
    lib = find_openblas()
    return ("openblas", lib, {}) if lib else None


def fast_blas() -> Optional[tuple[str, str, dict]]:
    """The BLAS a Linux CPU process should preload (see :func:`blas_for`), or None (none installed,
    or ``MLX_LORA_BLAS=off``): MKL when its package is installed and the CPU is Intel's (or
    ``MLX_LORA_BLAS=mkl``), else OpenBLAS."""
    choice = blas_choice()
    if choice == "off":
        return None
    if choice == "mkl" or (choice == "auto" and _intel_cpu()):
        chosen = blas_for("mkl")
        if chosen:
            return chosen
    return blas_for("openblas")


def _is_linux_cpu_mlx() -> bool:
    if sys.platform != "linux":
        return False
    try:  # the CUDA backend does its matmuls on the GPU; BLAS matters only for mlx-cpu
        from importlib.metadata import distribution

        distribution("mlx-cuda-13")
        return False
    except Exception:
        pass
    try:
        from importlib.metadata import distribution

        distribution("mlx-cuda-12")
        return False
    except Exception:
        return True


def reexec_with_fast_blas(argv: Optional[list[str]] = None) -> None:
    """Replace this process with one that preloads the fastest BLAS installed (:func:`fast_blas`),
    when that helps.

    ``argv`` are the ``mlx-lora`` arguments (the CLI and ``python -m mlx_lora``); without it the
    process starts again exactly as it was started (``sys.orig_argv``): a script calls this first
    thing, before anything imports mlx. Does nothing on macOS (Accelerate is used), on CUDA, when
    MLX would already use another BLAS than its bundled reference one (one is preloaded), when
    none is installed, or when ``MLX_LORA_NO_BLAS_REEXEC=1``.
    """
    if os.environ.get(REEXEC_FLAG) or os.environ.get("MLX_LORA_NO_BLAS_REEXEC"):
        return
    if not _is_linux_cpu_mlx():
        return
    chosen = fast_blas()
    preloaded = os.environ.get("LD_PRELOAD", "")
    if chosen is None or "openblas" in preloaded or "libmkl" in preloaded or _global_blas() is not None:
        return
    kind, lib, extra_env = chosen
    if kind == "openblas":  # MKL's own small products were fast where measured (Intel, AVX-512)
        kernel = native.build()
        if kernel is not None:
            lib = f"{kernel}:{lib}"
    if argv is not None:
        command = [sys.executable, "-m", "mlx_lora", *argv]
    else:
        command = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
        if not command[0].startswith("/") and "/" not in command[0]:
            command[0] = sys.executable  # `python3 script.py`: the interpreter by its full path
    env = {**os.environ, **extra_env}
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_FLAG] = "1"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env)
    except OSError:
        return  # keep going with the slow BLAS; doctor and the banner will say so


reexec_with_openblas = reexec_with_fast_blas  # the name scripts written for earlier versions call


# The BLAS routine MLX's CPU matmul calls; whichever library the loader binds it to is MLX's BLAS.
_MLX_GEMM = b"cblas_sgemm"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_of(handle, symbol: bytes) -> Optional[str]:
    """The file of the library that ``dlsym(handle, symbol)`` binds to, or None."""
    try:
        address = ctypes.cast(getattr(handle, symbol.decode()), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    try:
        dl = ctypes.CDLL(None)
        dladdr = dl.dladdr
    except (OSError, AttributeError):
        try:
            dladdr = ctypes.CDLL("libdl.so.2").dladdr
        except (OSError, AttributeError):
            return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode(errors="replace"))


def _global_blas() -> Optional[str]:
    """The library the process's global scope binds ``cblas_sgemm`` to (the executable, its
    dependencies, ``LD_PRELOAD``, libraries opened RTLD_GLOBAL), or None. The loader resolves a
    shared library's symbols there first, so when it exists MLX uses it; numpy's bundled OpenBLAS
    is not there (loaded locally, its symbols renamed), which is why mapped file names mislead."""
    try:
        return _library_of(ctypes.CDLL(None), _MLX_GEMM)
    except OSError:
        return None


def _libmlx_path() -> Optional[Path]:
    try:
        from importlib.util import find_spec

        spec = find_spec("mlx")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib" / "libmlx.so"
        if lib.exists():
            return lib
    return None


def mlx_blas_library() -> Optional[str]:
    """The file of the BLAS that MLX's CPU matmuls call in this process (Linux), or None when that
    cannot be told. Asks the dynamic loader, as MLX's own calls are bound: first the global scope,
    then libmlx's own dependencies (the reference BLAS the mlx-cpu wheel bundles)."""
    if sys.platform != "linux":
        return None
    found = _global_blas()
    if found:
        return found
    lib = _libmlx_path()
    if lib is None:
        return None
    try:  # RTLD_NOLOAD: only if MLX is loaded already; otherwise open it (it is about to be)
        handle = ctypes.CDLL(str(lib), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        try:
            handle = ctypes.CDLL(str(lib), mode=os.RTLD_LAZY)
        except OSError:
            return None
    return _library_of(handle, _MLX_GEMM)


KERNEL_NOTE = ", with mlx-lora's small-batch kernel for products of up to 16 rows"


def _behind_kernel(kernel: str) -> Optional[str]:
    """The BLAS that the small-batch kernel at ``kernel`` passes its other products to."""
    try:
        ask = ctypes.CDLL(kernel, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).mlx_lora_small_gemm_next_library
    except (OSError, AttributeError):
        return None
    ask.restype = ctypes.c_char_p
    found = ask()
    return os.path.realpath(found.decode(errors="replace")) if found else None


def loaded_blas() -> str:
    """Which BLAS MLX uses in this process (Linux), or the platform's default."""
    if sys.platform == "darwin":
        return "Accelerate"
    lib = mlx_blas_library()
    if lib is None:
        return "unknown"
    if native.is_kernel(lib):
        behind = _behind_kernel(lib)
        return (_name_blas(behind) if behind else "unknown") + KERNEL_NOTE
    return _name_blas(lib)


def _name_blas(lib: str) -> str:
    name = Path(lib).name
    if "mlx_cpu.libs" in lib or (name.startswith("libblas-") and "site-packages" in lib):
        return f"reference BLAS bundled with mlx-cpu (slow): {name}"
    if "openblas" in lib.lower():
        return f"{BLAS_LABELS['openblas']} (system, preloaded): {lib}"
    if "libmkl" in name.lower():
        return f"{BLAS_LABELS['mkl']} (preloaded): {lib}"
    return lib


def blas_is_slow() -> bool:
    return "reference BLAS" in loaded_blas()


def slow_blas_hint() -> Optional[str]:
    """One line saying how to get a fast BLAS, when MLX is on its slow reference one; else None."""
    if sys.platform != "linux" or not _is_linux_cpu_mlx() or not blas_is_slow():
        return None
    return f"MLX is on the reference BLAS bundled with mlx-cpu (~40x slower); {fast_blas_advice()}"


def fast_blas_advice() -> str:
    """How to get onto the fastest BLAS installed here, or how to install one."""
    chosen = fast_blas()
    if chosen is None:
        return INSTALL_HINT
    _, lib, extra_env = chosen
    env = "".join(f"{k}={v} " for k, v in extra_env.items())
    return (
        f"{lib} exists: use the mlx-lora command, start Python with {env}LD_PRELOAD={lib}, or call "
        f"mlx_lora.plumbing.backend.reexec_with_fast_blas() first thing in the script"
    )


_warned_slow_blas = False


def warn_if_slow_blas() -> None:
    """Log :func:`slow_blas_hint` once per process (the Python API's entry points call this)."""
    global _warned_slow_blas
    if _warned_slow_blas:
        return
    hint = slow_blas_hint()
    _warned_slow_blas = True
    if hint:
        log.warning("slow BLAS: %s", hint)


def backend_name() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:
        pass
    return "cpu"


def default_device_is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def compute_dtype(requested: str = "auto"):
    """float32 on the CPU backend (no fast half-precision matmul there), bfloat16 on GPUs."""
    import mlx.core as mx

    if requested != "auto":
        return getattr(mx, requested)
    return mx.bfloat16 if default_device_is_gpu() else mx.float32


def device_info() -> dict:
    import mlx.core as mx

    try:
        info = dict(mx.device_info())
    except Exception:
        try:
            info = dict(mx.metal.device_info())
        except Exception:
            info = {}
    return info


def total_memory_bytes() -> Optional[int]:
    info = device_info()
    for key in ("memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> Optional[int]:
    """Memory a new allocation can get without swapping or an out-of-memory kill: Linux's
    MemAvailable (free plus reclaimable cache), else free pages, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mlx-lora", "mlx", "mlx-lm", "numpy", "transformers", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def measure_matmul_gflops(n: int = 1024, dtype=None, repeats: int = 3) -> float:
    """Peak-ish matmul throughput of the default device, in GFLOP/s (2 n^3 flops per matmul)."""
    import time

    import mlx.core as mx

    dtype = dtype or compute_dtype()
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def summary(dtype=None) -> dict:
    """The facts shown by ``mlx-lora doctor`` and the train banner."""
    import mlx.core as mx

    name = backend_name()
    facts = {
        "backend": name,
        "device": str(mx.default_device()),
        "device_name": device_info().get("device_name", platform.processor() or platform.machine()),
        "compute_dtype": str(dtype or compute_dtype()).replace("mlx.core.", ""),
        "memory": fmt_bytes(total_memory_bytes()),
    }
    if name == "cpu":
        facts["blas"] = loaded_blas()
        if KERNEL_NOTE not in facts["blas"]:
            facts["small_gemm"] = native.state()
        if blas_is_slow():
            facts["blas_hint"] = fast_blas_advice()
    return facts
