"""The ``mlx-lora`` command. Thin: parse options, build a config, call one library function.

Heavy imports (mlx, mlx-lm, numpy) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback

import click

from mlx_lora.plumbing import logs

# name -> ("module:attribute", short help) of commands defined outside this file, imported on first
# use. `mlx-lora --help` lists them from the short help here, without importing them (their modules
# pull in numpy, jinja2 and the config, about a second on a small machine); tests/test_cli.py checks
# each short help against the command's own.
LAZY_COMMANDS = {
    "convert": (
        "mlx_lora.commands.convert_cli:convert",
        "Convert SRC (Hugging Face folder or repo id, or a .gguf file) into an MLX model folder.",
    ),
    "fuse": (
        "mlx_lora.commands.export_cli:fuse",
        "Merge an adapter into its base model and write an HF-format folder (safetensors + tokenizer).",
    ),
    "export": (
        "mlx_lora.commands.export_cli:export",
        "Export a model (+ adapter) for llama.cpp, Ollama, LM Studio or Hugging Face PEFT.",
    ),
    "quickstart": (
        "mlx_lora.commands.quickstart:quickstart_command",
        "Fine-tune a small real model on a bundled task, end to end (about 5-10 minutes on a laptop CPU).",
    ),
    "recipes": (
        "mlx_lora.commands.recipes:recipes_group",
        "Ready-made fine-tuning jobs: list, show and copy them; find the bundled demo data.",
    ),
    "chat": (
        "mlx_lora.commands.chat:chat_command",
        "Chat with a model (and adapter) in the terminal; replies stream as they are made.",
    ),
    "serve": (
        "mlx_lora.commands.serve:serve_command",
        "Serve the model and its adapters over an OpenAI-compatible HTTP API.",
    ),
}


def lazy_command(name: str):
    """The click command ``name`` of :data:`LAZY_COMMANDS`, imported now."""
    module, attr = LAZY_COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            # A command that fails to import is a broken installation: let the error show.
            return lazy_command(name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """The command list of ``--help``, without importing the lazy commands."""
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-q", "--quiet", "quiet_all", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also debug messages.")
@click.option("--debug", is_flag=True, help="Debug messages and full tracebacks for errors.")
@click.version_option(package_name="mlx-lora")
@click.pass_context
def cli(ctx, quiet_all, verbose, debug):
    """Fine-tune LLMs with LoRA, QLoRA and DoRA on MLX, then fuse or export them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug or bool(os.environ.get("MLX_LORA_DEBUG"))
    logs.setup(logs.VERBOSE if (verbose or ctx.obj["debug"]) else logs.QUIET if quiet_all else logs.NORMAL)


def _overrides(**options) -> dict:
    """CLI options that were given, as a nested config dict."""
    mapping = {
        "model": ("model", "path"),
        "data": ("data", "path"),
        "out": ("out",),
        "iters": ("train", "iters"),
        "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"),
        "lr": ("train", "lr"),
        "rank": ("lora", "r"),
        "alpha": ("lora", "alpha"),
        "dora": ("lora", "use_dora"),
        "max_seq_length": ("data", "max_seq_length"),
        "seed": ("train", "seed"),
        "grad_checkpoint": ("train", "grad_checkpoint"),
        "packing": ("data", "packing"),
        "steps_per_eval": ("train", "eval_every"),
        "save_every": ("train", "save_every"),
        "steps_per_report": ("train", "log_every"),
        "grad_accumulation_steps": ("train", "grad_accum"),
    }
    out: dict = {}
    # mlx-lm's spellings, with mlx-lm's meanings (see docs/coming-from-mlx-lm.md)
    num_layers, kind = options.pop("num_layers", None), options.pop("fine_tune_type", None)
    mask_prompt, val_batches = options.pop("mask_prompt", None), options.pop("val_batches", None)
    if num_layers is not None:  # the last N blocks; -1 (mlx-lm: any N <= 0) every block
        out.setdefault("lora", {})["layers_to_transform"] = None if num_layers <= 0 else list(range(-num_layers, 0))
    if kind == "full":
        from mlx_lora.plumbing.errors import ConfigError

        raise ConfigError(["--fine-tune-type full: full fine-tuning is not available (lora or dora)"])
    if kind is not None:
        out.setdefault("lora", {})["use_dora"] = kind == "dora"
    if mask_prompt:  # mlx-lm's --mask-prompt: the loss on the last message (the completion) only
        out.setdefault("data", {})["train_on"] = "last"
    if val_batches is not None:
        out.setdefault("train", {})["eval_batches"] = None if val_batches == -1 else val_batches
    for key, value in options.items():
        if value is None or key not in mapping:
            continue
        path = mapping[key]
        if len(path) == 1:
            out[path[0]] = value
        else:
            out.setdefault(path[0], {})[path[1]] = value
    return out


@cli.command()
@click.option(
    "-c",
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML config (see recipes/), or an mlx-lm config (translated; the equivalent is printed).",
)
@click.option("--model", help="Local HF/MLX folder, Hugging Face repo id, or .gguf file.")
@click.option(
    "--data",
    help="JSONL file or folder with train.jsonl [valid.jsonl test.jsonl], a datasets "
    "save_to_disk folder, or hf:org/name[:config][@split].",
)
@click.option("--out", "--adapter-path", "out", help="Run folder (default runs/run).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. lora.r=16.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--iters", type=int, help="Optimizer steps.")
@click.option("--steps-per-eval", type=int, help="Validate every N steps (train.eval_every).")
@click.option("--val-batches", type=int, help="Validation batches per evaluation; -1: all (train.eval_batches).")
@click.option("--steps-per-report", type=int, help="Report every N steps (train.log_every).")
@click.option("--save-every", type=int, help="Checkpoint every N steps (train.save_every).")
@click.option("--grad-accumulation-steps", type=int, help="Micro-batches per step (train.grad_accum).")
@click.option("--epochs", type=float, help="Passes over the training data (when --iters is not given).")
@click.option("--batch-size", type=int)
@click.option("--lr", "--learning-rate", "lr", type=float, help="Peak learning rate.")
@click.option("--rank", type=int, help="LoRA rank r.")
@click.option("--alpha", type=float, help="LoRA alpha (scale = alpha / r).")
@click.option("--dora/--no-dora", default=None, help="Use DoRA instead of LoRA.")
@click.option(
    "--fine-tune-type",
    type=click.Choice(["lora", "dora", "full"]),
    help="mlx-lm's spelling of --no-dora / --dora (full is not available).",
)
@click.option("--num-layers", type=int, help="Adapt the last N transformer blocks; -1: all (lora.layers_to_transform).")
@click.option(
    "--mask-prompt",
    is_flag=True,
    default=None,
    help="mlx-lm's --mask-prompt: the loss on the last message only (data.train_on last).",
)
@click.option("--max-seq-length", type=int)
@click.option("--packing/--no-packing", default=None, help="Pack short examples into full rows.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Trade compute for memory.")
@click.option("--seed", type=int)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Measure a few steps and print the job's peak memory and duration; train nothing, write nothing.",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="This is one rank of an mlx.launch job: fail at once if there is no group to join.",
)
@click.option(
    "--dist-timeout",
    type=float,
    metavar="SECONDS",
    help="How long a rank waits for the others (to connect, or in a collective) before exiting "
    "[default: 300, or $MLX_LORA_DIST_TIMEOUT].",
)
def train(config_file, sets, resume_dir, overwrite, quiet, dry_run, distributed, dist_timeout, **options):
    """Fine-tune an adapter. Writes config, adapter, checkpoints and metrics to the run folder.

    Several processes or Macs: mlx.launch --hostfile hosts.json --python "$(which python)" -m mlx_lora
    train ... --distributed (each rank trains on its share of every batch; rank 0 writes the run)."""
    from mlx_lora import config
    from mlx_lora.commands import api

    if resume_dir:
        run_config = os.path.join(resume_dir, "config.yaml")
        # --config stands in for a run folder that lives on another machine (ranks > 0)
        if not os.path.isfile(run_config) and not config_file:
            from mlx_lora.plumbing.errors import CheckpointError

            raise CheckpointError(f"{resume_dir}: no run to resume (config.yaml missing)")
        config_file = config_file or run_config
        options["out"] = resume_dir
    cfg = config.build(
        config_file,
        list(sets),
        extra=_overrides(**options),
        on_translate=None if quiet else (lambda text: click.echo(text, err=True)),
    )
    if dry_run:
        from mlx_lora.training.estimate import estimate

        est = estimate(cfg, log=None if quiet else (lambda m: click.echo(m, err=True)))
        click.echo("\n".join(est.lines()))
        return
    result = api.train(
        cfg,
        resume=bool(resume_dir),
        overwrite=overwrite,
        progress=not quiet,
        distributed=distributed,
        dist_timeout_s=dist_timeout,
    )
    if result.stopped == "interrupted":
        sys.exit(130)


def sampling_options(f):
    """--temperature, --top-p, --seed, --strict and --trust-remote-code, as generate and chat take them."""
    for option in reversed(
        (
            click.option(
                "--temperature", "--temp", type=float, default=0.0, show_default=True, help="0 = greedy; up to 100."
            ),
            click.option(
                "--top-p",
                type=float,
                default=1.0,
                show_default=True,
                help="Sample from the most likely tokens holding this much probability, in (0, 1].",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed, 0 to 2**32-1."),
            click.option(
                "--strict", is_flag=True, help="Refuse an adapter trained on a different base model (default: warn)."
            ),
            click.option(
                "--trust-remote-code", is_flag=True, help="Let the model folder run the Python code it ships."
            ),
        )
    ):
        f = option(f)
    return f


@cli.command()
@click.argument("run", required=False)
@click.option("--model", help="Base model (folder, repo id or .gguf) [default: the one RUN or --adapter records].")
@click.option(
    "--adapter", "--adapter-path", "adapter", help="Adapter or run folder, PEFT or mlx-lm layout (or give it as RUN)."
)
@click.option("--prompt", required=True, help="Prompt text ('-' reads standard input).")
@click.option(
    "--chat/--raw",
    default=None,
    help="Wrap the prompt in the chat template as a user turn, or continue it as raw text "
    "[default: --chat when the model has a chat template and the prompt is plain text].",
)
@click.option("--system", help="System message (with --chat).")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="At most this many new tokens (>= 1).")
@sampling_options
def generate(
    run, model, adapter, prompt, chat, system, max_tokens, temperature, top_p, seed, strict, trust_remote_code
):
    """Generate text with a model and optional adapter (streams to standard output).

    RUN, a run folder (e.g. runs/quickstart/run), is the adapter and names its base model."""
    from mlx_lora.commands import api
    from mlx_lora.commands.run_inputs import resolve

    model, adapter, _ = resolve(model, adapter, run)
    if prompt == "-":
        prompt = sys.stdin.read()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        click.echo(text, err=True)

    shown = ""
    for piece in api.generate(
        model,
        prompt,
        adapter,
        chat="auto" if chat is None else chat,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=True,
        strict=strict,
        note=note,
        trust_remote_code=trust_remote_code,
    ):
        shown += piece
        click.echo(piece, nl=False)
    click.echo()
    if not shown.strip():
        how = (
            "with the chat template applied"
            if notes or chat
            else "as raw text; a chat-tuned model usually wants --chat"
        )
        click.echo(
            f"the model answered with no text (it ended at once, prompt taken {how}); "
            f"try another prompt, or more --max-tokens",
            err=True,
        )


@cli.command(name="eval")
@click.argument("run", required=False)
@click.option("--model", help="Base model [default: the one RUN or --adapter records].")
@click.option(
    "--adapter", "--adapter-path", "adapter", help="Adapter or run folder, PEFT or mlx-lm layout (or give it as RUN)."
)
@click.option(
    "--data",
    required=True,
    help="JSONL file, a folder with test.jsonl / valid.jsonl, or a data set "
    "(hf: id or save_to_disk folder: its @split, test or validation split).",
)
@click.option("--batch-size", type=int, help="Rows per batch [default: 4; 16 with --generate].")
@click.option("--max-seq-length", type=int, help="[default: the run's data.max_seq_length, else 2048]")
@click.option(
    "--train-on",
    type=click.Choice(["assistant", "last", "all"]),
    help="Which tokens the loss covers [default: the run's data.train_on, else assistant].",
)
@click.option(
    "--chat-template",
    help="'chatml' or a .jinja file, for tokenizers without a template [default: the run's data.chat_template].",
)
@click.option("--max-batches", type=int, help="Evaluate at most this many batches (>= 1; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--strict", is_flag=True, help="Refuse an adapter trained on a different base model (default: warn).")
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="FIELD=COLUMN",
    help="Map a column onto a format field (as data.columns), e.g. --column completion=answer.",
)
@click.option("--generate", is_flag=True, help="Answer each row with the model and score the answers (see --metric).")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="NAME",
    help="With --generate: exact, contains, json, rouge-l, pass@1 (repeat or comma-separate) "
    "[default: chosen from the data].",
)
@click.option("--compare", is_flag=True, help="With --generate: score the base model and --adapter side by side.")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="With --generate: per-example outputs (JSONL).")
@click.option("--overwrite", is_flag=True, help="Replace an --out file an earlier eval wrote.")
@click.option("--limit", type=int, help="With --generate: only the first N rows.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="With --generate: new tokens per answer.")
@click.option("--temperature", "--temp", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling, in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=10.0,
    show_default=True,
    help="pass@1: seconds each row's code and tests may run.",
)
@click.option(
    "--unsafe-exec",
    is_flag=True,
    help="pass@1 on a machine without a sandbox (see `mlx-lora doctor`): run each row's code unconfined.",
)
@click.option("--trust-remote-code", is_flag=True, help="Let the model folder run the Python code it ships.")
def eval_(
    run,
    model,
    adapter,
    data,
    batch_size,
    max_seq_length,
    train_on,
    chat_template,
    max_batches,
    as_json,
    strict,
    columns,
    generate,
    metrics,
    compare,
    out,
    overwrite,
    limit,
    max_tokens,
    temperature,
    top_p,
    seed,
    timeout_s,
    unsafe_exec,
    trust_remote_code,
):
    """Loss and perplexity on a data set; with --generate, scores of generated answers.

    RUN, a run folder (e.g. runs/quickstart/run), is the adapter and names its base model; its
    config.yaml gives the sequence length, masking and chat template that flags do not."""
    import json

    from mlx_lora.commands import api
    from mlx_lora.commands.run_inputs import resolve
    from mlx_lora.plumbing.errors import MlxLoraError

    model, adapter, recorded = resolve(model, adapter, run)
    if chat_template is None and recorded is not None:
        chat_template = recorded.chat_template
    bad = [c for c in columns if "=" not in c or not all(c.split("=", 1))]
    if bad:
        raise MlxLoraError(f"--column {bad[0]!r}: expected FIELD=COLUMN, e.g. completion=answer")
    if generate and columns:
        raise click.UsageError("--column works without --generate only")
    if generate:
        from mlx_lora.commands.eval_generate import evaluate_generate, summary_text

        log = None if as_json else (lambda m: click.echo(m, err=True))
        r = evaluate_generate(
            model,
            data,
            adapter,
            compare=compare,
            metrics=metrics,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            limit=limit,
            chat_template=chat_template,
            out=out,
            overwrite=overwrite,
            timeout_s=timeout_s,
            strict=strict,
            unsafe_exec=unsafe_exec,
            log=log,
            trust_remote_code=trust_remote_code,
        )
        click.echo(json.dumps(r) if as_json else summary_text(r))
        return
    given = [
        o
        for o, v in (
            ("--metric", metrics),
            ("--compare", compare),
            ("--out", out),
            ("--limit", limit),
            ("--unsafe-exec", unsafe_exec),
        )
        if v not in (None, False, ())
    ]
    if given:
        raise click.UsageError(f"{given[0]} needs --generate")
    r = api.evaluate(
        model,
        data,
        adapter,
        batch_size=4 if batch_size is None else batch_size,
        max_seq_length=max_seq_length,
        train_on=train_on,
        chat_template=chat_template,
        max_batches=max_batches,
        strict=strict,
        columns=dict(c.split("=", 1) for c in columns) or None,
        trust_remote_code=trust_remote_code,
    )
    if as_json:
        click.echo(json.dumps(r))
    elif "reward_accuracy" in r:  # preference pairs
        click.echo(
            f"{r['path']}: DPO loss {r['loss']:.4f}  reward accuracy {r['reward_accuracy']:.3f}  "
            f"margin {r['reward_margin']:.3f}  ({r['pairs']} pairs)"
        )
    else:
        click.echo(
            f"{r['path']}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
            f"({r['examples']} examples, {r['tokens']:,} target tokens)"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def doctor(as_json):
    """Backend (Metal/CUDA/CPU), dtype, BLAS, memory, the pass@1 sandbox and versions."""
    import json

    from mlx_lora.commands import api

    facts = api.doctor()
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for k in (
        "backend",
        "device",
        "device_name",
        "compute_dtype",
        "memory",
        "blas",
        "small_gemm",
        "matmul_gflops",
        "sandbox",
    ):
        if k in facts:
            click.echo(f"{k:<14} {facts[k]}")
    if "blas_hint" in facts:
        click.echo(f"{'':<14} WARNING: slow BLAS; {facts['blas_hint']}")
    for k, v in facts["versions"].items():
        click.echo(f"{k:<14} {v}")


def main(argv=None) -> None:
    from mlx_lora.plumbing.backend import reexec_with_fast_blas

    argv = list(sys.argv[1:] if argv is None else argv)
    if not ({"-h", "--help", "--version"} & set(argv) or not argv):  # help computes nothing: no re-exec
        reexec_with_fast_blas(argv)
    debug = "--debug" in argv or bool(os.environ.get("MLX_LORA_DEBUG"))
    logs.setup()
    try:
        cli.main(args=argv, prog_name="mlx-lora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # One line, like every other mistake; the command's --help has the usage.
        where = e.ctx.command_path if e.ctx is not None else "mlx-lora"
        click.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        from mlx_lora.plumbing.errors import MlxLoraError

        if isinstance(e, MlxLoraError):
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        from mlx_lora.model.integrity import INFERENCE_MEMORY_HINT, TRAIN_MEMORY_HINT, resource_error

        # Out of memory / disk outside the training loop (which names its run itself).
        hint = TRAIN_MEMORY_HINT if "train" in argv else INFERENCE_MEMORY_HINT
        err = resource_error(e, memory_hint=hint)
        if err is None and isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            err = MlxLoraError(
                f"{e.filename or 'a file'}: {e.strerror or e} (check its permissions, or use another location)"
            )
        if err is None:
            raise
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
