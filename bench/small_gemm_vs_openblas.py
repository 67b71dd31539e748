"""mlx-lora's small-batch product kernel against the BLAS it is preloaded in front of.

Two measurements, each in its own process per library and alternated over ``--rounds``:

- the weight products of one decode step of SmolLM2-135M (30 blocks x q, k, v, o, gate, up, down:
  210 products ``x @ W.T``) at 1, 8 and 16 rows, best of 7 passes;
- a whole decode step of mlx-lm's own model on the float32 SmolLM2-135M folder (KV cache of a
  40-token prompt), batch 1 and batch 8, median of 40 steps.

Prints ``kernel / BLAS`` time ratios (below 1: the kernel is faster). Linux x86-64 with AVX2, a C
compiler and a system OpenBLAS. Usage: ``python bench/small_gemm_vs_openblas.py [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, imported_model
from mlx_lora.plumbing import backend, native

PROBE = r"""
import json, sys, time
import mlx.core as mx
shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
W = [mx.random.normal(s) for s in shapes]
mx.eval(W)
out = {}
for rows in (1, 8, 16):
    xs = {k: mx.random.normal((rows, k)) for k in (576, 1536)}
    mx.eval(list(xs.values()))
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for w in W:
            mx.eval(xs[w.shape[1]] @ w.T)
        best = min(best, time.perf_counter() - t)
    out[f"products, {rows} rows"] = best
del W
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
model, _ = load(sys.argv[1])
for batch in (1, 8):
    cache = make_prompt_cache(model)
    mx.random.seed(0)
    logits = model(mx.random.randint(0, 1000, (batch, 40)), cache=cache)
    y = mx.argmax(logits[:, -1:], -1)
    mx.eval(y)
    steps = []
    for _ in range(40):
        t = time.perf_counter()
        y = mx.argmax(model(y, cache=cache)[:, -1:], -1)
        mx.eval(y)
        steps.append(time.perf_counter() - t)
    out[f"decode step, batch {batch}"] = sorted(steps)[len(steps) // 2]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    blas = backend.find_openblas()
    if blas is None:
        raise SystemExit(f"no system OpenBLAS: {backend.INSTALL_HINT}")
    kernel = native.build(quiet=False)
    if kernel is None:
        raise SystemExit(f"the kernel cannot be had here: {native.state()}")
    model = imported_model("float32")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", backend.REEXEC_FLAG)}
    env.update(MLX_LORA_NO_BLAS_REEXEC="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    sides = {"kernel": f"{kernel}:{blas}", "OpenBLAS": blas}
    seen: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else reversed(list(sides)):
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(model)],
                env=dict(env, LD_PRELOAD=sides[side]),
                capture_output=True,
                text=True,
                check=True,
            )
            seen[side].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"round {r + 1}: {side} done", flush=True)
    print(f"\nkernel: {kernel}\nBLAS: {blas}\n")
    print(f"{'best of rounds (ms)':<28} {'kernel':>9} {'OpenBLAS':>9} {'kernel/BLAS':>12}")
    for key in seen["kernel"][0]:
        ours = min(run[key] for run in seen["kernel"]) * 1e3
        theirs = min(run[key] for run in seen["OpenBLAS"]) * 1e3
        print(f"{key:<28} {ours:>9.1f} {theirs:>9.1f} {ours / theirs:>11.2f}x")


if __name__ == "__main__":
    main()
