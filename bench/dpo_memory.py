"""Peak memory of a DPO (or ORPO) step against an SFT step on the same pairs.

    python bench/dpo_memory.py [--pairs 4] [--words 150] [--model FOLDER] [--out bench/dpo_memory.json]

SmolLM2-135M-Instruct (imported to float32 as bench/common.py does, unless ``--model``), LoRA r=8 on every
linear layer, one optimizer step on ``--pairs`` preference pairs whose responses are ~``--words`` words.
SFT trains on the same rows (each pair's chosen and rejected as two completions rows), so both steps
compute the same 2 x pairs rows in one call (``train.length_groups: false``). Each method runs in a fresh
process (peak memory is per process); the peak is ``mx.get_peak_memory()`` over the second step (the
first compiles). The target: DPO's peak <= 1.3x SFT's, with one model in memory (the reference is the
same model with its adapter switched off).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORDS = (
    "the river runs past green stones while small birds call from tall trees in the light of a slow "
    "morning and water finds its way down to the sea"
).split()


def make_data(folder: Path, pairs: int, words: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    pref, sft = [], []
    for _ in range(pairs):
        prompt = "Describe the valley: " + " ".join(rng.choice(WORDS) for _ in range(20))
        chosen = " " + " ".join(rng.choice(WORDS) for _ in range(words))
        rejected = " " + " ".join(rng.choice(WORDS) for _ in range(words))
        pref.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        sft += [{"prompt": prompt, "completion": chosen}, {"prompt": prompt, "completion": rejected}]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "pref.jsonl", folder / "sft.jsonl"
    for path, rows in zip(paths, (pref, sft)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def worker(method: str, model: str, data: str, pairs: int) -> dict:
    import mlx.core as mx

    from mlx_lora.config import build
    from mlx_lora.data.batching import iterate_batches
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.model import adapters
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.trainer import Trainer

    rows = pairs if method != "sft" else 2 * pairs  # batch_size counts pairs for dpo / orpo
    cfg = build(
        extra={
            "model": {"path": model},
            "data": {"path": data, "valid_fraction": 0.0, "cache": False, "max_seq_length": 1024},
            "train": {"method": method, "batch_size": rows, "length_groups": False, "iters": 2},
        }
    )
    mx.random.seed(0)
    m, tok, _ = load_model(model)
    ds = load_datasets(cfg.data, tok, splits=("train",)).train
    adapters.apply_lora(m, cfg.lora)
    trainer = Trainer(m, cfg, ds, None, None)
    m.train()
    batch, _ = next(iterate_batches(ds, rows, max_seq_length=1024, seed=0, shuffle=False, loop=False))
    trainer.step_on(batch)  # compiles
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    trainer.step_on(batch)
    seconds = time.perf_counter() - t0
    return {
        "method": method,
        "rows": int(batch.inputs.shape[0]),
        "length": int(batch.inputs.shape[1]),
        "target_tokens": batch.ntokens,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "active_gb_after": mx.get_active_memory() / 1e9,
        "step_s": seconds,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, float32)")
    ap.add_argument("--methods", default="sft,dpo,orpo")
    ap.add_argument("--out", type=Path, default=HERE / "dpo_memory.json")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "MODEL", "DATA", "PAIRS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, model, data, pairs = args.worker
        print(json.dumps(worker(method, model, data, int(pairs))))
        return 0
    if args.model:
        model = args.model
    else:
        from bench.common import imported_model

        model = str(imported_model("float32"))
    from mlx_lora.plumbing.cache import cache_root

    pref, sft = make_data(cache_root() / "bench" / "dpo-memory", args.pairs, args.words)
    results = []
    for method in args.methods.split(","):
        data = sft if method == "sft" else pref
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, model, str(data), str(args.pairs)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{method:5s} rows {r['rows']} x {r['length']}  peak {r['peak_gb']:.3f} GB  step {r['step_s']:.1f} s")
    base = next((r for r in results if r["method"] == "sft"), None)
    if base is not None:
        for r in results:
            r["peak_vs_sft"] = r["peak_gb"] / base["peak_gb"]
            print(f"{r['method']:5s} peak / sft peak = {r['peak_vs_sft']:.2f}x")
    args.out.write_text(
        json.dumps({"pairs": args.pairs, "words": args.words, "model": model, "results": results}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
