"""GRPO's sampling phase against mlx-lm: tokens sampled per second on the same prompts.

    python bench/grpo_sampling.py --model MODEL [--data mlx_lora/demo_data/arithmetic] [--prompts 4]
        [--group 6] [--max-tokens 16] [--out bench/grpo_sampling.json]

For each of the first ``--prompts`` training prompts, ``--group`` completions of at most
``--max-tokens`` tokens at temperature 0.7: once through :func:`mlx_lora.training.grpo.sample_group` (one
batched decode per group, as a GRPO step samples) and once through ``mlx_lm.stream_generate``, one
completion at a time (what a loop over ``mlx_lm.generate`` does). Both stop at EOS; throughput is
the tokens each sampled over its own wall time, measured in the same process, alternating, after
one warm-up of each. The ratio is the number to read (absolute speed depends on the machine's load).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_lora.config import build
    from mlx_lora.inference.evaluation import eos_ids
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.grpo import load_prompt_splits, sample_group, sample_key

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(HERE.parent / "mlx_lora" / "demo_data" / "arithmetic"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    cfg = build(
        extra={
            "model": {"path": args.model},
            "data": {"path": args.data, "cache": False},
            "train": {"method": "grpo", "reward": "number", "max_completion_length": args.max_tokens},
        }
    )
    model, tokenizer, _ = load_model(args.model)
    model.eval()
    ds = load_prompt_splits(cfg, tokenizer, splits=("train",)).train
    prompts = [ds.examples[i][0].tolist() for i in range(args.prompts)]
    eos = eos_ids(tokenizer)

    def ours():
        n = 0
        for i, p in enumerate(prompts):
            group = sample_group(
                model, p, args.group, args.max_tokens, eos, temperature=args.temperature, key=sample_key(0, 0, i)
            )
            n += sum(len(c) for c in group)
        return n

    def mlx_lm_loop():
        n = 0
        mx.random.seed(0)
        sampler = make_sampler(temp=args.temperature)
        for p in prompts:
            for _ in range(args.group):
                last = None
                for last in stream_generate(model, tokenizer, p, max_tokens=args.max_tokens, sampler=sampler):
                    pass
                n += last.generation_tokens
        return n

    def timed(fn):
        t0 = time.perf_counter()
        n = fn()
        return n, time.perf_counter() - t0

    prompts_warm, prompts = prompts, prompts[:1]
    ours(), mlx_lm_loop()  # warm-up on one prompt
    prompts = prompts_warm
    (n_ours, s_ours), (n_lm, s_lm) = timed(ours), timed(mlx_lm_loop)
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "group": args.group,
        "max_tokens": args.max_tokens,
        "sample_group_tokens": n_ours,
        "sample_group_s": round(s_ours, 2),
        "sample_group_tokens_per_s": round(n_ours / s_ours, 1),
        "mlx_lm_tokens": n_lm,
        "mlx_lm_s": round(s_lm, 2),
        "mlx_lm_tokens_per_s": round(n_lm / s_lm, 1),
        "speedup": round((n_ours / s_ours) / (n_lm / s_lm), 2),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
