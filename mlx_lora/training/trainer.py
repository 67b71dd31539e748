"""The training loop: one compiled step over explicit state, token-weighted accumulation,
checkpoints that resume exactly, evaluation, early stopping and data-parallel ranks.

Gradients are gradients of the *summed* token loss; they are summed over micro-batches and
ranks and divided once by the total number of target tokens. So ``grad_accum=4, batch_size=1``,
``batch_size=4`` and 2 ranks x ``batch_size=2`` all take the same step on the same examples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lora.config import Config
from mlx_lora.data import shapes
from mlx_lora.data.batching import (
    PAD_MULTIPLE,
    Batch,
    BatchPlan,
    BatchPosition,
    attention_mask_from_segments,
    length_groups,
)
from mlx_lora.data.examples import TokenizedDataset
from mlx_lora.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MLX_LM_WEIGHTS, set_adapter_state
from mlx_lora.model.adapters import adapter_state as current_adapter
from mlx_lora.plumbing.errors import CheckpointError, MlxLoraError
from mlx_lora.plumbing.interrupts import interrupts_deferred
from mlx_lora.plumbing.progress import Ticker
from mlx_lora.training import distributed as dist
from mlx_lora.training import memory
from mlx_lora.training.checkpoints import RunDir, TrainState
from mlx_lora.training.losses import Loss
from mlx_lora.training.methods import for_config as method_for
from mlx_lora.training.preference import metrics as preference_metrics

GROUP_OVERHEAD_GPU = 256  # positions: the assumed fixed cost of one more call on a GPU
# On the CPU, one more call costs ~4 ms (a tiny llama: 23 ms for a step on 4 x 64 positions, 37 ms as
# 4 one-row calls) and a position ~6 x parameters FLOPs at ~67 GFLOP/s (SmolLM2-135M: 12 ms per
# position); both measured on a 2-core x86 box. A call thus costs this many positions / parameters.
CPU_CALL_OVERHEAD = 4e-3 * 67e9 / 6
MAX_CONSECUTIVE_SKIPS = 20  # with nan_policy "skip": give up after this many bad steps in a row


class TrainingStopped(MlxLoraError):
    """Training stopped on a non-finite loss (the message says which checkpoint, if any, is kept)."""


@dataclass
class TrainResult:
    steps: int
    final_loss: Optional[float]
    best_val_loss: Optional[float]
    best_step: Optional[int]
    trained_tokens: int
    elapsed_s: float
    stopped: str  # "completed", "early_stopping", "interrupted", "nan"
    last_checkpoint: Optional[str] = None

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C or SIGTERM: the adapter is a partial one; a pipeline must not go on."""
        return self.stopped == "interrupted"


def build_schedule(t, total_steps: int):
    """Linear warmup from 0 to ``lr``, then constant / cosine / linear decay to ``min_lr_ratio*lr``."""
    decay_steps = max(total_steps - t.warmup_steps, 1)
    end = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        main = t.lr
    elif t.schedule == "cosine":
        main = optim.cosine_decay(t.lr, decay_steps, end)
    else:
        main = optim.linear_schedule(t.lr, end, decay_steps)
    if t.warmup_steps > 0:
        warm = optim.linear_schedule(0.0, t.lr, t.warmup_steps)
        main = main if callable(main) else (lambda lr: lambda step: mx.array(lr, mx.float32))(main)
        return optim.join_schedules([warm, main], [t.warmup_steps])
    return main


def warmup_warning(t, total_steps: int) -> Optional[str]:
    """A warning when the warmup is as long as the run or longer: the learning rate then climbs
    the whole time and never reaches ``train.lr`` (its peak is ``lr * steps / warmup``)."""
    w = t.warmup_steps
    if w <= 0 or w < total_steps:
        return None
    peak = t.lr * min(total_steps, w) / w
    return (
        f"train.warmup_steps {w} >= the run's {total_steps} steps: the learning rate climbs the whole run "
        f"and peaks at {peak:.2e}, not train.lr {t.lr:.2e}; lower train.warmup_steps (about 10% of the "
        f"steps: {total_steps // 10}) or train for more steps"
    )


def build_optimizer(t, total_steps: int) -> optim.Optimizer:
    lr = build_schedule(t, total_steps)
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if t.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, momentum=0.9, weight_decay=t.weight_decay)
    return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass.

    Each block instance gets its own subclass whose ``__call__`` runs under ``mx.checkpoint``;
    the architecture's class itself is left untouched, so other models in the process are not
    affected.
    """
    for block in model.layers:
        cls = type(block)
        if getattr(cls, "_mlx_lora_checkpointed", False):
            continue

        def call(self, x, *args, __base=cls.__call__, **kwargs):
            def inner(params, x):
                self.update(params)
                return __base(self, x, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        block.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_mlx_lora_checkpointed": True})


def _attention_module(block: nn.Module) -> Optional[nn.Module]:
    for name in ("self_attn", "attention", "attn"):
        if name in block and isinstance(block[name], nn.Module):
            return block[name]
    return None


def attention_checkpoint_length(model: nn.Module, longest: int) -> Optional[int]:
    """Shortest row length at which ``checkpoint_attention: null`` (auto) recomputes attention.

    Two conditions. The attention probabilities (``heads x L`` floats per position) must outgrow
    the MLP's activations (``intermediate_size`` per position), else recomputing saves little.
    And the batch must be at least 3/4 as long as the longest the data can produce (``longest``):
    peak memory is set by the longest batches, so recomputing shorter ones would cost compute and
    lower nothing (at 3/4 of the length a plain batch needs about what a recomputed longest one
    does). None when the model does not state its sizes.
    """
    args = getattr(model, "args", None)
    heads, inter = getattr(args, "num_attention_heads", None), getattr(args, "intermediate_size", None)
    if not isinstance(heads, int) or not isinstance(inter, int) or heads < 1:
        return None
    return max(-(-inter // heads), -(-3 * longest // 4))


def enable_attention_checkpoint(model: nn.Module, min_length: int = 0) -> int:
    """Recompute each block's attention (projections, RoPE, scores) in the backward pass, for
    rows of at least ``min_length`` positions (decided per batch shape, when it is traced).

    Attention keeps its ``[heads, L, L]`` probabilities for the backward pass; they grow with L^2
    and at a few hundred positions are a block's largest activation. Recomputing the attention
    sub-module costs its projections' forward pass again (about a quarter of a block's matmuls)
    and keeps only its input. Per instance, as :func:`enable_grad_checkpoint`. Returns how many
    blocks were changed.
    """
    changed = 0
    for block in model.layers:
        attn = _attention_module(block)
        if attn is None:
            continue
        cls = type(attn)
        if getattr(cls, "_mlx_lora_checkpointed", False):
            continue

        def call(self, x, *args, __base=cls.__call__, **kwargs):
            if x.ndim < 2 or x.shape[-2] < min_length:
                return __base(self, x, *args, **kwargs)

            def inner(params, x):
                self.update(params)
                return __base(self, x, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        attn.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_mlx_lora_checkpointed": True})
        changed += 1
    return changed


def call_overhead(model: nn.Module, gpu: bool) -> float:
    """The fixed cost of one more call of the training step, in positions of ``model``."""
    if gpu:
        return float(GROUP_OVERHEAD_GPU)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return CPU_CALL_OVERHEAD / max(params, 1)


def micro_batches(batch, t, gpu: bool, overhead: float = 0.0) -> list[tuple[np.ndarray, int]]:
    """The calls one optimizer step on ``batch`` is computed in: [(row indices, positions)].

    With ``train.length_groups`` (auto: on for the CPU) and unpacked rows, rows of similar length
    run together, each group cut to its own padded length (data.length_groups), trading padding
    against the ``overhead`` of one more call (in positions, :func:`call_overhead`). Where a call
    costs under one position (the CPU with any real model: a one-row call is as efficient per
    position as a batch, measured in bench/RESULTS.md), each row runs alone, which also keeps the
    compiled shapes to one per padded length; a tiny model or a GPU groups up to batch_size rows.
    Otherwise slices of batch_size rows (grad_accum of them in a training batch), padded to the
    batch's length."""
    B, L = batch.inputs.shape
    g = batch.per_item  # a preference pair's two rows always run in the same call
    split = (not gpu) if t.length_groups is None else t.length_groups
    if split and batch.segments is None and batch.lengths is not None:
        alone = overhead < 1
        groups = length_groups(
            batch.lengths.reshape(-1, g).max(axis=1),
            1 if alone else t.batch_size,
            pad_multiple=PAD_MULTIPLE,
            cap=L,
            overhead=0 if alone else int(round(overhead)),
        )
        return [(_item_rows(items, g), length) for items, length in groups]
    n = B // g
    return [(_item_rows(np.arange(s, min(s + t.batch_size, n)), g), L) for s in range(0, n, t.batch_size)]


def _item_rows(items: np.ndarray, per_item: int) -> np.ndarray:
    """The batch rows of ``items`` (each item is ``per_item`` consecutive rows)."""
    return items if per_item == 1 else (items[:, None] * per_item + np.arange(per_item)).reshape(-1)


def batch_arrays(batch: Batch, rows=slice(None), length: Optional[int] = None):
    """(inputs, targets, loss mask, attention mask or None) of ``batch``'s ``rows``, cut to ``length``
    positions: what one call of the step or of the loss takes."""
    cols = slice(None) if length is None else slice(0, length)
    attn = None
    if batch.segments is not None:
        attn = mx.array(attention_mask_from_segments(batch.segments[rows, cols]))
    return (
        mx.array(batch.inputs[rows, cols]),
        mx.array(batch.targets[rows, cols]),
        mx.array(batch.loss_mask[rows, cols]),
        attn,
    )


def evaluate(
    model: nn.Module,
    loss: Loss,
    dataset: TokenizedDataset,
    cfg: Config,
    *,
    max_batches: Optional[int] = None,
    sync: Optional[dist.Collectives] = None,
    metrics: Optional[dict] = None,
    progress: bool = True,
    desc: str = "validation",
    stream=None,
) -> tuple[float, int]:
    """Token-weighted mean loss of ``model`` on ``dataset`` and its number of target tokens.

    The mean is ``sum_t m_t * CE_t / sum_t m_t`` over every target token of the first
    ``max_batches`` batches (in order, unshuffled; ``cfg.train.batch_size`` rows per rank), so
    it does not depend on how rows are grouped into batches or calls. With ``sync`` each rank
    computes its rows and both sums are added across ranks. nan when there is no target token.

    With a preference loss the mean is over pairs instead of tokens, and ``metrics`` (a dict, when
    given) receives the preference metrics (``val_reward_accuracy``, ...). A pass that takes more
    than a moment shows its batches (:class:`~mlx_lora.plumbing.progress.Ticker`) unless ``progress`` is false."""
    rank, world = (sync.rank, sync.size) if sync is not None else (0, 1)
    gpu = mx.default_device() == mx.gpu
    overhead = call_overhead(model, gpu)
    total, ntoks, stats = mx.array(0.0), mx.array(0.0), []
    plan = BatchPlan.for_evaluation(cfg, dataset, rank, world)
    planned = plan.steps_per_epoch()
    total_batches = min(planned, max_batches) if max_batches is not None else planned
    with Ticker(total_batches, desc, stream=stream, enabled=progress and rank == 0) as ticker:
        for i, batch in enumerate(plan.first_epoch()):
            if max_batches is not None and i >= max_batches:
                break
            for rows, length in micro_batches(batch, cfg.train, gpu, overhead):
                inputs, targets, mask, attn = batch_arrays(batch, rows, length)
                l, n, *extra = loss.eval(model, inputs, targets, mask, attn)
                total, ntoks = total + l, ntoks + n
                stats = extra if not stats else [a + b for a, b in zip(stats, extra)]
            mx.eval(total, ntoks, stats)
            ticker.update()
    sums = [total.item(), ntoks.item()] + [x for s in stats for x in np.asarray(s).reshape(-1).tolist()]
    sums = sync.sum(sums, "the validation loss all_sum") if sync is not None else sums
    total_f, n_f = sums[:2]
    if metrics is not None and stats:
        metrics.update(preference_metrics(sums[2:], n_f, cfg.train.method, prefix="val_"))
    return (total_f / n_f if n_f else float("nan")), int(n_f)


class NanPolicy:
    """What a step whose loss is not finite does: with ``train.nan_policy: skip`` it is dropped,
    up to ``limit`` in a row; otherwise (or past the limit) training stops."""

    def __init__(self, policy: str, limit: int = MAX_CONSECUTIVE_SKIPS):
        self.policy, self.limit, self.in_a_row = policy, limit, 0

    def verdict(self, loss: float) -> str:
        """ "step" (a finite loss), "skip" or "stop"."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return "step"
        self.in_a_row += 1
        return "skip" if self.policy == "skip" and self.in_a_row <= self.limit else "stop"


class StepClock:
    """Training time and throughput. The elapsed time continues the clock of the run this one
    resumes; tokens per second are the tokens since the last metrics record over the time since
    then (or since the last evaluation, whichever came later)."""

    def __init__(self, elapsed_before: float):
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.session_start, self.elapsed_before, self.session_steps = time.perf_counter(), elapsed_before, 0
        self.now = self.session_start

    def step(self, tokens: int) -> float:
        """Count a step of ``tokens`` target tokens; the run's elapsed time."""
        self.window_tokens += tokens
        self.now = time.perf_counter()
        self.session_steps += 1
        return self.elapsed_before + self.now - self.session_start

    def tokens_per_s(self) -> float:
        return self.window_tokens / max(self.now - self.window_start, 1e-9)

    def s_per_step(self) -> float:
        return (self.now - self.session_start) / self.session_steps

    def new_window(self) -> None:
        """After a metrics record: throughput counts from here."""
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def skip_pause(self) -> None:
        """After an evaluation: throughput counts from here, so evaluating does not lower it."""
        self.window_start = time.perf_counter()


def _check_same_tensors(expected: dict, got: dict, what: str) -> None:
    """Raise CheckpointError unless ``got`` has exactly the names and shapes of ``expected``."""
    missing = sorted(expected.keys() - got.keys())
    if missing:
        raise CheckpointError(
            f"{what} lacks {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; it was written for another adapter"
        )
    extra = sorted(got.keys() - expected.keys())
    if extra:
        raise CheckpointError(
            f"{what} has {extra[0]}, which this config's adapter does not"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name in sorted(expected):
        if tuple(expected[name].shape) != tuple(got[name].shape):
            raise CheckpointError(
                f"{what} holds {name} of shape {tuple(got[name].shape)}, but this config builds "
                f"{tuple(expected[name].shape)}"
            )


class Trainer:
    """Trains the adapter layers of ``model``. Collaborators come in as arguments."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        train_set: TokenizedDataset,
        valid_set: Optional[TokenizedDataset],
        run: Optional[RunDir],
        save_adapter: Optional[Callable] = None,
        callbacks=(),
        group=None,
        sync: Optional[dist.Collectives] = None,
        method=None,
    ):
        self.model, self.cfg, self.train_set, self.valid_set = model, cfg, train_set, valid_set
        self.run, self.save_adapter_fn = run, save_adapter
        self.callbacks = list(callbacks)
        # Progress of the passes between step lines (validation, reference log-probs), and where.
        self.progress, self.progress_stream = True, None
        if group is None:
            group = sync.group if sync is not None else mx.distributed.init()
        self.group = group
        self.rank, self.world = self.group.rank(), self.group.size()
        # Collectives with a watchdog: a rank never waits forever for a dead or hung peer.
        self.sync = sync if sync is not None else dist.Collectives(self.group)
        self._set_hint(have_checkpoint=False)
        self.sync.broadcast_parameters(model)  # identical start on every rank
        self._update_pending = False
        t = cfg.train
        self.plan = BatchPlan.for_training(cfg, train_set, self.rank, self.world)
        if t.iters is not None:
            self.total_steps = t.iters
        else:
            self.total_steps = max(1, math.ceil((t.epochs or 1.0) * self.plan.steps_per_epoch()))
        self.optimizer = build_optimizer(t, self.total_steps)
        # Create the optimizer state now so the compiled update sees it as an input, not a new array.
        self.optimizer.init(model.trainable_parameters())
        self.state = TrainState(world_size=self.world)
        self.on_gpu = mx.default_device() == mx.gpu
        self.call_overhead = call_overhead(model, self.on_gpu)
        if t.grad_checkpoint:
            enable_grad_checkpoint(model)
        elif t.checkpoint_attention is not False:  # None: auto
            packed_or_empty = cfg.data.packing or not len(train_set)
            longest = cfg.data.max_seq_length if packed_or_empty else int(train_set.lengths.max()) - 1
            min_length = 0 if t.checkpoint_attention else attention_checkpoint_length(model, longest)
            if min_length is not None:
                enable_attention_checkpoint(model, min_length)
        # The chunked loss (when the model allows it) never materialises [tokens x vocab] logits.
        # The method (train.method, mlx_lora.training.methods) plugs its loss into the same step.
        self.method = method if method is not None else method_for(cfg)
        self.method.check_data(cfg, train_set, valid_set)
        self.loss = self.method.loss(model, cfg)
        self.step_metrics: dict = {}  # the method's metrics of the last step (global batch)
        self._stats: list = []
        self._build_steps()
        # How batches are laid out (train.shapes), the call shapes met, and the memory limits.
        self.shapes = shapes.resolve(
            t.shapes,
            gpu=self.on_gpu,
            sizes=train_set.lengths - 1,
            batch_rows=t.batch_size * t.grad_accum,
            max_seq_length=cfg.data.max_seq_length,
            seed=t.seed,
            bucketing=cfg.data.length_bucketing,
            steps=self.total_steps,
            dims=shapes.model_dims(model),
            allow_packed=train_set.per_item == 1 and self.method.allows_packing,
        )
        self.shape_stats = shapes.ShapeStats()
        self.memory_notes = memory.apply_limits(t)

    # -- compiled pieces -------------------------------------------------------------------------

    def _build_steps(self) -> None:
        model, opt, t = self.model, self.optimizer, self.cfg.train
        world = self.world
        loss_and_grad = nn.value_and_grad(model, self.loss.train)

        # The chunked loss takes the target positions as an extra argument (computed on the host),
        # a preference loss with train.dpo_precompute_ref the reference log-probs of the rows.
        # A preference loss also returns a vector of statistics (see mlx_lora.training.preference).
        # then any per-row arrays of the method (Method.extras: DPO's precomputed reference
        # log-probs, GRPO's advantages). A method's loss may also return a vector of statistics.
        def fwd_bwd(inputs, targets, mask, *positions):
            (loss, ntoks, *extra), grads = loss_and_grad(model, inputs, targets, mask, None, *positions)
            return loss, ntoks, grads, *extra

        def fwd_bwd_packed(inputs, targets, mask, attn, *positions):
            (loss, ntoks, *extra), grads = loss_and_grad(model, inputs, targets, mask, attn, *positions)
            return loss, ntoks, grads, *extra

        def update(grads, ntoks):
            if world > 1:
                # one all_sum for all LoRA gradients and the token count
                grads, ntoks = dist.all_sum_gradients(grads, ntoks, self.group)
            grads = tree_map(lambda g: g / mx.maximum(ntoks, 1), grads)
            if t.max_grad_norm is not None:
                grads, _ = optim.clip_grad_norm(grads, t.max_grad_norm)
            opt.update(model, grads)

        if t.compile:
            # value_and_grad writes the traced parameters into the model, so model.state is an output too.
            state = dict(inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
            fwd_bwd = mx.compile(fwd_bwd, **state)
            fwd_bwd_packed = mx.compile(fwd_bwd_packed, **state)
            update = mx.compile(update, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
        if self.loss.chunk_tokens is not None:
            fb, fbp, pos = fwd_bwd, fwd_bwd_packed, self.loss.positions

            def fwd_bwd(inputs, targets, mask, *ref):
                return fb(inputs, targets, mask, pos(mask), *ref)

            def fwd_bwd_packed(inputs, targets, mask, attn, *ref):
                return fbp(inputs, targets, mask, attn, pos(mask), *ref)

        self._fwd_bwd, self._fwd_bwd_packed, self._update = fwd_bwd, fwd_bwd_packed, update

    # -- helpers ---------------------------------------------------------------------------------

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def micro_batches(self, batch) -> list[tuple[np.ndarray, int]]:
        """How :meth:`_accumulate` runs ``batch`` (laid out by :attr:`shapes`): see :func:`micro_batches`;
        with the ladder, calls of rows at their own length are padded up to a rung too."""
        calls = micro_batches(batch, self.cfg.train, self.on_gpu, self.call_overhead)
        if self.shapes.name == "ladder":
            calls = [(rows, self.shapes.length(length, batch.inputs.shape[1])) for rows, length in calls]
        return calls

    def _accumulate(self, batch):
        """Summed loss, target tokens and summed gradients of this process's rows of ``batch``,
        run as :meth:`micro_batches`, evaluated (the update divides by the tokens)."""
        loss_sum, ntoks, grads, stats = mx.array(0.0), mx.array(0.0), None, []
        batch = self.shapes.apply(batch)
        for rows, length in self.micro_batches(batch):
            self.shape_stats.add(len(rows), length, shapes.call_filled(batch, rows, length))
            inputs, targets, mask, attn = batch_arrays(batch, rows, length)
            ref = self.method.extras(batch, rows)
            if attn is None:
                loss, n, g, *extra = self._fwd_bwd(inputs, targets, mask, *ref)
            else:
                loss, n, g, *extra = self._fwd_bwd_packed(inputs, targets, mask, attn)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_sum, ntoks = loss_sum + loss, ntoks + n
            stats = extra if not stats else [a + b for a, b in zip(stats, extra)]
        mx.eval(loss_sum, ntoks, grads, stats)
        self._stats = stats
        return loss_sum, ntoks, grads

    def step_on(self, batch) -> tuple[float, int]:
        """One optimizer step on ``batch`` (this process's rows, split into grad_accum micro-batches
        as in :meth:`fit`), evaluated before returning; no bookkeeping, callbacks or collectives.
        Returns (mean target-token loss, target tokens). Used to measure a job (``--dry-run``);
        the method's preparation (GRPO's sampling phase) is part of the step."""
        loss_sum, ntoks, grads = self._accumulate(self.method.prepare(self, batch))
        self._update(grads, ntoks)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return loss_sum.item() / max(ntoks.item(), 1.0), int(ntoks.item())

    def evaluate(
        self, dataset: TokenizedDataset, max_batches: Optional[int] = None, metrics: Optional[dict] = None
    ) -> tuple[float, int]:
        """Token-weighted mean loss over ``dataset`` (reduced across ranks) and its token count:
        see :func:`evaluate` (or the method's own evaluation, GRPO's rewards of greedy answers)."""
        own = self.method.evaluate(self, dataset, max_batches, metrics)
        if own is not None:
            return own
        return evaluate(
            self.model,
            self.loss,
            dataset,
            self.cfg,
            max_batches=max_batches,
            sync=self.sync,
            metrics=metrics,
            progress=self.progress,
            stream=self.progress_stream,
        )

    # -- checkpoints -----------------------------------------------------------------------------

    def _set_hint(self, have_checkpoint: bool) -> None:
        """What a rank that gives up on the others tells the user about the run folder: true only
        once this run has restored or written a checkpoint."""
        run = self.run
        if run is None:
            return
        if run.replacing is not None:
            self.sync.hint = (
                f"{run.replacing} is left as it was: --overwrite replaces it only when the new run completes."
            )
            return
        if have_checkpoint:
            self.sync.hint = (
                f"Checkpoints in {run.checkpoints} are complete; continue with: "
                f"mlx-lora train --resume {run.path} (with any number of ranks, keeping "
                f"batch_size x grad_accum x ranks)."
            )
        else:
            self.sync.hint = (
                "No checkpoint of this run was saved yet, so there is nothing to resume; start over with --overwrite."
            )

    def _what_is_kept(self) -> str:
        """The checkpoint a stopped run leaves (rank 0 writes them, so only it can tell)."""
        if self.run is None or self.rank != 0:
            return "the checkpoints saved so far are kept"
        if self.run.replacing is not None:
            return (
                f"{self.run.replacing} is left as it was (--overwrite replaces it only when the new run "
                f"completes) and nothing of this run is kept"
            )
        latest = self.run.latest_checkpoint()
        if latest is None:
            return "no checkpoint was saved yet, so nothing is kept and a rerun starts over (--overwrite)"
        return f"the last good checkpoint {latest} is kept (continue with: mlx-lora train --resume {self.run.path})"

    def save_checkpoint(self, verify: bool = True) -> Optional[str]:
        """Rank 0 writes a checkpoint. With several ranks and ``verify``, all ranks first check
        (by fingerprint, one small collective) that their adapter and optimizer state are still
        bit-identical, the promise data parallelism rests on."""
        if self.run is None or self.save_adapter_fn is None:
            return None
        mx.eval(self.model.parameters(), self.optimizer.state)
        t = self.cfg.train
        # The data position is a global batch index; resuming with another number of ranks or
        # batch size converts it through the global batch size (see restore()).
        self.state.extra["global_batch"] = t.batch_size * t.grad_accum * self.world
        if verify and self.world > 1:
            arrays = [v for _, v in tree_flatten(self.model.trainable_parameters())]
            arrays += [v for _, v in tree_flatten(self.optimizer.state)]
            if not self.sync.identical(arrays, f"the checkpoint check of step {self.state.step}"):
                raise dist.DistributedError(
                    f"after step {self.state.step} the ranks hold different adapter or optimizer states, so "
                    f"data-parallel training is no longer one run; make sure every host runs the same "
                    f"mlx and mlx-lora versions. {self.sync.hint}"
                )
        if self.rank != 0:
            self._set_hint(have_checkpoint=True)  # rank 0 is writing it now
            return None
        path = self.run.save_checkpoint(
            self.state.step,
            self.save_adapter_fn,
            self.optimizer.state,
            self.state,
            keep=self.cfg.train.keep_checkpoints,
        )
        self._set_hint(have_checkpoint=True)
        self.save_adapter_fn(self.run.path)  # the run folder's top-level adapter is the newest
        self.run.record(ADAPTER_CONFIG, ADAPTER_WEIGHTS, MLX_LM_WEIGHTS)
        self._emit("on_checkpoint", path)
        return str(path)

    def restore(self, adapter_state: dict, optimizer_state: dict, state: TrainState, source=None) -> None:
        """Continue from a checkpoint (``source`` names it in errors). Its adapter and optimizer
        state must have exactly the tensors this config builds: loading weights of another shape
        would silently train an adapter its own config does not describe."""

        what = f"checkpoint {source}" if source is not None else "the checkpoint"
        _check_same_tensors(current_adapter(self.model), adapter_state, f"{what}: its adapter")
        _check_same_tensors(
            dict(tree_flatten(self.optimizer.state)),
            dict(tree_flatten(optimizer_state)),
            f"{what}: its optimizer state",
        )
        set_adapter_state(self.model, adapter_state)
        # The learning rate comes from this config, which may have changed it: a schedule recomputes
        # it from the step at every update, but a constant one lives only in the optimizer state.
        optimizer_state = {**optimizer_state, "learning_rate": self.optimizer.state["learning_rate"]}
        self.optimizer.state = optimizer_state
        mx.eval(self.optimizer.state)
        self._build_steps()  # the compiled update must capture the restored state objects
        self.state = replace(state, world_size=self.world, extra=dict(state.extra))
        t = self.cfg.train
        new_global = t.batch_size * t.grad_accum * self.world
        # Checkpoints record their global batch size; older ones only their number of ranks.
        old_global = int(state.extra.get("global_batch", t.batch_size * t.grad_accum * state.world_size))
        self.state.batch_index = dist.convert_position(state.batch_index, old_global, new_global)
        self._set_hint(have_checkpoint=True)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until ``total_steps``, early stopping, or an interrupt (Ctrl-C, or SIGTERM within
        :func:`~mlx_lora.plumbing.interrupts.sigterm_as_interrupt`), which saves a checkpoint and returns.
        A non-finite loss skips the step or raises :class:`TrainingStopped` (``train.nan_policy``)."""
        self.method.start(self)  # any state of the method's own (DPO's cached reference log-probs)
        self.model.train()
        self._emit("on_train_start")
        batches = self._batches()
        nan, clock = NanPolicy(self.cfg.train.nan_policy), StepClock(self.state.elapsed_s)
        stopped, last_loss, last_ckpt = "completed", None, None
        mx.reset_peak_memory()
        try:
            while self.state.step < self.total_steps:
                batch, pos = next(batches)
                loss_sum, ntoks, grads = self._forward_backward(batch)
                loss, tokens = self._global_loss(loss_sum, ntoks)
                verdict = nan.verdict(loss)
                if verdict == "skip":
                    self._emit("on_nonfinite", self.state.step + 1)
                    continue
                if verdict == "stop":
                    raise self._stopped_on(loss)
                # One process: no interrupt can split a step and its metrics line (several: a rank
                # must stay interruptible inside a collective, so rank 0 saves only between steps).
                with interrupts_deferred(self.world == 1):
                    self._apply(grads, ntoks, pos, tokens)
                    last_loss = loss
                    self._record_step(clock, loss, tokens)
                stop = False
                if self._eval_due():
                    stop = self._validate()
                    clock.skip_pause()
                if self._save_due() or stop:
                    last_ckpt = self.save_checkpoint()
                if stop:
                    stopped = "early_stopping"
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
            last_ckpt = self._save_on_interrupt() or last_ckpt
        result = TrainResult(
            self.state.step,
            last_loss,
            self.state.best_val_loss,
            self.state.best_step,
            self.state.trained_tokens,
            self.state.elapsed_s,
            stopped,
            last_ckpt,
        )
        self._emit("on_train_end", result)
        return result

    def _batches(self):
        """(batch, position after it) from this run's position on, one per optimizer step: this
        rank's share of the global batch (batch_size * grad_accum rows per rank), split into
        grad_accum micro-batches by _accumulate. Accumulating 4 x 1 thus sees exactly the examples
        of one batch of 4."""
        return self.plan.batches(start=BatchPosition(self.state.epoch, self.state.batch_index), loop=True)

    def _forward_backward(self, batch):
        """:meth:`_accumulate` with this step's randomness. Dropout masks depend only on (seed,
        step, rank), so a resumed run draws the same masks as an uninterrupted one without saving
        generator state; the rank term keeps ranks from drawing the same masks for their
        different examples."""
        mx.random.seed(self.cfg.train.seed * 1_000_003 + self.state.step + self.rank * 1_000_000_007)
        return self._accumulate(self.method.prepare(self, batch))

    def _global_loss(self, loss_sum, ntoks) -> tuple[float, float]:
        """(mean loss over the global batch's target tokens, their number), summed over ranks (a
        preference loss: mean over its pairs, and the number of their target tokens)."""
        extra = [x for s in self._stats for x in np.asarray(s).reshape(-1).tolist()] + self.method.host_stats()
        sums = self.sync.sum([loss_sum.item(), ntoks.item()] + extra, f"the loss all_sum of step {self.state.step + 1}")
        total, n = sums[:2]
        # The method's metrics; n may count pairs or completions, throughput counts target tokens.
        self.step_metrics, tokens = self.method.metrics(sums[2:], n)
        return total / max(n, 1.0), tokens

    def _stopped_on(self, loss: float) -> TrainingStopped:
        return TrainingStopped(
            f"loss became {loss} at step {self.state.step + 1}; stopped: {self._what_is_kept()}. "
            f"Lower train.lr, enable train.max_grad_norm, or set train.nan_policy: skip"
        )

    def _apply(self, grads, ntoks, pos: BatchPosition, global_tokens: float) -> None:
        """The optimizer step and the counters that name it; _update_pending tells an interrupt
        arriving in between (several ranks) that the state is not a whole step."""
        self._update_pending = True
        self._update(grads, ntoks)
        self.sync.eval(
            self.model.trainable_parameters(),
            self.optimizer.state,
            what=f"the gradient all_sum of step {self.state.step + 1}",
        )
        self.state.step += 1
        self.state.epoch, self.state.batch_index = pos.epoch, pos.index
        self.state.trained_tokens += int(global_tokens)
        self._update_pending = False

    def _record_step(self, clock: StepClock, loss: float, global_tokens: float) -> None:
        """Advance the clock; every ``log_every`` steps (and at the first and last) a metrics record."""
        st = self.state
        st.elapsed_s = clock.step(int(global_tokens))
        if st.step % self.cfg.train.log_every != 0 and st.step not in (1, self.total_steps):
            return
        self._emit(
            "on_step",
            {
                "step": st.step,
                "total_steps": self.total_steps,
                "loss": loss,
                "lr": float(self.optimizer.learning_rate.item()),
                "tokens": int(global_tokens),
                "trained_tokens": st.trained_tokens,
                "tokens_per_s": clock.tokens_per_s(),
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "shapes": len(self.shape_stats.shapes),
                "padding": self.shape_stats.padding,
                "elapsed_s": st.elapsed_s,
                "eta_s": (self.total_steps - st.step) * clock.s_per_step(),
                **self.step_metrics,
            },
        )
        clock.new_window()

    def _eval_due(self) -> bool:
        """Every ``eval_every`` steps and at the last, when there is a validation set."""
        step = self.state.step
        return bool(
            self.valid_set is not None
            and len(self.valid_set)
            and (step % self.cfg.train.eval_every == 0 or step == self.total_steps)
        )

    def _save_due(self) -> bool:
        """Every ``save_every`` steps and at the last (early stopping saves too, see fit)."""
        step = self.state.step
        return step % self.cfg.train.save_every == 0 or step == self.total_steps

    def _save_on_interrupt(self) -> Optional[str]:
        """The checkpoint an interrupted run saves, if any (none before the first step)."""
        if self.state.step == 0:
            return None
        if self.world > 1:
            # The ranks are interrupted independently, so no collective can be trusted now. Rank
            # 0 saves alone, and only between steps, when its state is the group's.
            return None if self._update_pending else self.save_checkpoint(verify=False)
        return self.save_checkpoint()

    def _validate(self) -> bool:
        """Evaluate; keep the best adapter (checkpoints/best); True when early stopping triggers:
        ``early_stopping_patience`` evaluations in a row without a new best."""
        t = self.cfg.train
        self.model.eval()
        extra: dict = {}
        val_loss, _ = self.evaluate(self.valid_set, t.eval_batches, metrics=extra)
        self.model.train()
        if t.clear_cache_after_eval:
            mx.clear_cache()  # evaluation's buffers (other shapes than training's) go back to the system
        st = self.state
        is_best = math.isfinite(val_loss) and (st.best_val_loss is None or val_loss < st.best_val_loss)
        if is_best:
            st.best_val_loss, st.best_step, st.evals_since_best = val_loss, st.step, 0
            self._save_best()
        else:
            st.evals_since_best += 1
        self._emit(
            "on_eval",
            {
                "step": st.step,
                "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 50.0)),
                "is_best": is_best,
                **extra,
            },
        )
        return t.early_stopping_patience is not None and st.evals_since_best >= t.early_stopping_patience

    def _save_best(self) -> None:
        if self.run is not None and self.save_adapter_fn is not None and self.rank == 0:
            self.run.replace_checkpoint("best", self.save_adapter_fn)
