"""DPO on the real SmolLM2-135M-Instruct: held-out preference accuracy and greedy answers, before and after.

    python bench/dpo_smollm2.py [--iters 40] [--out bench/dpo_smollm2.json]

The task is the bundled demo's (``recipes/make_demo_data.py``, ``preference_rows``): arithmetic questions
whose chosen reply states the right sum or product in a sentence ("7 plus 5 is 12.") and whose rejected
reply states a wrong one or brushes the question off. 200 training pairs and 40 held-out pairs whose
questions never occur in training. Measured on the held-out pairs: the share whose chosen reply the model
gives the higher log-probability (before and after), the reward accuracy after (DPO's implicit reward
against the base), and greedy answers to the 40 held-out questions: how many state the right result, how
many are a brush-off, how many take the chosen replies' form ("A plus B is C").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _demo_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", HERE.parent / "recipes" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def held_out_scores(model, tokenizer, data: Path):
    """(share preferring chosen by log-prob, reward accuracy against the adapter switched off)."""
    import numpy as np

    from mlx_lora.config import DataConfig
    from mlx_lora.data.batching import iterate_batches
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.model.lora import adapters_off
    from mlx_lora.training.preference import SequenceLogps
    from mlx_lora.training.trainer import batch_arrays

    ds = load_datasets(DataConfig(path=str(data), cache=False), tokenizer, splits=("valid",)).valid
    seq, pol, ref = SequenceLogps(None, None), [], []
    for batch, _ in iterate_batches(ds, 4, max_seq_length=2048, seed=0, shuffle=False, loop=False):
        inputs, targets, mask, _ = batch_arrays(batch)
        pol.append(np.array(seq(model, inputs, targets, mask)))
        with adapters_off(model):
            ref.append(np.array(seq(model, inputs, targets, mask)))
    p, r = np.concatenate(pol).reshape(-1, 2), np.concatenate(ref).reshape(-1, 2)
    return float(np.mean(p[:, 0] > p[:, 1])), float(np.mean((p - r)[:, 0] > (p - r)[:, 1]))


def answers(model_path: str, adapter, questions, brush_offs):
    from mlx_lora.commands import api

    loaded = api.load_for_inference(model_path, adapter, "auto")[:2]
    out, right, brushed = [], 0, 0
    for q, result in questions:
        text = api.generate(model_path, q, adapter, chat=True, max_tokens=24, model_and_tokenizer=loaded)
        ok = re.search(rf"\b{result}\b", text) is not None
        sentence = re.match(r"\s*\d+ (plus|times) \d+ is -?\d+", text) is not None  # the chosen replies' form
        brush = any(b.lower().rstrip(".") in text.lower() for b in brush_offs)
        right, brushed = right + ok, brushed + brush
        out.append({"question": q, "answer": text, "right": ok, "brush_off": brush, "sentence": sentence})
    return out, right, brushed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=HERE / "dpo_smollm2.json")
    args = ap.parse_args(argv)

    import mlx_lora
    from bench.common import imported_model
    from mlx_lora.config import build
    from mlx_lora.model import adapters
    from mlx_lora.model.loading import load_model
    from mlx_lora.plumbing.cache import cache_root

    gen = _demo_generator()
    model_path = str(imported_model("float32"))
    train = gen.preference_rows(n=200, seed=1)
    seen = {r["prompt"][0]["content"] for r in train}
    valid = [r for r in gen.preference_rows(n=120, seed=2) if r["prompt"][0]["content"] not in seen][:40]
    folder = cache_root() / "bench" / "dpo-smollm2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = []
    for r in valid:
        a, word, b = re.search(r"(\d+) (plus|times) (\d+)", r["prompt"][0]["content"]).groups()
        questions.append((r["prompt"][0]["content"], int(a) + int(b) if word == "plus" else int(a) * int(b)))

    model, tok, _ = load_model(model_path)
    prefers_before, _ = held_out_scores(model, tok, folder)
    gen_before, right_before, brush_before = answers(model_path, None, questions, gen.BRUSH_OFFS)
    print(f"before: prefers chosen {prefers_before:.3f}, right {right_before}/40, brush-offs {brush_before}/40")

    run = folder / "run"
    cfg = build(
        extra={
            "model": {"path": model_path},
            "data": {"path": str(folder)},
            "out": str(run),
            "lora": {"r": 16, "alpha": 32},
            "train": {
                "method": "dpo",
                "dpo_beta": args.beta,
                "iters": args.iters,
                "batch_size": 4,
                "lr": args.lr,
                "warmup_steps": 4,
                "eval_every": args.iters,
                "save_every": args.iters,
                "log_every": 5,
            },
        }
    )
    t0 = time.perf_counter()
    result = mlx_lora.train(cfg, overwrite=True)
    train_s = time.perf_counter() - t0

    adapters.load_adapter(model, str(run))
    prefers_after, reward_acc = held_out_scores(model, tok, folder)
    gen_after, right_after, brush_after = answers(model_path, str(run), questions, gen.BRUSH_OFFS)
    print(
        f"after:  prefers chosen {prefers_after:.3f}, reward accuracy {reward_acc:.3f}, right {right_after}/40, "
        f"brush-offs {brush_after}/40 ({result.steps} steps, {train_s:.0f} s)"
    )
    args.out.write_text(
        json.dumps(
            {
                "iters": args.iters,
                "lr": args.lr,
                "beta": args.beta,
                "train_s": train_s,
                "before": {"prefers_chosen": prefers_before, "right": right_before, "brush_offs": brush_before},
                "after": {
                    "prefers_chosen": prefers_after,
                    "reward_accuracy": reward_acc,
                    "right": right_after,
                    "brush_offs": brush_after,
                },
                "answers_before": gen_before,
                "answers_after": gen_after,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
