"""The small-batch product kernel preloaded in front of OpenBLAS on Linux x86-64 CPUs
(``mlx_lora/plumbing/small_gemm.c``): the products it takes are right, a row's result does not
depend on the rows batched with it, the CLI runs on it, and where it cannot be built (no compiler,
a failing compiler) everything runs on the BLAS alone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_harness import fresh_env

from mlx_lora.plumbing import backend, native

OPENBLAS = backend.find_openblas()

needs_kernel = pytest.mark.skipif(
    not native.wanted() or native.compiler() is None or OPENBLAS is None,
    reason="the kernel is for Linux x86-64 CPUs with AVX2 and FMA, a C compiler and a system OpenBLAS",
)


def _run(code: str, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # the timeout only stops a hung child (a deadlocked thread pool): a pass never waits on it
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _doctor(env: dict, cwd: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora", "doctor", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    os.environ["MLX_LORA_CACHE"], old = str(tmp_path_factory.mktemp("cache")), os.environ.get("MLX_LORA_CACHE")
    try:
        built = native.build(quiet=False)
    finally:
        if old is None:
            del os.environ["MLX_LORA_CACHE"]
        else:
            os.environ["MLX_LORA_CACHE"] = old
    assert built is not None and built.exists()
    return built


PRODUCTS = """
import numpy as np, mlx.core as mx, ctypes, json, threading
from mlx_lora.plumbing import backend
rng = np.random.default_rng(0)
worst, unequal_rows, expected = 0.0, [], 0
for M in (1, 2, 3, 4, 5, 8, 13, 16, 17, 40):
    for N, K in ((576, 576), (7, 100), (1537, 577), (4, 1), (300, 63), (49152, 64), (1536, 32), (64, 237)):
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)  # a weight, used transposed
        v = rng.standard_normal((K, N)).astype(np.float32)  # a matrix used as it is (values, rank x out)
        c = rng.standard_normal((M, N)).astype(np.float32)
        for name, right, want in (
            ("transposed", mx.array(w).T, x.astype(np.float64) @ w.astype(np.float64).T),
            ("plain", mx.array(v), x.astype(np.float64) @ v.astype(np.float64)),
        ):
            got = np.array(mx.array(x) @ right)
            fused = np.array(mx.addmm(mx.array(c), mx.array(x), right, alpha=0.5, beta=2.0))
            for out, ref in ((got, want), (fused, 2.0 * c + 0.5 * want)):
                worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
            # the products the kernel takes: <= 16 rows, against a transposed weight of depth >= 64 or
            # a matrix as it is
            if M <= 16 and (name == "plain" or K >= 64):
                expected += 2 + M
                for i in range(M):
                    alone = np.array(mx.array(x[i:i + 1]) @ right)
                    if not (alone == got[i:i + 1]).all():
                        unequal_rows.append([name, M, N, K, i])
# two threads at once (MLX streams on two threads): each gets its own right answer
xs = [rng.standard_normal((8, 576)).astype(np.float32) for _ in range(2)]
w = rng.standard_normal((1536, 576)).astype(np.float32)
outs = [None, None]
def work(i):
    s = mx.new_stream(mx.cpu)
    for _ in range(30):
        outs[i] = np.array(mx.matmul(mx.array(xs[i]), mx.array(w).T, stream=s))
threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
threaded = max(float(np.abs(outs[i] - xs[i].astype(np.float64) @ w.astype(np.float64).T).max()) for i in range(2))
lib = backend.mlx_blas_library()
taken = ctypes.CDLL(lib).mlx_lora_small_gemm_products() if lib and "small_gemm" in lib else 0
print(json.dumps(dict(blas=backend.loaded_blas(), worst=worst, unequal_rows=unequal_rows, expected=expected + 60,
                      threaded=threaded, taken=taken)))
"""


@needs_kernel
def test_small_products_are_right_and_a_row_is_the_same_whatever_it_is_batched_with(kernel, tmp_path):
    r = _run(PRODUCTS, fresh_env(LD_PRELOAD=f"{kernel}:{OPENBLAS}", MLX_LORA_NO_BLAS_REEXEC="1"), tmp_path)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["blas"].startswith(backend.BLAS_LABELS["openblas"]) and backend.KERNEL_NOTE in seen["blas"], seen
    # every product it takes went through it (plain and fused, the rows alone, the threads' 60), no other
    assert seen["taken"] == seen["expected"], seen
    assert seen["worst"] < 2e-6 and seen["threaded"] < 1e-3, seen
    # batched decoding gives each request the answer it gets alone because of this
    assert seen["unequal_rows"] == [], seen


FORK = """
import ctypes, os, numpy as np
gemm = ctypes.CDLL(None).cblas_sgemm  # the kernel, preloaded (MLX itself cannot run in a forked child)
f = ctypes.POINTER(ctypes.c_float)
def product(x, w):
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    gemm(101, 111, 112, x.shape[0], w.shape[0], x.shape[1], ctypes.c_float(1.0), x.ctypes.data_as(f),
         x.shape[1], w.ctypes.data_as(f), w.shape[1], ctypes.c_float(0.0), out.ctypes.data_as(f), w.shape[0])
    return out
rng = np.random.default_rng(0)
w = rng.standard_normal((1536, 576)).astype(np.float32); x = rng.standard_normal((8, 576)).astype(np.float32)
want = x.astype(np.float64) @ w.astype(np.float64).T
assert np.abs(product(x, w) - want).max() < 1e-3  # the parent's threads are running now
pid = os.fork()
if pid == 0:
    os._exit(0 if np.abs(product(x, w) - want).max() < 1e-3 else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@needs_kernel
def test_a_forked_child_runs_products_on_its_own_threads(kernel, tmp_path):
    # the parent's worker threads do not exist in a fork: the child starts its own instead of waiting forever
    r = _run(FORK, fresh_env(LD_PRELOAD=f"{kernel}:{OPENBLAS}", MLX_LORA_NO_BLAS_REEXEC="1"), tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", (r.stdout, r.stderr)


@needs_kernel
def test_the_cli_runs_on_the_kernel_in_front_of_openblas_unless_switched_off(tmp_path):
    cache = tmp_path / "cache"
    for switch, expected in ((None, True), ("off", False)):
        env = fresh_env(MLX_LORA_CACHE=str(cache), MLX_LORA_BLAS="openblas")
        if switch:
            env[native.SWITCH] = switch
        blas = _doctor(env, tmp_path)["blas"]
        assert blas.startswith(backend.BLAS_LABELS["openblas"]), blas
        assert (backend.KERNEL_NOTE in blas) is expected, (switch, blas)
    assert len(list((cache / "native").glob("*.so"))) == 1  # built once, into the cache


def test_without_a_working_compiler_it_is_left_out_and_a_failed_build_is_not_tried_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "wanted", lambda: True)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.compiler() is None and native.build() is None
    tries = tmp_path / "tries"
    broken = tmp_path / "broken-cc"
    broken.write_text(f"#!/bin/sh\necho try >> {tries}\necho 'small_gemm.c:1: error: nope' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    assert native.build() is None and native.build() is None
    assert tries.read_text().count("try") == 1  # remembered, not run at every start
    failed = list((tmp_path / "cache" / "native").glob("*.failed"))
    assert len(failed) == 1 and "error: nope" in failed[0].read_text()
    assert not list((tmp_path / "cache" / "native").glob("*.so")) + list((tmp_path / "cache" / "native").glob("*.tmp"))
    # a CLI on such a machine still runs on the plain BLAS
    if OPENBLAS:
        facts = _doctor(
            fresh_env(MLX_LORA_CACHE=str(tmp_path / "cache"), CC=str(broken), MLX_LORA_BLAS="openblas"), tmp_path
        )
        assert facts["blas"].startswith(backend.BLAS_LABELS["openblas"]) and backend.KERNEL_NOTE not in facts["blas"]
        assert "failed" in facts["small_gemm"] and str(failed[0]) in facts["small_gemm"], facts


def test_it_is_left_out_when_switched_off_or_on_another_machine(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "off")
    assert not native.wanted() and native.build() is None
    monkeypatch.delenv(native.SWITCH)
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert not native.wanted()
