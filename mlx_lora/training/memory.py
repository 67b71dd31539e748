"""Memory: the limits users set (``train.wired_limit_gb``, ``train.cache_limit_gb``).

The per-phase trace of where a training job's memory goes lives beside the estimate
(:func:`mlx_lora.training.estimate.trace`, printed by ``bench/memory_trace.py``): it sets a job up as
training does and records, after each phase, MLX's active memory (arrays alive), the peak during the phase (reset
before it) and the allocator's cache (freed buffers kept for reuse):

weights loaded -> LoRA wrapped -> trainer built -> first forward (loss only) -> first
forward+backward (traces and compiles the step) -> forward+backward (compiled) -> optimizer step
-> evaluation -> after clear_cache.

The peak of a phase minus the active memory before it is what the phase needed on top of what
was already held (activations kept for the backward pass, logits chunks, compile buffers); the
cache column shows how much the allocator keeps after it.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_lora.plumbing.backend import backend_name, device_info
from mlx_lora.plumbing.errors import ConfigError

GB = 1e9


def apply_limits(t) -> list[str]:
    """Set MLX's wired and cache limits from ``t`` (a TrainConfig); one note per limit set, saying
    what it does on this backend."""

    notes = []
    if t.cache_limit_gb is not None:
        mx.set_cache_limit(int(t.cache_limit_gb * GB))
        notes.append(f"allocator cache limited to {t.cache_limit_gb:g} GB (train.cache_limit_gb)")
    if t.wired_limit_gb is not None:
        if backend_name() != "metal":
            notes.append(
                f"train.wired_limit_gb has no effect on the {backend_name()} backend (wired memory is a Metal feature)"
            )
        else:
            most = device_info().get("max_recommended_working_set_size")
            if most and t.wired_limit_gb * GB > most:
                raise ConfigError(
                    [
                        f"train.wired_limit_gb: must be <= {most / GB:.1f} (this GPU's recommended "
                        f"working set), got {t.wired_limit_gb:g}"
                    ]
                )
            mx.set_wired_limit(int(t.wired_limit_gb * GB))
            notes.append(f"wired memory limit {t.wired_limit_gb:g} GB (train.wired_limit_gb)")
    return notes
