"""Where a training job's memory goes, phase by phase (see ``mlx_lora/training/memory.py``).

    python bench/memory_trace.py                                  # SmolLM2-135M, the benchmark's data
    python bench/memory_trace.py --model /tmp/llama1b-rand --set train.shapes=packed --json trace.json

The job is the benchmark's (LoRA r=8 alpha=16 on q/k/v/o/gate/up/down, batch 4, generated chat
rows of 45..512 tokens) unless ``--data``/``--set`` change it; the trace runs on the call that
sets the peak (the longest). Columns: active memory after the phase, its peak, the peak above the
previous phase's active memory (what the phase needed), the allocator's cache, the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M imported for this backend's dtype)")
    ap.add_argument("--data", help="JSONL file or folder (default: the benchmark's generated rows)")
    ap.add_argument("--rows", type=int, default=32, help="generated rows (without --data)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--json", help="write the phases here")
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mlx_lora.config import build
    from mlx_lora.plumbing import backend
    from mlx_lora.training.estimate import trace

    dtype = "bfloat16" if backend.backend_name() != "cpu" else "float32"
    model = args.model or str(common.imported_model(dtype, print))
    data = args.data
    if data is None:
        work = Path(tempfile.mkdtemp(prefix="mlx-lora-memtrace-"))
        data = str(common.write_jsonl(work / "train.jsonl", common.make_rows(args.rows, 0, 30, args.max_len, 140)))
    cfg = build(
        extra={
            "model": {"path": model, "dtype": dtype},
            "data": {"path": data, "valid_fraction": 0.0, "max_seq_length": 2 * args.max_len},
            "lora": {"r": 8, "alpha": 16.0, "target_modules": [k.split(".")[-1] for k in common.LORA_KEYS]},
            "train": {"batch_size": args.batch_size, "optimizer": "adam", "max_grad_norm": None},
        },
        overrides=args.set,
    )
    notes: list[str] = []
    rec = trace(cfg, log=notes.append)
    lines = [
        f"memory trace  {backend.backend_name()} ({backend.device_info().get('device_name', '?')}), compute "
        f"{dtype}, model {model}",
        *notes,
        *rec.lines(),
    ]
    print("\n".join(lines))
    out = {
        "backend": backend.backend_name(),
        "dtype": dtype,
        "model": model,
        "overrides": args.set,
        "notes": notes,
        "phases": rec.as_dict(),
        "peak_memory_bytes": max(p.peak for p in rec.phases),
        "mlx": getattr(mx, "__version__", "?"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
