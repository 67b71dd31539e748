"""Batch shapes: which padded lengths (or packed rows) a run's training calls take.

A compiled step is traced and its kernels built once per distinct input shape. On the CPU that
costs ~1 s per shape against steps of seconds, and each row running at its own length
(``train.length_groups``) wins. On a GPU a step of a small model takes tens of milliseconds and a
new shape ~0.2 s (bench/RESULTS.md, H200: 11 shapes in 15 steps, compilation dominated), so a run
should meet a handful of shapes. ``train.shapes`` chooses how a batch is laid out:

- ``exact``: each batch padded to its own longest row, rounded up to ``PAD_MULTIPLE`` (one shape
  per distinct rounded length);
- ``ladder``: padded up to the next rung of a short ladder of lengths, multiples of
  ``PAD_MULTIPLE`` about ``LADDER_RATIO`` apart, up to ``max_seq_length`` (a shape per rung used);
- ``packed``: the batch's examples packed (best-fit decreasing) into rows of one fixed length, the
  data's longest example rounded up to a rung, kept apart by the block-diagonal mask (a shape per
  row count, at most ``batch_size``);
- ``auto``: ``exact`` on the CPU; on a GPU whichever of the three the cost model below prices
  lowest for this run.

Every policy computes the same examples in each step with the same summed-token loss: only the
padding (and, packed, which examples share a row) changes, never what is learned.

Cost model (GPU): a call of ``rows x L`` positions costs ``rows * L * (6 P + 6 d n L) / RATE``
seconds (``P`` parameters, ``d`` hidden size, ``n`` blocks: the matmuls of the forward and
backward passes and full-square attention), and each distinct shape ``COMPILE_S`` once. It is
summed over the first epoch's batches and multiplied by the run's epochs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.data.batching import PAD_MULTIPLE, Batch, BatchPlan, epoch_plan, pack, padded_length

POLICIES = ("auto", "exact", "ladder", "packed")
LADDER_RATIO = 2**0.5
"""Rungs of the ladder are about this far apart: at most ~41% padding on a row, a rung per
doubling-and-a-half of length (64, 96, 128, 192, 256, 384, 512, 736, 1024, ...)."""
GPU_COMPILE_S = 0.2
"""Seconds to trace a new step shape and build its kernels on a GPU (H200, MLX CUDA, 1B llama:
0.20-0.27 s for a step on a new shape against 0.05-0.08 s repeated)."""
GPU_RATE = 1.3e14
"""Effective FLOP/s of a LoRA step on a GPU (the same H200 steps: ~1,200 positions of a 1B model,
6 x 1.07e9 FLOPs each, in ~0.05 s)."""


def ladder(cap: int, pad_multiple: int = PAD_MULTIPLE, ratio: float = LADDER_RATIO) -> list[int]:
    """Padded lengths ``pad_multiple * ratio**k`` rounded up to ``pad_multiple``, the last ``cap``."""
    rungs: list[int] = []
    x = float(pad_multiple)
    while True:
        r = int(padded_length(math.ceil(x - 1e-9), pad_multiple, cap))
        if not rungs or r > rungs[-1]:
            rungs.append(r)
        if r >= cap:
            return rungs
        x *= ratio


def rung(n: int, rungs: list[int]) -> int:
    """The shortest rung holding ``n`` positions (the last rung when none does)."""
    i = bisect.bisect_left(rungs, int(n))
    return rungs[min(i, len(rungs) - 1)]


@dataclass
class ShapePolicy:
    """How batches are laid out (:func:`resolve` builds one for a run); ``apply`` lays one out."""

    name: str
    """exact, ladder or packed (auto is resolved)."""
    rungs: list[int]
    row_length: int
    """Packed: every row's length."""
    chosen: str = ""
    """Why this policy (auto: the cost of each, in seconds)."""

    def length(self, n: int, cap: int) -> int:
        """Padded length of a call whose longest row fills ``n`` positions (at most ``cap``)."""
        if self.name == "exact":
            return int(padded_length(max(n, 1), PAD_MULTIPLE, cap))
        return min(rung(max(n, 1), self.rungs), cap)

    def apply(self, batch: Batch) -> Batch:
        """``batch`` laid out by this policy: the same examples, the same loss mask on them."""
        if self.name == "exact" or batch.lengths is None:
            return batch
        if self.name == "packed" and batch.segments is None:
            return repack(batch, self.row_length)
        width = self.length(int(batch.lengths.max()), max(self.rungs[-1], batch.inputs.shape[1]))
        return repad(batch, max(width, int(batch.lengths.max())))


def repad(batch: Batch, width: int) -> Batch:
    """``batch`` with every row padded (or cut, past every row's end) to ``width`` positions."""
    B, L = batch.inputs.shape
    if width == L:
        return batch

    def fit(a):
        out = np.zeros((B, width), a.dtype)
        n = min(L, width)
        out[:, :n] = a[:, :n]
        return out

    seg = None if batch.segments is None else fit(batch.segments)
    return Batch(fit(batch.inputs), fit(batch.targets), fit(batch.loss_mask), seg, batch.lengths)


def repack(batch: Batch, row_length: int) -> Batch:
    """The rows of an unpacked ``batch`` packed best-fit decreasing into rows of ``row_length``
    positions, each example keeping its tokens and loss mask, told apart by ``segments``."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    if lengths.max() > row_length:
        raise ValueError(f"a row of {lengths.max()} positions exceeds the packed row length {row_length}")
    rows = pack(lengths, row_length)
    n = len(rows)
    shape = (n, row_length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss, segments = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    filled = np.zeros(n, np.int64)
    for r, members in enumerate(rows):
        at = 0
        for k, e in enumerate(sorted(members.tolist())):
            m = int(lengths[e])
            inputs[r, at : at + m] = batch.inputs[e, :m]
            targets[r, at : at + m] = batch.targets[e, :m]
            loss[r, at : at + m] = batch.loss_mask[e, :m]
            segments[r, at : at + m] = k + 1
            at += m
        filled[r] = at
    return Batch(inputs, targets, loss, segments, filled)


@dataclass
class ShapeStats:
    """Distinct call shapes met and the share of computed positions that are padding."""

    shapes: set = field(default_factory=set)
    computed: int = 0
    filled: int = 0

    def add(self, rows: int, length: int, filled: int) -> None:
        self.shapes.add((int(rows), int(length)))
        self.computed += int(rows) * int(length)
        self.filled += int(filled)

    @property
    def padding(self) -> float:
        return 1.0 - self.filled / self.computed if self.computed else 0.0

    def line(self) -> str:
        n = len(self.shapes)
        return f"{n} distinct call shape{'s' if n != 1 else ''}, {100 * self.padding:.1f}% padding"


def call_filled(batch: Batch, rows, length: int) -> int:
    """Positions of ``batch``'s ``rows`` that hold tokens, within the first ``length``."""
    if batch.lengths is None:
        return int(np.asarray(rows).size) * length
    return int(np.minimum(np.asarray(batch.lengths)[rows], length).sum())


def model_dims(model) -> tuple[int, int, int]:
    """(parameters, hidden size, blocks) of ``model``, as far as it states them."""

    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None)
    layers = getattr(model, "layers", None)
    n = len(layers) if layers is not None else getattr(args, "num_hidden_layers", 0)
    return int(params), int(hidden or 0), int(n or 0)


def plan_costs(
    batches: list[np.ndarray],
    max_seq_length: int,
    epochs: float,
    dims: tuple[int, int, int],
    rate: float = GPU_RATE,
    compile_s: float = GPU_COMPILE_S,
) -> dict[str, tuple[float, int, float]]:
    """Per policy (exact, ladder, packed): (predicted seconds, distinct shapes, padding share) of a
    run whose epochs look like ``batches`` (the positions each row of each batch fills)."""
    params, hidden, layers = dims
    rungs = ladder(max_seq_length)
    longest = max((int(b.max()) for b in batches if len(b)), default=1)
    row_length = rung(longest, rungs)
    out = {}
    for name in ("exact", "ladder", "packed"):
        policy = ShapePolicy(name, rungs, row_length)
        shapes, flops, computed, filled = set(), 0.0, 0, 0
        for sizes in batches:
            if name == "packed":
                calls = [(len(pack(np.asarray(sizes, np.int64), row_length)), row_length)]
            else:
                calls = [(len(sizes), policy.length(int(sizes.max()), max_seq_length))]
            for rows, length in calls:
                shapes.add((rows, length))
                flops += rows * length * (6.0 * params + 6.0 * hidden * layers * length)
                computed += rows * length
            filled += int(sizes.sum())
        seconds = epochs * flops / rate + len(shapes) * compile_s
        out[name] = (seconds, len(shapes), 1.0 - filled / computed if computed else 0.0)
    return out


def resolve(
    policy: str,
    *,
    gpu: bool,
    sizes: np.ndarray,
    batch_rows: int,
    max_seq_length: int,
    seed: int,
    bucketing: bool,
    steps: int,
    dims: tuple[int, int, int],
    allow_packed: bool = True,
) -> ShapePolicy:
    """The policy a run uses: ``policy`` as asked, or for ``auto`` exact on the CPU and, on a GPU,
    the cheapest by :func:`plan_costs` over the first epoch of this run's data (``sizes``:
    positions of each example; ``batch_rows``: rows of one batch on this process). Without
    ``allow_packed`` (preference pairs: each response is a row of its own) auto never packs."""
    rungs = ladder(max_seq_length)
    longest = int(sizes.max()) if len(sizes) else 1
    row_length = rung(min(longest, max_seq_length), rungs)
    if policy != "auto":
        return ShapePolicy(policy, rungs, row_length, chosen=f"{policy} (train.shapes)")
    if not gpu or not len(sizes):
        return ShapePolicy("exact", rungs, row_length, chosen="exact (auto: the CPU backend)")
    plan = epoch_plan(sizes, batch_rows, seed, 0, True, 50 if bucketing else 1)
    batches = [sizes[b] for b in plan]
    epochs = max(steps / max(len(plan), 1), 1e-9)
    costs = plan_costs(batches, max_seq_length, epochs, dims)
    if not allow_packed:
        costs.pop("packed", None)
    name = min(costs, key=lambda k: costs[k][0])
    priced = ", ".join(f"{k} {v[0]:.1f} s/{v[1]} shapes" for k, v in costs.items())
    return ShapePolicy(name, rungs, row_length, chosen=f"{name} (auto on a GPU; predicted {priced})")


def epoch_stats(plan: BatchPlan, policy: ShapePolicy, calls: Callable[[Batch], list]) -> ShapeStats:
    """The call shapes and padding of a run's first epoch (``plan``), laid out by ``policy`` and cut
    into calls by ``calls`` (the trainer's micro-batching), as its steps will run them."""
    stats = ShapeStats()
    if not len(plan.dataset):
        return stats
    for b in plan.first_epoch():
        b = policy.apply(b)
        for rows, length in calls(b):
            stats.add(len(rows), length, call_filled(b, rows, length))
    return stats
