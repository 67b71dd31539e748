"""The Python API; each CLI command is a thin wrapper over one of these functions."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, TextIO

import mlx.core as mx

from mlx_lora import config as config_mod
from mlx_lora.commands.eval_generate import evaluate_generate as run
from mlx_lora.commands.run_inputs import read_run
from mlx_lora.config import (
    BOUNDS,
    CHOICES,
    INT_CAP,
    Bound,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_options,
    validate,
)
from mlx_lora.data.examples import load_jsonl_dataset
from mlx_lora.data.mixture import load_eval_split
from mlx_lora.data.shapes import epoch_stats
from mlx_lora.data.sources import check_exists, config_problems, is_datasets_source
from mlx_lora.inference import generation
from mlx_lora.inference.evaluation import bound_prompt, context_length
from mlx_lora.inference.generation import chat_prompt, chat_template_for, sampling_checks
from mlx_lora.inference.loading import attach_adapter, eval_data_file, load_for_inference  # noqa: F401 (public API)
from mlx_lora.model import adapters
from mlx_lora.model.integrity import FINGERPRINT_KEY, base_model_fingerprint, resource_error
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing import backend, ownership, sandbox
from mlx_lora.plumbing.backend import summary
from mlx_lora.plumbing.errors import CheckpointError, MlxLoraError
from mlx_lora.plumbing.interrupts import sigterm_as_interrupt
from mlx_lora.plumbing.io import ensure_writable_dir
from mlx_lora.plumbing.ownership import LOCK, check_output_dir, follow_link, new_beside
from mlx_lora.training import distributed as dist
from mlx_lora.training import losses
from mlx_lora.training.callbacks import MetricsFile, Progress, plot_losses
from mlx_lora.training.checkpoints import RunDir, RunLock, check_run_layout
from mlx_lora.training.distributed import batch_lines, launch_backend
from mlx_lora.training.methods import for_config as method_for
from mlx_lora.training.preference import Objective, preference_loss
from mlx_lora.training.resume import plan_resume
from mlx_lora.training.rewards import weights_of
from mlx_lora.training.tracking import check_available, trackers
from mlx_lora.training.trainer import Trainer, warmup_warning
from mlx_lora.training.trainer import evaluate as evaluate_loss

logger = logging.getLogger(__name__)


def _log(msg: str, stream: Optional[TextIO] = None) -> None:
    """A line of the run's banner and summary: logged, or written to ``stream`` when the caller gives one."""
    if stream is None:
        logger.info(msg)
    else:
        stream.write(msg + "\n")
        stream.flush()


def banner_lines(cfg: Config, info, trainable: int, total: int, splits, steps: int, world: int) -> list[str]:

    facts = summary(info.dtype)
    lines = [
        f"backend   {facts['backend']} ({facts['device_name']}), compute {facts['compute_dtype']}, "
        f"memory {facts['memory']}"
    ]
    if "blas" in facts:
        lines.append(f"blas      {facts['blas']}")
        if "blas_hint" in facts:
            lines.append(f"          WARNING: slow BLAS; {facts['blas_hint']}")
    q = info.quantization
    qtxt = f", {q['bits']}-bit quantized base (QLoRA)" if q else ""
    lines.append(f"model     {cfg.model.path} [{info.model_type}{qtxt}]")
    if getattr(info, "compute", None):
        lines.append(f"compute   {info.compute}")
    method = "DoRA" if cfg.lora.use_dora else "LoRA"
    lines.append(
        f"adapter   {method} r={cfg.lora.r} alpha={cfg.lora.alpha:g} scale={cfg.lora.scale:.3g}"
        f"{' (rsLoRA)' if cfg.lora.use_rslora else ''}: trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / max(total, 1):.3f}%)"
    )
    for name in ("train", "valid"):
        ds = getattr(splits, name)
        if ds is None:
            continue
        s = ds.stats
        extra = []
        if s.truncated:
            extra.append(f"{s.truncated} truncated to {cfg.data.max_seq_length} tokens")
        if s.skipped:
            extra.append(f"{s.skipped} skipped")
        lines.append(
            f"{name:<9} {s.path}: {s.examples} examples ({s.format}), {s.target_tokens:,} target "
            f"of {s.total_tokens:,} tokens" + (f"; {', '.join(extra)}" if extra else "")
        )
    if hasattr(splits.train, "source_lines"):  # a mixture: each source's rows, share and validation
        lines += splits.train.source_lines(cfg.data.max_seq_length)
    t = cfg.train
    global_batch = t.batch_size * t.grad_accum * world
    lines.append(
        f"training  {steps} steps, batch {t.batch_size} x accum {t.grad_accum}"
        + (f" x {world} ranks" if world > 1 else "")
        + f" = {global_batch} examples/step, "
        f"{t.optimizer} lr {t.lr:g} ({t.schedule}, warmup {t.warmup_steps})"
    )
    if t.method == "grpo":
        shown = ", ".join(f"{k} x{v:g}" for k, v in weights_of(t.reward, t.rewards).items())
        lines.append(
            f"grpo      {t.group_size} completions per prompt, temperature {t.temperature:g}, at most "
            f"{t.max_completion_length} tokens; rewards {shown}; loss {t.grpo_loss}, beta {t.grpo_beta:g}, "
            f"epsilon {t.epsilon:g}"
        )

    lines += batch_lines(t.batch_size, t.grad_accum, world, t.lr, launch_backend() or "")
    return lines


def prepare_run_dir(out: str, resume: bool, overwrite: bool):
    """The run folder ``out``, checked before anything is written: a run to resume, or a folder a
    new run may use (new, empty, or with ``overwrite`` a run folder this tool wrote; see
    :mod:`mlx_lora.plumbing.ownership`)."""

    if resume:
        run = RunDir(follow_link(out, "run folder"))
        ensure_writable_dir(run.path, "run folder")
        if not run.exists():
            raise CheckpointError(f"{run.path}: no run to resume (config.yaml missing)")
        check_run_layout(run.path)  # e.g. a folder in place of checkpoints/latest, before any write
        return run
    path = follow_link(out, "run folder")
    ensure_writable_dir(path, "run folder")
    hint = f"it holds a run: continue it with --resume {path}, choose another --out, or pass --overwrite to start over"
    return RunDir(check_output_dir(path, "run", overwrite=overwrite, what="run folder", exists_hint=hint))


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Iterable = (),
    progress: bool = True,
    stream: Optional[TextIO] = None,
    distributed: bool = False,
    dist_timeout_s: Optional[float] = None,
):
    """Fine-tune ``cfg.model.path`` on ``cfg.data.path``; writes the run folder ``cfg.out``.

    Launched by ``mlx.launch`` this process is one rank of a data-parallel group (see
    :mod:`mlx_lora.training.distributed`); ``distributed`` makes a missing group an error, and
    ``dist_timeout_s`` bounds how long a rank waits for the others.

    Everything that can fail on user input (config, model, data, run folder, and with ``resume``
    the keys a resumed run may not change, see :mod:`mlx_lora.training.resume`) is checked before the run
    folder is created or changed. From its first write to its end the run holds the folder's lock
    (:class:`~mlx_lora.training.checkpoints.RunLock`): a second writer is refused.
    """

    # The run folder's lock, taken by _train before its first write, is let go on every way out.
    with contextlib.ExitStack() as held:
        return _train(cfg, resume, overwrite, callbacks, progress, stream, distributed, dist_timeout_s, held)


def _train(
    cfg: Config,
    resume: bool,
    overwrite: bool,
    callbacks: Iterable,
    progress: bool,
    stream: Optional[TextIO],
    distributed: bool,
    dist_timeout_s: Optional[float],
    held,
):

    validate(cfg)

    check_available(cfg.train.report_to)  # a missing extra is named before anything starts
    group = dist.init(required=distributed, timeout_s=dist_timeout_s)
    sync = dist.Collectives(group, dist_timeout_s)
    dist.check_same_config(config_mod.to_yaml(cfg), sync)
    rank0 = group.rank() == 0
    log = (lambda m: _log(m, stream)) if rank0 else (lambda m: None)
    # Only rank 0 reads and writes the run folder (other machines need none).
    if rank0:
        RunLock(Path(cfg.out).expanduser()).check_free()  # a run writing there now comes first
    run = prepare_run_dir(cfg.out, resume, overwrite) if rank0 else RunDir(cfg.out)
    plan = plan_resume(run, cfg, group.size()) if resume and rank0 else None

    for i, source in enumerate(cfg.data.sources or [{"path": cfg.data.path}]):  # fail fast, before the model loads
        check_exists(source["path"], "data.path" if not cfg.data.sources else f"data.sources[{i}].path")
    mx.random.seed(cfg.train.seed)

    model, tokenizer, info = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dequantize_on_cpu=cfg.model.dequantize_on_cpu,
    )
    method = method_for(cfg)  # sft, dpo, orpo, grpo: its data, loss and any phase of its own
    splits = method.load_datasets(cfg, tokenizer, seed=cfg.train.seed)
    adapters.apply_lora(model, cfg.lora, warn=lambda m: log(f"WARNING: {m}"))
    trainable, total = adapters.count_parameters(model)

    # Checkpoints and the final adapter name the exact base they belong to (see integrity.py).
    extra = {"model_type": info.model_type, FINGERPRINT_KEY: base_model_fingerprint(info.local_path)}
    if plan is not None:
        plan.check_base(extra[FINGERPRINT_KEY], cfg.model.path)

    def save_adapter(folder):
        adapters.save_adapter(model, folder, cfg.lora, cfg.model.path, extra=extra)

    # Everything is checked. --overwrite over an earlier run builds the new one beside it (a
    # temporary sibling) and swaps it in only when it completes: a failure or an interrupt before
    # then leaves the earlier run as it was.
    target = run.path
    replacing = (
        rank0 and not resume and overwrite and run.path.is_dir() and any(p.name != LOCK for p in run.path.iterdir())
    )
    if replacing:
        build = new_beside(target, ".partial")
        swapped: list = []
        held.callback(lambda: swapped or shutil.rmtree(build, ignore_errors=True))
        run = RunDir(build, replacing=target)

    # The metrics file comes first so a user callback that stops training cannot drop a record.
    metrics = MetricsFile(run.metrics_file, log_every=cfg.train.log_every) if rank0 else None
    own = [metrics] + ([Progress(stream=stream, log_every=cfg.train.log_every)] if progress else []) if rank0 else []
    if rank0:  # train.report_to: the same records, to TensorBoard / wandb
        own[1:1] = trackers(cfg.train.report_to, run.path, config_mod.to_dict(cfg), cfg.train.log_every)
    callbacks = own + list(callbacks)
    trainer = Trainer(
        model,
        cfg,
        splits.train,
        splits.valid,
        run,
        save_adapter=save_adapter,
        callbacks=callbacks,
        group=group,
        sync=sync,
        method=method,
    )
    trainer.progress, trainer.progress_stream = progress, stream

    if resume:
        loaded = None
        if rank0:  # the other ranks receive rank 0's checkpoint, bit for bit
            plan.check_total(trainer.total_steps, cfg)
            loaded = run.load_checkpoint(plan.ckpt)
            # The same check as every adapter load: finite values, a sane scale (before any write).
            adapters.check_adapter_values(
                cfg.lora, loaded[0], plan.ckpt / adapters.ADAPTER_WEIGHTS, plan.ckpt / adapters.ADAPTER_CONFIG
            )
        adapter_state, opt_state, state = dist.share_checkpoint(loaded, sync)
        trainer.restore(adapter_state, opt_state, state, source=plan.ckpt if plan else None)
    # Everything is checked: from here on this process writes the run folder, and no other may.
    if rank0:
        # Replacing an earlier run, the new one is locked where it is built: the earlier run stays
        # untouched (not even a lock file) unless the new one completes.
        lock = held.enter_context(RunLock(run.path))
        if resume:
            plan.begin()  # clears what a killed run left half-written
        elif not overwrite and any(p.name != LOCK for p in target.iterdir()):
            raise CheckpointError(
                f"{run.path}: another mlx-lora train started a run here while this one was "
                f"starting; choose another --out"
            )
    if resume:
        if rank0:
            metrics.truncate_after(state.step)
        log(f"resuming  {plan.ckpt if plan else ''} (step {state.step} of {trainer.total_steps})")
    elif rank0:
        run.path.mkdir(parents=True, exist_ok=True)
        ownership.write_marker(run.path, "run", "train", files=[])
    if rank0:
        run.write_config(config_mod.to_yaml(cfg))
    for line in banner_lines(cfg, info, trainable, total, splits, trainer.total_steps, group.size()):
        log(line)

    warmup = warmup_warning(cfg.train, trainer.total_steps)
    if warmup:
        log(f"WARNING: {warmup}")

    first = epoch_stats(trainer.plan, trainer.shapes, trainer.micro_batches)
    log(f"shapes    {trainer.shapes.chosen}; first epoch: {first.line()}")
    for note in trainer.memory_notes:
        log(f"memory    {note}")

    try:
        with sigterm_as_interrupt():
            result = trainer.fit()
    except (MemoryError, RuntimeError, OSError) as e:
        err = resource_error(e, run_dir=target, last_checkpoint=None if replacing else run.latest_checkpoint())
        if err is None:
            raise
        raise err from e
    if rank0 and replacing:
        if result.stopped == "interrupted":
            log(
                f"interrupted at step {result.steps}; {target} is left as it was (--overwrite replaces it only "
                f"when the new run completes) and nothing of this run was kept"
            )
            return result
        plotted = run.metrics_file.exists() and plot_losses(run.metrics_file, run.path / "loss.png")
        if plotted:
            run.record("loss.png")

        RunLock(target).check_free()  # a run writing the earlier folder now comes first
        ownership.swap_in(build, target, what="run folder")
        swapped.append(True)
        lock.moved_to(target)
        run = RunDir(target)
    elif rank0:
        plotted = run.metrics_file.exists() and plot_losses(run.metrics_file, run.path / "loss.png")
        if plotted:
            run.record("loss.png")
    if rank0:
        if result.stopped == "interrupted":
            log(_interrupted_message(result, run))
        else:
            log(
                f"done: {result.steps} steps, final loss {result.final_loss:.4f}"
                if result.final_loss is not None
                else f"done: {result.steps} steps"
            )
            if result.best_val_loss is not None:
                log(
                    f"best validation loss {result.best_val_loss:.4f} at step {result.best_step} "
                    f"({run.checkpoints / 'best'})"
                )
        if plotted:
            log(f"loss curve {run.path / 'loss.png'}")
        log(f"adapter   {run.path}")
    return result


def _interrupted_message(result, run) -> str:
    """What an interrupted run left, as it is: a new checkpoint, an older one, or none."""
    at = f"interrupted at step {result.steps}" if result.steps else "interrupted before the first step"
    resume = f"Continue with: mlx-lora train --resume {run.path}"
    if result.last_checkpoint:
        return f"{at}; saved {result.last_checkpoint}. {resume}"
    kept = run.latest_checkpoint()
    if kept is not None:
        return f"{at}; nothing new was saved, the newest checkpoint is {kept}. {resume}"
    return (
        f"{at}; no checkpoint was saved, so there is nothing to resume: run the same command with "
        f"--overwrite to start over"
    )


def evaluate(
    model_path: str,
    data: str,
    adapter: Optional[str] = None,
    *,
    batch_size: int = 4,
    max_seq_length: Optional[int] = None,
    train_on: Optional[str] = None,
    chat_template: Optional[str] = None,
    max_batches: Optional[int] = None,
    dtype: str = "auto",
    strict: bool = False,
    columns: Optional[dict] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Token-weighted loss and perplexity of (model + adapter) on a JSONL file or data folder, or the
    test (else validation) split of a data set (hf: id or save_to_disk folder); on
    preference pairs, DPO's loss (beta 0.1) and reward accuracy, margin and log-probs against the base.

    ``max_seq_length``, ``train_on`` and ``chat_template`` left out are the run's (its
    ``config.yaml``, when ``adapter`` is a run folder or one of its checkpoints), else the defaults."""

    recorded = read_run(adapter) if adapter else None
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    if max_seq_length is None:
        max_seq_length = (recorded and recorded.max_seq_length) or defaults["max_seq_length"]
    if train_on is None:
        train_on = (recorded and recorded.train_on) or defaults["train_on"]
    if chat_template is None and recorded is not None:
        chat_template = recorded.chat_template

    # Before the model loads: batch size 0 would fail deep in the batching, and 0 batches would
    # report a loss of nan as if it were a result.
    check_options(
        [
            ("--batch-size", batch_size, BOUNDS["train.batch_size"]),
            ("--max-seq-length", max_seq_length, BOUNDS["data.max_seq_length"]),
            ("--train-on", train_on, CHOICES["data.train_on"]),
            ("dtype", dtype, CHOICES["model.dtype"]),
        ]
        + ([("--max-batches", max_batches, Bound(int, 1, INT_CAP))] if max_batches is not None else [])
    )
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
        raise MlxLoraError("--chat-template must be 'chatml' or the path of a .jinja file")

    problems = config_problems(columns, None, (), None)
    if problems:
        raise ConfigError([p.replace("data.columns", "--column") for p in problems])
    path, hub = Path(data), is_datasets_source(data)  # hub: an hf: id or a save_to_disk folder
    if hub:
        check_exists(data, "--data")
    else:
        path = eval_data_file(data)
    # "auto": on the CPU backend a quantized base computes dequantized when it fits (same values)
    model, tokenizer, _ = load_for_inference(
        model_path, adapter, dtype, strict=strict, dequantize_on_cpu="auto", trust_remote_code=trust_remote_code
    )
    dcfg = DataConfig(
        path=data if hub else str(path),
        max_seq_length=max_seq_length,
        train_on=train_on,
        chat_template=chat_template,
        valid_fraction=0.0,
        columns=columns,
    )
    ds = load_eval_split(dcfg, tokenizer) if hub else load_jsonl_dataset(path, dcfg, tokenizer)
    if ds.per_item == 2:  # preference pairs: DPO's loss and rewards against the base (adapter off)
        cfg = Config(
            model=ModelConfig(path=model_path), data=dcfg, train=TrainConfig(batch_size=batch_size, method="dpo")
        )
        extra: dict = {}
        loss, pairs = evaluate_loss(
            model,
            preference_loss(model, Objective.from_config(cfg.train), cfg.train.loss_chunk_tokens, training=False),
            ds,
            cfg,
            max_batches=max_batches,
            metrics=extra,
            desc="eval",
        )
        return {
            "loss": loss,
            "pairs": pairs,
            "examples": len(ds),
            "path": ds.stats.path if hub else str(path),
            **{k.removeprefix("val_"): v for k, v in extra.items()},
        }
    cfg = Config(model=ModelConfig(path=model_path), data=dcfg, train=TrainConfig(batch_size=batch_size))
    loss, ntoks = evaluate_loss(
        model,
        losses.make_loss(model, cfg.train.loss_chunk_tokens, training=False),
        ds,
        cfg,
        max_batches=max_batches,
        desc="eval",
    )
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": ntoks,
        "examples": len(ds),
        "path": ds.stats.path if hub else str(path),
    }


def evaluate_generate(model_path: str, data: str, adapter: Optional[str] = None, **options) -> dict:
    """``eval --generate``: generated answers scored against the rows' references, the base and
    the adapter side by side with ``compare=True``; see :func:`mlx_lora.commands.eval_generate.evaluate_generate`
    for the options. Returns the summary."""

    return run(model_path, data, adapter, **options)


def generate(
    model_path: str,
    prompt: str,
    adapter: Optional[str] = None,
    *,
    chat=False,
    system: Optional[str] = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "auto",
    stream: bool = False,
    model_and_tokenizer=None,
    strict: bool = False,
    trust_remote_code: bool = False,
    note: Optional[Callable[[str], None]] = None,
):
    """Generate a continuation (greedy by default). With ``chat`` the prompt is wrapped in the
    tokenizer's chat template as a user turn; ``chat="auto"`` does so when the tokenizer has a
    template and the prompt carries none of its special tokens (a chat-tuned model answers a bare
    question with an end of turn at once), and tells ``note`` which it chose. Yields text pieces
    when ``stream``."""

    # Before the model loads. mlx-lm reads a negative max_tokens as "no limit", samples the least
    # likely tokens first at a negative temperature, and silently ignores a top-p outside (0, 1).
    check_options(sampling_checks(max_tokens, temperature, top_p, seed) + [("dtype", dtype, CHOICES["model.dtype"])])
    if not isinstance(prompt, str) or not prompt:
        raise MlxLoraError("--prompt is empty: give the text to continue")
    if system is not None and not isinstance(system, str):
        raise MlxLoraError(f"--system must be text, got {type(system).__name__}")
    if model_and_tokenizer is None:
        model, tokenizer, info = load_for_inference(
            model_path, adapter, dtype, strict=strict, dequantize_on_cpu="auto", trust_remote_code=trust_remote_code
        )
        context = context_length(info.config)
    else:
        model, tokenizer = model_and_tokenizer
        args = getattr(model, "args", None)
        context = context_length(vars(args)) if args is not None and hasattr(args, "__dict__") else None
    # The prompt must leave room for --max-tokens in the model's context (checked before a long
    # text is tokenized: see evaluation.bound_prompt).
    if chat == "auto":
        chat = wants_chat_template(tokenizer, prompt)
        if chat and note is not None:
            note(
                "chat template applied: the model has one and the prompt is plain text (--raw continues the "
                "text as it is)"
            )
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MlxLoraError(f"{model_path}: the tokenizer has no chat template; drop --chat")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_tokens = chat_prompt(
            tokenizer, chat_template_for(tokenizer, None, model_path), messages, context=context, max_tokens=max_tokens
        )
    else:
        prompt_tokens = bound_prompt(tokenizer, prompt, context=context, max_tokens=max_tokens, what="--prompt")
    if len(prompt_tokens) == 0:
        raise MlxLoraError("--prompt encodes to no tokens: give the text to continue")
    pieces = generation.stream(
        model, tokenizer, list(prompt_tokens), max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    return pieces if stream else "".join(pieces)


def wants_chat_template(tokenizer, prompt: str) -> bool:
    """Whether a prompt for ``generate`` should go through the chat template: the tokenizer has
    one, and the prompt is plain text rather than already templated (it holds none of the
    tokenizer's special tokens, such as ``<|im_start|>``)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])
    special.update(getattr(tokenizer, "additional_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(str(getattr(t, "content", t)) for t in added.values() if getattr(t, "special", False))
    return not any(s and len(s) > 1 and s in prompt for s in special)


def doctor() -> dict:
    """Backend, dtype, BLAS (with a measured matmul rate), memory, the pass@1 sandbox's
    containment level and versions."""

    facts = backend.summary()
    facts["matmul_gflops"] = round(backend.measure_matmul_gflops(1024), 1)
    facts["versions"] = backend.versions()
    facts["openblas_found"] = backend.find_openblas()
    facts["mkl_found"] = backend.find_mkl()
    try:
        facts["sandbox"] = sandbox.containment().description
    except MlxLoraError as e:  # MLX_LORA_SANDBOX names a level that does not work here
        facts["sandbox"] = str(e)
    return facts
