"""Facts about the compute backend: device, dtype, BLAS, memory, versions.

On Linux the ``mlx[cpu]`` wheel links a bundled reference BLAS that is ~40x slower than OpenBLAS
for the matmuls LoRA training is made of (2048^3 float32: ~3 vs ~140 GFLOP/s on a 2-core x86 box).
The BLAS is chosen by the dynamic loader when the process starts, so the CLI re-executes itself
once with ``LD_PRELOAD`` pointing at a system OpenBLAS when one is installed (see
:func:`reexec_with_openblas`). Library users can set ``LD_PRELOAD`` themselves; ``doctor`` says how.

This module must not import mlx at import time: the CLI calls it before deciding whether to
re-execute.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional

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
    "`sudo dnf install openblas` (Fedora); mlx-lora then uses it automatically"
)
REEXEC_FLAG = "MLX_LORA_BLAS_REEXEC"


def find_openblas() -> Optional[str]:
    override = os.environ.get("MLX_LORA_OPENBLAS")
    if override:
        return override if Path(override).exists() else None
    for c in OPENBLAS_CANDIDATES:
        if Path(c).exists():
            return c
    return None


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


def reexec_with_openblas(argv: list[str]) -> None:
    """Replace this process with one that preloads a system OpenBLAS, when that helps.

    Does nothing on macOS (Accelerate is used), on CUDA, when already preloaded, when no
    OpenBLAS is installed, or when ``MLX_LORA_NO_BLAS_REEXEC=1``.
    """
    if os.environ.get(REEXEC_FLAG) or os.environ.get("MLX_LORA_NO_BLAS_REEXEC"):
        return
    if not _is_linux_cpu_mlx():
        return
    lib = find_openblas()
    if lib is None or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_FLAG] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlx_lora", *argv], env)
    except OSError:
        return  # keep going with the slow BLAS; doctor and the banner will say so


def loaded_blas() -> str:
    """Which BLAS library this process has mapped (Linux), or the platform's default."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line}
    if any("openblas" in lib.lower() for lib in libs):
        return "OpenBLAS (system, preloaded)"
    if any("mlx_cpu.libs" in lib for lib in libs):
        return "reference BLAS bundled with mlx-cpu (slow)"
    return ", ".join(sorted(libs)) or "none loaded yet"


def blas_is_slow() -> bool:
    return "reference BLAS" in loaded_blas()


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
        if blas_is_slow():
            lib = find_openblas()
            facts["blas_hint"] = (
                f"a system OpenBLAS exists at {lib}: run through the mlx-lora command, or set "
                f"LD_PRELOAD={lib}" if lib else INSTALL_HINT
            )
    return facts
