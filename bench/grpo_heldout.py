"""Held-out score of a GRPO task: the share of prompts whose greedy completion gets the reward
(default ``number``: its first number equals the row's answer), before and after training, and
the mean reward of completions sampled as training samples them (``--samples``).

    python bench/grpo_heldout.py --model MODEL --data mlx_lora/demo_data/arithmetic [--adapter RUN]
        [--samples 6 --temperature 1.0]

Prompts are the ``test`` split (else ``valid``) of the data folder, rendered as training renders
them; completions are at most ``--max-tokens`` tokens. Sampled completions draw from a key fixed
per prompt, so a before and an after run sample the same prompts the same way: training's own
mean reward swings with the few prompts each step draws, this one does not.
"""

from __future__ import annotations

import argparse
import json
import time

from mlx_lora.config import build
from mlx_lora.model import adapters
from mlx_lora.model.loading import load_model
from mlx_lora.training.grpo import greedy_accuracy, load_prompt_splits, sampled_reward


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--reward", default="number")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--samples", type=int, default=0, help="completions sampled per prompt (0: greedy only)")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args(argv)
    cfg = build(
        extra={
            "model": {"path": args.model},
            "data": {"path": args.data, "cache": False},
            "train": {"method": "grpo", "reward": args.reward, "max_completion_length": args.max_tokens},
        }
    )
    model, tokenizer, _ = load_model(args.model)
    if args.adapter:
        adapters.load_adapter(model, args.adapter)
    model.eval()
    splits = load_prompt_splits(cfg, tokenizer, splits=("valid", "test"))
    ds = splits.test if splits.test is not None else splits.valid
    t0 = time.perf_counter()
    score = greedy_accuracy(model, tokenizer, ds, args.reward, args.max_tokens)
    sampled = None
    if args.samples > 0:
        sampled = sampled_reward(model, tokenizer, ds, args.reward, args.max_tokens, args.samples, args.temperature)
    print(
        json.dumps(
            {
                "data": ds.stats.path,
                "prompts": len(ds),
                "adapter": args.adapter,
                "reward": args.reward,
                "greedy_score": score,
                "samples": args.samples,
                "temperature": args.temperature if args.samples else None,
                "sampled_reward": sampled,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
