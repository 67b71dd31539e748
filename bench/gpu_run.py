"""The whole GPU measurement in one go, within a time budget (``bench/gpu_run.sh`` installs MLX's CUDA
wheels and calls this; see bench/README.md "On a lent GPU").

    python bench/gpu_run.py --like SMOLLM2_FOLDER --out OUT_DIR --budget 540    # on the GPU
    python bench/gpu_run.py --dry --out /tmp/gpu-dry                             # the same steps on the CPU, tiny

Steps, in order of what the issue needs most, each with the time left (a step that cannot start
with at least its minimum is skipped and recorded as such):

1. facts: MLX version, backend, device;
2. random-weight llamas with SmolLM2's tokenizer: Llama-3.2-1B's blocks and SmolLM2-135M's;
3. ``train_vs_mlx_lm.py`` on the 1B shape, bf16, ``--epochs 3``, with a lever run per shape
   policy (exact, ladder, packed): tokens/s over passes 2-3, peak memory, first-epoch time;
4. the per-phase memory trace of the 1B job (``memory_trace.py``), auto and packed shapes;
5. the same benchmark on the SmolLM2-135M shape;
6. packed-attention mask forms at the 1B's attention shape (``attention_mask.py``).

Everything lands in ``--out``: one JSON per step plus ``gpu_run.json`` (each step's command, exit
status, seconds and the end of its output). ``--dry`` runs every step on the CPU with a tiny
model, 2 passes of 4 steps and no levers beyond packed, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--like", help="HF-layout folder with SmolLM2's tokenizer and config (default: dry: a tiny random model's)"
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-run-"))
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps together")
    ap.add_argument("--work", default=None, help="scratch folder for models and runs (default: a temporary one)")
    ap.add_argument("--dry", action="store_true", help="run every step on the CPU at tiny sizes")
    ap.add_argument(
        "--step-cap", type=float, default=None, help="most seconds any one step may take (default: each step's own cap)"
    )
    ap.add_argument(
        "--only", help="comma list of step kinds to run: facts, models, bench, trace, attention (default: all)"
    )
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-run-work-"))
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    py = sys.executable
    record: dict = {"dry": args.dry, "host": platform.node(), "budget_s": args.budget, "steps": []}

    kinds = set((args.only or "facts,models,bench,trace,attention").split(","))

    def step(name: str, cmd: list, minimum: float, cap: float, partial: tuple = ()) -> bool:
        """Run ``cmd`` with the time left (at most ``cap``); ``partial``: (work folder, JSON it should
        have written): when the JSON is missing (the step ran out of time), the results of the runs
        it finished (``*.result.json`` in its work folder) are gathered into ``<name>.partial.json``."""
        left = deadline - time.monotonic()
        entry = {"name": name, "command": " ".join(str(c) for c in cmd)}
        kind = name.split("_")[0].replace("model", "models")
        if kind not in kinds:
            return True
        if left < minimum:
            entry.update(skipped=f"{left:.0f} s left, needs {minimum:.0f}")
            print(f"[gpu_run] {name}: skipped ({entry['skipped']})", flush=True)
            record["steps"].append(entry)
            return False
        limit = min(left, cap, args.step_cap or cap)
        print(f"[gpu_run] {name}: up to {limit:.0f} s: {entry['command']}", flush=True)
        t0 = time.monotonic()
        # Its own process group, so that a timeout also stops the workers it started.
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        try:
            text, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            rc = "timeout"
        entry.update(rc=rc, seconds=round(time.monotonic() - t0, 1), tail=text[-6000:])
        if partial and not Path(partial[1]).is_file():
            done = {
                p.name.removesuffix(".result.json"): json.loads(p.read_text())
                for p in sorted(Path(partial[0]).glob("*.result.json"))
            }
            (out / f"{name}.partial.json").write_text(json.dumps(done))
            entry["partial"] = sorted(done)
        print(f"[gpu_run] {name}: exit {rc} after {entry['seconds']} s", flush=True)
        print(text[-2500:], flush=True)
        record["steps"].append(entry)
        (out / "gpu_run.json").write_text(json.dumps(record, indent=1))
        return rc == 0

    # 1. facts
    step(
        "facts",
        [
            py,
            "-c",
            "import json, mlx.core as mx; from mlx_lora.plumbing import backend; "
            "print(json.dumps({'mlx': mx.__version__, 'backend': backend.backend_name(), "
            "'device': str(mx.default_device()), 'info': {k: str(v) for k, v in backend.device_info().items()}}))",
        ],
        5,
        120,
    )

    # 2. models
    like = args.like
    if args.dry:
        sizes = {
            "big": ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2"],
            "small": ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1"],
        }
        dtype = ["--dtype", "float32"]
        if like is None:
            from mlx_lora.testing import make_tiny_model

            like = str(make_tiny_model("llama", work / "like"))
    else:
        sizes = {"big": ["--shape", "1b"], "small": ["--shape", "smollm2-135m"]}
        dtype = ["--dtype", "bfloat16"]
    if like is None:
        raise SystemExit("error: --like (a folder with SmolLM2's tokenizer and config) is required off --dry")
    models = {}
    for name in ("big", "small"):
        folder = work / f"model-{name}"
        if (
            step(
                f"model_{name}",
                [
                    py,
                    BENCH / "make_random_model.py",
                    "--like",
                    like,
                    "--out",
                    folder,
                    "--overwrite",
                    *sizes[name],
                    *dtype,
                ],
                10,
                240,
            )
            and folder.is_dir()
        ):
            models[name] = folder

    # 3-6. measurements
    if args.dry:
        bench_args = [
            "--epochs",
            "2",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--max-len",
            "96",
            "--median-len",
            "60",
            "--valid-rows",
            "2",
            "--lockstep-steps",
            "1",
            "--lowmem-steps",
            "1",
            "--levers",
            "shapes_packed",
        ]
        attn = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--length", "64", "--repeats", "2"]
        trace_args = ["--rows", "6", "--max-len", "96", "--batch-size", "2"]
    else:
        bench_args = [
            "--epochs",
            "3",
            "--steps",
            "48",
            "--valid-rows",
            "4",
            "--lockstep-steps",
            "2",
            "--lowmem-steps",
            "1",
            "--levers",
            "shapes_exact,shapes_ladder,shapes_packed",
        ]
        attn = [
            "--heads",
            "32",
            "--kv-heads",
            "8",
            "--head-dim",
            "64",
            "--length",
            "2048",
            "--batch",
            "2",
            "--dtype",
            "bfloat16",
        ]
        trace_args = []
    if "big" in models:
        step(
            "bench_1b",
            [
                py,
                BENCH / "train_vs_mlx_lm.py",
                "--model",
                models["big"],
                "--no-out-of-box",
                *bench_args,
                "--work",
                work / "bench-big",
                "--json",
                out / "bench_1b.json",
            ],
            60,
            420,
            partial=(work / "bench-big", out / "bench_1b.json"),
        )
        step(
            "trace_1b",
            [py, BENCH / "memory_trace.py", "--model", models["big"], *trace_args, "--json", out / "trace_1b.json"],
            20,
            120,
        )
        step(
            "trace_1b_packed",
            [
                py,
                BENCH / "memory_trace.py",
                "--model",
                models["big"],
                *trace_args,
                "--set",
                "train.shapes=packed",
                "--json",
                out / "trace_1b_packed.json",
            ],
            20,
            120,
        )
    if "small" in models:
        step(
            "bench_135m",
            [
                py,
                BENCH / "train_vs_mlx_lm.py",
                "--model",
                models["small"],
                "--no-out-of-box",
                *bench_args,
                "--work",
                work / "bench-small",
                "--json",
                out / "bench_135m.json",
            ],
            60,
            300,
            partial=(work / "bench-small", out / "bench_135m.json"),
        )
    step("attention_1b", [py, BENCH / "attention_mask.py", *attn, "--json", out / "attention_1b.json"], 10, 60)
    record["wall_s"] = round(args.budget - (deadline - time.monotonic()), 1)
    (out / "gpu_run.json").write_text(json.dumps(record, indent=1))
    failed = [s["name"] for s in record["steps"] if s.get("rc") not in (0, None)]
    print(
        f"[gpu_run] done in {record['wall_s']} s; failed: {', '.join(failed) or 'none'}; results in {out}", flush=True
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
