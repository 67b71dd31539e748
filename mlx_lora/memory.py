"""Memory: the limits users set (``train.wired_limit_gb``, ``train.cache_limit_gb``) and a
per-phase trace of where a training job's memory goes.

The trace (:func:`trace`, printed by ``bench/memory_trace.py``) sets a job up as training does and
records, after each phase, MLX's active memory (arrays alive), the peak during the phase (reset
before it) and the allocator's cache (freed buffers kept for reuse):

weights loaded -> LoRA wrapped -> trainer built -> first forward (loss only) -> first
forward+backward (traces and compiles the step) -> forward+backward (compiled) -> optimizer step
-> evaluation -> after clear_cache.

The peak of a phase minus the active memory before it is what the phase needed on top of what
was already held (activations kept for the backward pass, logits chunks, compile buffers); the
cache column shows how much the allocator keeps after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

GB = 1e9


def apply_limits(t) -> list[str]:
    """Set MLX's wired and cache limits from ``t`` (a TrainConfig); one note per limit set, saying
    what it does on this backend."""
    import mlx.core as mx

    from .backend import backend_name, device_info
    from .errors import ConfigError

    notes = []
    if t.cache_limit_gb is not None:
        mx.set_cache_limit(int(t.cache_limit_gb * GB))
        notes.append(f"allocator cache limited to {t.cache_limit_gb:g} GB (train.cache_limit_gb)")
    if t.wired_limit_gb is not None:
        if backend_name() != "metal":
            notes.append(f"train.wired_limit_gb has no effect on the {backend_name()} backend "
                         "(wired memory is a Metal feature)")
        else:
            most = device_info().get("max_recommended_working_set_size")
            if most and t.wired_limit_gb * GB > most:
                raise ConfigError([f"train.wired_limit_gb: must be <= {most / GB:.1f} (this GPU's recommended "
                                   f"working set), got {t.wired_limit_gb:g}"])
            mx.set_wired_limit(int(t.wired_limit_gb * GB))
            notes.append(f"wired memory limit {t.wired_limit_gb:g} GB (train.wired_limit_gb)")
    return notes


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
        import mlx.core as mx

        self.mx = mx
        self.phases: list[Phase] = []
        mx.reset_peak_memory()

    def run(self, name: str, fn: Callable[[], object] = lambda: None):
        import time

        mx = self.mx
        mx.reset_peak_memory()  # to zero: the phase's peak is at least what was held before and after it
        before = mx.get_active_memory()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        active = int(mx.get_active_memory())
        self.phases.append(Phase(name, active, int(max(mx.get_peak_memory(), before, active)),
                                 int(mx.get_cache_memory()), seconds))
        return out

    def lines(self) -> list[str]:
        out = [f"{'phase':<34} {'active GB':>9} {'peak GB':>9} {'+peak GB':>9} {'cache GB':>9} {'s':>7}"]
        before = 0
        for p in self.phases:
            out.append(f"{p.name:<34} {p.active / GB:9.3f} {p.peak / GB:9.3f} {(p.peak - before) / GB:9.3f} "
                       f"{p.cache / GB:9.3f} {p.seconds:7.2f}")
            before = p.active
        return out

    def as_dict(self) -> list[dict]:
        return [p.__dict__.copy() for p in self.phases]


def trace(cfg, *, log: Optional[Callable[[str], None]] = None) -> Recorder:
    """Set ``cfg``'s job up phase by phase on its longest batch and record each phase's memory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from . import adapters
    from .config import validate
    from .data import load_datasets
    from .models import load_model
    from .trainer import Trainer, batch_arrays

    validate(cfg)
    say = log or (lambda m: None)
    rec = Recorder()
    mx.random.seed(cfg.train.seed)
    model, tokenizer, info = rec.run("weights loaded", lambda: load_model(
        cfg.model.path, dtype=cfg.model.dtype, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, dequantize_on_cpu=cfg.model.dequantize_on_cpu))
    mx.eval(model.parameters())
    splits = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed, splits=("train",))

    def wrap():
        adapters.apply_lora(model, cfg.lora)
        mx.eval(model.parameters())

    rec.run("LoRA wrapped", wrap)
    trainer = rec.run("trainer built (optimizer state)", lambda: Trainer(model, cfg, splits.train, None, None))
    model.train()
    t = cfg.train
    from .batching import iterate_batches

    it = iterate_batches(splits.train, t.batch_size * t.grad_accum, max_seq_length=cfg.data.max_seq_length,
                         seed=t.seed, shuffle=True, packing=cfg.data.packing, loop=False,
                         bucketing=cfg.data.length_bucketing)
    batch = max((trainer.shapes.apply(b) for b, _ in it), key=lambda b: b.inputs.size)
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
