"""Packed-row attention: time and peak memory of ``mx.fast.scaled_dot_product_attention``'s forward
and backward pass with the block-diagonal mask in each form it accepts, against the causal mask of
an unpacked row of the same length.

    python bench/attention_mask.py                       # SmolLM2-135M's attention: 9 heads (3 kv) x 64
    python bench/attention_mask.py --heads 32 --kv-heads 8 --length 2048 --dtype bfloat16   # a 1B llama

Forms: ``causal`` (mlx's string mask, unpacked reference), ``bool [B,1,L,L]`` (what mlx-lora
passes: one byte per pair, broadcast over heads), ``additive <dtype> [B,1,L,L]`` (0 / -inf in the
compute dtype), ``additive float32 [B,H,L,L]`` (a mask materialised per head in float32, the form to
avoid). Each runs the compiled forward+backward twice; the second run's time and peak are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the backend's, float32 on the CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mlx_lora.data.batching import attention_mask_from_segments
    from mlx_lora.plumbing.backend import backend_name, compute_dtype

    dtype = getattr(mx, args.dtype) if args.dtype else compute_dtype()
    B, H, K, D, L = args.batch, args.heads, args.kv_heads, args.head_dim, args.length
    q = mx.random.normal((B, H, L, D)).astype(dtype)
    k = mx.random.normal((B, K, L, D)).astype(dtype)
    v = mx.random.normal((B, K, L, D)).astype(dtype)
    # Four examples per row, of 40%, 30%, 20% and 10% of the row.
    seg = np.zeros((B, L), np.int32)
    cuts = np.cumsum([0, int(0.4 * L), int(0.3 * L), int(0.2 * L), L - sum([int(0.4 * L), int(0.3 * L), int(0.2 * L)])])
    for s in range(4):
        seg[:, cuts[s] : cuts[s + 1]] = s + 1
    allowed = attention_mask_from_segments(seg)
    forms = {
        "causal": "causal",
        "bool [B,1,L,L]": mx.array(allowed),
        f"additive {str(dtype).split('.')[-1]} [B,1,L,L]": mx.array(np.where(allowed, 0.0, -np.inf)).astype(dtype),
        "additive float32 [B,H,L,L]": mx.array(
            np.broadcast_to(np.where(allowed, 0.0, -np.inf), (B, H, L, L)).astype(np.float32)
        ),
    }
    scale = D**-0.5

    results = {}
    for name, mask in forms.items():

        def loss(q, k, v, mask=mask):
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
            return (o.astype(mx.float32) ** 2).sum()

        step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))
        best, peak = float("inf"), 0
        for i in range(args.repeats):
            mx.eval(q, k, v)
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            t0 = time.perf_counter()
            mx.eval(step(q, k, v))
            dt = time.perf_counter() - t0
            if i:
                best, peak = min(best, dt), max(peak, mx.get_peak_memory() - base)
        results[name] = {"ms": 1000 * best, "peak_mb": peak / 1e6}
        print(f"{name:<30} {1000 * best:9.1f} ms  peak {peak / 1e6:9.1f} MB above the inputs", flush=True)
    out = {"backend": backend_name(), "dtype": str(dtype), "shape": [B, H, K, L, D], "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
