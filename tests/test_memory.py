"""Memory controls (train.cache_limit_gb, train.wired_limit_gb) reach MLX, and the per-phase
recorder of the memory trace measures what a phase allocates."""

from __future__ import annotations

import mlx.core as mx

from mlx_lora.config import TrainConfig
from mlx_lora.training.estimate import Recorder
from mlx_lora.training.memory import apply_limits


def test_cache_limit_is_set_and_wired_limit_is_a_note_off_metal():
    before = mx.set_cache_limit(0)  # returns the limit in force, which this test restores
    try:
        notes = apply_limits(TrainConfig(cache_limit_gb=0.25, wired_limit_gb=2.0))
        assert mx.set_cache_limit(before) == 250_000_000
    finally:
        mx.set_cache_limit(before)
    assert any("cache limited to 0.25 GB" in n for n in notes)
    if not mx.metal.is_available():
        assert any("wired_limit_gb has no effect on the cpu backend" in n for n in notes), notes
    assert apply_limits(TrainConfig()) == []  # nothing asked, nothing changed


def test_recorder_sees_what_a_phase_allocates_and_frees():
    rec = Recorder()
    held = {}

    def allocate():
        held["a"] = mx.zeros((4, 1024, 1024), mx.float32)  # 16 MiB
        mx.eval(held["a"])

    def free():
        held.clear()
        mx.clear_cache()

    rec.run("allocate", allocate)
    rec.run("free", free)
    a, f = rec.phases
    assert a.peak - (a.active - 16 * 2**20) >= 16 * 2**20 and a.active >= 16 * 2**20
    assert f.active <= a.active - 16 * 2**20 and f.cache == 0 and f.peak >= a.active
    assert [line.split()[0] for line in rec.lines()[1:]] == ["allocate", "free"]
