"""How much memory and time a training job needs, from a few measured steps (``train --dry-run``).

The job is set up exactly as :func:`mlx_lora.commands.api.train` would (model, data, adapter, trainer,
batching), then:

- the batch holding the longest call (the trainer may run a batch's rows in calls of their own
  length, ``train.length_groups``), with the most rows among those, runs once after
  ``mx.reset_peak_memory()``: its peak is the job's peak (activations grow with rows x length
  and attention with length^2, and every other call is smaller in both);
- a typical batch (median positions) and the longest batch run twice each; the second runs,
  free of compilation, fit ``seconds = sum over calls of positions * (a + b * length)``
  (per-position work plus attention), which prices every batch of the epoch plan;
- the first run of the typical batch minus its second run, per call shape it met, is the
  compile cost, paid once per distinct call shape.

Nothing is written: no run folder, no adapter. The measured steps do update the in-memory adapter,
which is then discarded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lora.config import Config, validate
from mlx_lora.data.mixture import load_datasets
from mlx_lora.data.shapes import epoch_stats
from mlx_lora.model import adapters
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing import backend
from mlx_lora.plumbing.backend import fmt_bytes
from mlx_lora.training.callbacks import fmt_rate
from mlx_lora.training.memory import GB
from mlx_lora.training.methods import for_config as method_for
from mlx_lora.training.trainer import Trainer, batch_arrays, warmup_warning


@dataclass
class MeasuredBatch:
    rows: int
    length: int
    target_tokens: int
    first_s: float
    """First run: includes tracing and compiling this shape."""
    second_s: float
    positions: int
    """Positions computed (the batch's rows may run in calls of their own lengths)."""
    calls: int = 1


@dataclass
class Estimate:
    peak_memory_bytes: int
    available_bytes: Optional[int]
    """Memory the backend can use (GPU working set on Metal, RAM on CPU)."""
    total_steps: int
    target_tokens: int
    """Target tokens the whole run trains on."""
    train_seconds: float
    """Predicted training time, compilation included (evaluation and checkpoints not)."""
    compile_seconds: float
    shapes: int
    """Distinct batch shapes in an epoch (each is compiled once)."""
    typical: MeasuredBatch
    longest: MeasuredBatch
    backend: str
    dtype: str
    loss: str
    notes: list[str] = field(default_factory=list)
    shape_line: str = ""
    """The shape policy, its distinct call shapes and padding over an epoch."""
    compute: str = ""
    """How a quantized base computes (the path training takes, measured here), as the train banner says."""

    @property
    def tokens_per_s(self) -> float:
        return self.target_tokens / self.train_seconds if self.train_seconds else float("nan")

    @property
    def fits(self) -> Optional[bool]:
        # Leave headroom for the allocator cache, the OS and other processes.
        return None if self.available_bytes is None else self.peak_memory_bytes <= 0.9 * self.available_bytes

    def lines(self) -> list[str]:

        fit = {
            None: "",
            True: " -> fits",
            False: " -> DOES NOT FIT (lower train.batch_size or "
            "data.max_seq_length, or set train.grad_checkpoint: true)",
        }[self.fits]
        avail = f" of {fmt_bytes(self.available_bytes)}" if self.available_bytes else ""
        lg, ty = self.longest, self.typical
        out = [
            f"dry run   {self.backend}, compute {self.dtype}, {self.loss}; measured 4 steps, nothing written",
            f"memory    peak {fmt_bytes(self.peak_memory_bytes)}{avail}{fit} (longest batch: {lg.rows} x {lg.length} "
            f"positions{_calls(lg)})",
            f"speed     {_rate(ty.target_tokens / ty.second_s)} target tokens/s on a typical batch "
            f"({ty.rows} x {ty.length}), "
            f"{_rate(lg.target_tokens / lg.second_s)} on the longest; {_rate(self.tokens_per_s)} over the whole run",
            f"run       {self.total_steps:,} steps, {self.target_tokens:,} target tokens: about "
            f"{_duration(self.train_seconds)} (incl. ~{self.compile_seconds:.0f} s compiling {self.shapes} "
            f"batch shape{'s' if self.shapes != 1 else ''}; "
            f"evaluation and checkpoints extra)",
        ]
        if self.compute:
            out.insert(1, f"compute   {self.compute}")
        if self.shape_line:
            out.append(f"shapes    {self.shape_line}")
        return out + [f"note      {n}" for n in self.notes]


def _calls(m: MeasuredBatch) -> str:
    return f", run as {m.calls} calls of their own length" if m.calls > 1 else ""


def _rate(x: float) -> str:
    """Tokens/s: thousands separated, and a slow job (a quantized base on the CPU) as 0.3, not 0."""

    return f"{x:,.0f}" if x >= 10 else fmt_rate(x)


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _plan(trainer) -> list[tuple[int, int, int, list[tuple[int, int]]]]:
    """(rows, padded length, target tokens, [(rows, length) of each call]) of every batch of one
    epoch, in order; the calls are how the trainer runs the batch (see Trainer.micro_batches)."""
    shaped = [trainer.shapes.apply(b) for b in trainer.plan.first_epoch()]
    return [
        (b.inputs.shape[0], b.inputs.shape[1], b.ntokens, [(len(r), l) for r, l in trainer.micro_batches(b)])
        for b in shaped
    ]


def _batch_at(trainer, index: int):
    for i, b in enumerate(trainer.plan.first_epoch()):
        if i == index:
            return b
    raise IndexError(index)


def _timed(trainer, batch) -> float:
    t0 = time.perf_counter()
    trainer.step_on(batch)
    return time.perf_counter() - t0


def _work(calls) -> tuple[int, int]:
    """(positions, positions x length) computed by a batch's calls."""
    return sum(r * l for r, l in calls), sum(r * l * l for r, l in calls)


def estimate(cfg: Config, *, log=None) -> Estimate:
    """Set up ``cfg``'s job, measure a few steps and predict its peak memory and duration."""

    validate(cfg)
    say = log or (lambda m: None)
    mx.random.seed(cfg.train.seed)
    # The same load as training's: a quantized base on the CPU computes dequantized when it fits,
    # so the steps measured here are the ones training will take.
    model, tokenizer, info = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dequantize_on_cpu=cfg.model.dequantize_on_cpu,
    )
    method = method_for(cfg)
    splits = method.load_datasets(cfg, tokenizer, seed=cfg.train.seed, splits=("train",))
    adapters.apply_lora(model, cfg.lora, warn=lambda m: say(f"WARNING: {m}"))
    # A method with a sampling phase (GRPO) samples in every measured step; here each completion
    # runs to max_completion_length, so the peak covers the longest sampling and update.
    method.full_length = True
    trainer = Trainer(model, cfg, splits.train, None, None, method=method)
    model.train()

    plan = _plan(trainer)
    # The peak: the longest call, and among those the one with the most rows.
    peak_call = [max((l, r * l) for r, l in calls) for *_, calls in plan]
    i_long = max(range(len(plan)), key=lambda i: peak_call[i])
    order = sorted(range(len(plan)), key=lambda i: _work(plan[i][3])[0])
    i_typ = order[len(order) // 2]
    notes = []
    if trainer.world > 1:
        notes.append(f"per rank of {trainer.world}: each rank holds its own copy of this peak")

    def measured(i, first, second):
        rows, length, ntok, calls = plan[i]
        return MeasuredBatch(rows, length, ntok, first, second, _work(calls)[0], len(calls))

    say(f"measuring a typical batch {plan[i_typ][0]} x {plan[i_typ][1]} ...")
    typ_batch = _batch_at(trainer, i_typ)
    typ = measured(i_typ, _timed(trainer, typ_batch), _timed(trainer, typ_batch))
    say(f"measuring the longest batch {plan[i_long][0]} x {plan[i_long][1]} ...")
    long_batch = _batch_at(trainer, i_long)
    mx.clear_cache()
    mx.reset_peak_memory()
    first = _timed(trainer, long_batch)
    peak = int(mx.get_peak_memory())
    lng = measured(i_long, first, _timed(trainer, long_batch))

    # seconds(batch) = sum over its calls of positions * (a + b * length) (per-position work plus
    # attention), through the two compile-free measurements.
    (p1, q1), (p2, q2) = _work(plan[i_typ][3]), _work(plan[i_long][3])
    s1, s2 = typ.second_s, lng.second_s
    det = p1 * q2 - p2 * q1
    a = b = -1.0
    if abs(det) > 1e-9 * p1 * q2:
        a, b = (s1 * q2 - s2 * q1) / det, (p1 * s2 - p2 * s1) / det
    if a < 0 or b < 0:  # equal shapes, or noise making one term negative: per-position cost alone
        a, b = (s1 + s2) / (p1 + p2), 0.0
    epoch_s = sum(a * p + b * q for p, q in (_work(calls) for *_, calls in plan))
    per_step = epoch_s / len(plan)
    steps = trainer.total_steps
    shapes = len({c for *_, calls in plan for c in calls})
    compile_s = max(typ.first_s - typ.second_s, 0.0) / len(set(plan[i_typ][3])) * shapes
    epoch_tokens = sum(n for _, _, n, _ in plan)
    tokens = round(epoch_tokens * steps / len(plan))

    available = None
    info_dev = backend.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info_dev.get(key):
            available = int(info_dev[key])
            break
    if available is None:
        available = backend.total_memory_bytes()

    first = epoch_stats(trainer.plan, trainer.shapes, trainer.micro_batches)
    shape_line = f"{trainer.shapes.chosen}; first epoch: {first.line()}"
    notes += trainer.memory_notes

    warmup = warmup_warning(cfg.train, steps)
    if warmup:
        notes.append(f"WARNING: {warmup}")
    if cfg.train.method == "grpo":
        t = cfg.train
        notes.append(
            f"each measured step includes the sampling phase: {t.group_size} completions of "
            f"{t.max_completion_length} tokens (the longest allowed) per prompt, then the update on them; "
            f"the peak covers both"
        )
    loss = f"chunked loss ({trainer.loss.chunk_tokens} tokens)" if trainer.loss.chunk_tokens else "plain loss"
    if trainer.loss.note:
        notes.append(trainer.loss.note)
    if cfg.train.grad_checkpoint:
        loss += ", gradient checkpointing"
    return Estimate(
        peak_memory_bytes=peak,
        available_bytes=available,
        total_steps=steps,
        target_tokens=tokens,
        train_seconds=per_step * steps + compile_s,
        compile_seconds=compile_s,
        shapes=shapes,
        typical=typ,
        longest=lng,
        backend=backend.backend_name(),
        dtype=str(info.dtype).replace("mlx.core.", ""),
        loss=loss,
        notes=notes,
        shape_line=shape_line,
        compute=getattr(info, "compute", None) or "",
    )


# ---------------------------------------------------------------------------------------------
# the per-phase memory trace (see mlx_lora.training.memory)


@dataclass
class Phase:
    name: str
    active: int
    """Bytes of live arrays after the phase."""
    peak: int
    """Highest bytes during the phase (the peak is reset before each)."""
    cache: int
    """Bytes the allocator keeps cached after the phase."""
    seconds: float


class Recorder:
    """Runs phases one after another, recording memory around each (see :class:`Phase`)."""

    def __init__(self):

        self.mx = mx
        self.phases: list[Phase] = []
        mx.reset_peak_memory()

    def run(self, name: str, fn: Callable[[], object] = lambda: None):

        mx = self.mx
        mx.reset_peak_memory()  # to zero: the phase's peak is at least what was held before and after it
        before = mx.get_active_memory()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        active = int(mx.get_active_memory())
        self.phases.append(
            Phase(name, active, int(max(mx.get_peak_memory(), before, active)), int(mx.get_cache_memory()), seconds)
        )
        return out

    def lines(self) -> list[str]:
        out = [f"{'phase':<34} {'active GB':>9} {'peak GB':>9} {'+peak GB':>9} {'cache GB':>9} {'s':>7}"]
        before = 0
        for p in self.phases:
            out.append(
                f"{p.name:<34} {p.active / GB:9.3f} {p.peak / GB:9.3f} {(p.peak - before) / GB:9.3f} "
                f"{p.cache / GB:9.3f} {p.seconds:7.2f}"
            )
            before = p.active
        return out

    def as_dict(self) -> list[dict]:
        return [p.__dict__.copy() for p in self.phases]


def trace(cfg, *, log: Optional[Callable[[str], None]] = None) -> Recorder:
    """Set ``cfg``'s job up phase by phase on its longest batch and record each phase's memory."""

    validate(cfg)
    say = log or (lambda m: None)
    rec = Recorder()
    mx.random.seed(cfg.train.seed)
    model, tokenizer, info = rec.run(
        "weights loaded",
        lambda: load_model(
            cfg.model.path,
            dtype=cfg.model.dtype,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            dequantize_on_cpu=cfg.model.dequantize_on_cpu,
        ),
    )
    mx.eval(model.parameters())
    splits = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed, splits=("train",))

    def wrap():
        adapters.apply_lora(model, cfg.lora)
        mx.eval(model.parameters())

    rec.run("LoRA wrapped", wrap)
    trainer = rec.run("trainer built (optimizer state)", lambda: Trainer(model, cfg, splits.train, None, None))
    model.train()
    batch = max((trainer.shapes.apply(b) for b in trainer.plan.first_epoch()), key=lambda b: b.inputs.size)
    rows, length = max(trainer.micro_batches(batch), key=lambda c: (c[1], len(c[0])))
    say(f"tracing memory on a call of {len(rows)} x {length} positions ({trainer.shapes.name} shapes)")
    inputs, targets, mask, attn = batch_arrays(batch, rows, length)

    def forward():
        loss, n = trainer.loss.eval(model, inputs, targets, mask, attn)
        mx.eval(loss, n)

    fb = trainer._fwd_bwd if attn is None else (lambda i, tg, m: trainer._fwd_bwd_packed(i, tg, m, attn))
    grads = {}

    def fwd_bwd():
        loss, n, g = fb(inputs, targets, mask)
        mx.eval(loss, n, g)
        grads["g"], grads["n"] = g, n

    rec.run("first forward (loss only)", forward)
    rec.run("first forward+backward (compiles)", fwd_bwd)
    rec.run("forward+backward (compiled)", fwd_bwd)

    def update():
        trainer._update(grads["g"], grads["n"])
        mx.eval(model.trainable_parameters(), trainer.optimizer.state)
        grads.clear()

    rec.run("optimizer step", update)
    rec.run("evaluation (loss only)", forward)
    rec.run("after clear_cache", mx.clear_cache)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    say(f"model parameters {weights / GB:.3f} GB; call {len(rows)} x {length}")
    return rec
