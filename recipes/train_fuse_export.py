#!/usr/bin/env python3
# python recipes/train_fuse_export.py --model M --data D --name my-model
#
# The whole pipeline in one script: train a LoRA adapter -> fuse it -> GGUF -> Ollama Modelfile (and `ollama create`).
#
# task:    pipeline
# model:   any model mlx-lora trains (folder, hub id or .gguf)
# data:    any JSONL file or train/valid/test folder
# memory:  that of the training config (see `mlx-lora recipes list`)
"""Train, fuse, export to GGUF and package for Ollama, using only mlx-lora's public API.

    python recipes/train_fuse_export.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data data/triage --name triage-bot
    python recipes/train_fuse_export.py --config recipes/chat-sft.yaml --model M --data D --name my-chat \\
        --set train.iters=200 --type q4_k_m

Writes ``OUT/run`` (the training run folder: adapter, checkpoints, metrics), ``OUT/fused`` (the
merged model in Hugging Face format) and ``OUT/ollama`` (``NAME.TYPE.gguf`` and a Modelfile);
``OUT`` defaults to ``runs/NAME``. When ``ollama`` is on PATH the model is registered with
``ollama create`` (``--no-create`` skips that), and the script ends with the commands that run
the model in Ollama and llama.cpp. After an interruption, ``--resume`` continues training from
the last checkpoint; ``--overwrite`` starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_lora.plumbing.backend import reexec_with_fast_blas

# Before MLX loads: on Linux CPUs start again with the fastest BLAS installed preloaded (MKL on an
# Intel CPU, else a system OpenBLAS; MLX's bundled reference BLAS is ~40x slower); elsewhere this
# does nothing.
if __name__ == "__main__":
    reexec_with_fast_blas()

from mlx_lora import config
from mlx_lora.commands import api
from mlx_lora.converters.fuse import fuse
from mlx_lora.converters.packaging import export_ollama
from mlx_lora.plumbing import logs
from mlx_lora.plumbing.errors import MlxLoraError

EXIT_INTERRUPTED = 130  # as a shell reports a Ctrl-C


class Interrupted(Exception):
    """Training stopped early (Ctrl-C, SIGTERM): its adapter is partial, so nothing is fused or exported."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_config(args) -> config.Config:
    overrides = [f"model.path={args.model}", f"data.path={args.data}", f"out={args.out / 'run'}"]
    if args.iters is not None:
        overrides.append(f"train.iters={args.iters}")
    return config.build(str(args.config) if args.config else None, overrides + list(args.set))


def run(args) -> dict:
    """Train, fuse, export; returns each stage's output path."""
    cfg = build_config(args)
    run_dir = Path(cfg.out)
    log(f"== train: {cfg.model.path} on {cfg.data.path} -> {run_dir}")
    result = api.train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.interrupted:
        raise Interrupted(
            f"training was interrupted at step {result.steps}; the adapter is partial, so it was "
            f"not fused or exported. Continue with the same command and --resume"
        )

    fused_dir = args.out / "fused"
    log(f"== fuse -> {fused_dir}")
    fuse(cfg.model.path, run_dir, fused_dir, overwrite=args.overwrite or args.resume, log=log)

    log(f"== export {args.type} GGUF + Modelfile -> {args.out / 'ollama'}")
    pkg = export_ollama(
        str(fused_dir),
        None,
        args.name,
        out_dir=args.out / "ollama",
        type_name=args.type,
        create=args.create,
        system=args.system,
        overwrite=args.overwrite or args.resume,
        log=log,
    )
    gguf = next(p for p in pkg.files if p.suffix == ".gguf")
    log("")
    log(f"llama.cpp: llama-cli -m {gguf} -cnv" + (" -sys '...'" if args.system else ""))
    if pkg.created:
        log(f"Ollama:    ollama run {args.name}")
    else:
        log(f"Ollama:    cd {pkg.folder} && ollama create {args.name} -f Modelfile && ollama run {args.name}")
    return {
        "run": str(run_dir),
        "fused": str(fused_dir),
        "gguf": str(gguf),
        "modelfile": str(pkg.folder / "Modelfile"),
        "created": pkg.created,
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="base model: local folder, Hugging Face id or .gguf file")
    ap.add_argument("--data", required=True, help="JSONL file or folder with train.jsonl [valid.jsonl test.jsonl]")
    ap.add_argument("--name", required=True, help="model name in Ollama (letters, digits, . _ - : /)")
    ap.add_argument(
        "--config", type=Path, help="training config, e.g. recipes/chat-sft.yaml (default: built-in defaults)"
    )
    ap.add_argument("--out", type=Path, help="output folder (default runs/NAME)")
    ap.add_argument("--iters", type=int, help="training steps (overrides the config)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--type", default="q8_0", help="GGUF type: f16, q8_0, q4_0, q4_k_m, ... (default q8_0)")
    ap.add_argument("--system", help="SYSTEM prompt for the Modelfile")
    ap.add_argument(
        "--create",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run `ollama create` (default: when ollama is on PATH)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in OUT/run, then redo fuse and export"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in OUT")
    args = ap.parse_args(argv)
    args.out = args.out or Path("runs") / args.name.replace("/", "_").replace(":", "_")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.setup()  # the library's progress and banner lines on stderr, as the mlx-lora command shows them
    try:
        run(args)
    except MlxLoraError as e:
        log(f"error: {e}")
        return e.exit_code
    except Interrupted as e:
        log(f"stopped: {e}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # during fuse or export: their outputs are written atomically
        log("stopped: interrupted; what was written before is complete, the step in progress was not kept")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
