"""Batches: tokenized examples -> padded (or packed) rows of inputs, targets and loss mask, in an
order that depends only on the seed and the epoch, so a saved position replays exactly.

A batch row built from an example ``(tokens, mask)`` holds ``inputs = tokens[:-1]``,
``targets = tokens[1:]`` and ``loss_mask = mask[1:]``, so an example of ``n`` tokens fills ``n - 1``
positions.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from mlx_lora.data.dataset import TokenizedDataset

PAD_MULTIPLE = 32
"""Batches are padded to a multiple of this many positions, so compiled steps see few shapes."""
BUCKET_BATCHES = 50
"""Global batches per length-sorted chunk: larger chunks pad less but make batches less random."""


def seed_seq(seed: int, *tags: int) -> np.random.SeedSequence:
    """The random stream of ``seed`` for one purpose (``tags``: which draw, which epoch)."""
    return np.random.SeedSequence([int(seed) % 2**64, *tags])


@dataclass
class Batch:
    inputs: np.ndarray
    """[B, L] int32: tokens[:-1] of each row, right-padded with 0."""
    targets: np.ndarray
    """[B, L] int32: tokens[1:]."""
    loss_mask: np.ndarray
    """[B, L] float32: 1.0 where targets[b, t] is a target token; 0.0 on padding."""
    segments: Optional[np.ndarray] = None
    """[B, L] int32 when packed: 1..k = which example of the row, 0 = padding; None otherwise."""
    lengths: Optional[np.ndarray] = None
    """[B] int: positions each row fills (the rest is padding); None when not known."""
    items: Optional[np.ndarray] = None
    """[B] int: the dataset example of each row (unpacked batches), None when packed."""
    per_item: int = 1
    """Consecutive rows that form one item and are never split: 2 for preference pairs
    (rows 2i and 2i+1 are pair i's chosen and rejected), 1 otherwise."""

    @property
    def ntokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(frozen=True)
class BatchPosition:
    """Where a run is in its data: ``index`` is the next global batch of ``epoch``."""

    epoch: int = 0
    index: int = 0


def pack(sizes: np.ndarray, capacity: int, order: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Best-fit decreasing: place items longest first (ties in ``order``) into the fullest row
    that still has room, opening a new row when none has. Returns the item indices of each row."""
    order = np.arange(len(sizes)) if order is None else order
    order = order[np.argsort(-sizes[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) sorted, so bisect finds the best fit
    for i in order:
        s = int(sizes[i])
        if s > capacity:
            raise ValueError(f"item of size {s} exceeds the row capacity {capacity}")
        j = bisect.bisect_left(free, (s, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room - s > 0:
            bisect.insort(free, (room - s, r))
    return [np.array(r, dtype=np.int64) for r in rows]


def epoch_plan(
    sizes: np.ndarray,
    global_batch: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    bucket_batches: int = BUCKET_BATCHES,
) -> list[np.ndarray]:
    """Global batches (item indices) of one epoch, by length bucketing.

    Shuffle the items, top them up to a whole number of batches with the first items of that order
    (so every batch is full and every item is seen each epoch), cut into chunks of ``bucket_batches``
    batches, sort each chunk by size, cut it into batches, and shuffle the batch order. Without
    ``shuffle`` the items keep their order and only the within-chunk sort applies. With
    ``bucket_batches=1`` every batch is a random draw (no length bucketing)."""
    n = len(sizes)
    rng = np.random.default_rng(seed_seq(seed, 2, epoch))
    order = rng.permutation(n) if shuffle else np.arange(n)
    nb = -(-n // global_batch)
    order = np.concatenate([order, order[np.arange(nb * global_batch - n) % n]])
    batches = []
    step = max(1, bucket_batches) * global_batch
    for s in range(0, len(order), step):
        chunk = order[s : s + step]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def unit_sizes(ds: TokenizedDataset) -> np.ndarray:
    """Positions each item of ``ds`` fills: an example's, or the longer of a preference pair's
    two (the unit batching draws, see :attr:`TokenizedDataset.per_item`)."""
    sizes = ds.lengths - 1
    return sizes if ds.per_item == 1 else sizes.reshape(-1, ds.per_item).max(axis=1)


def num_batches(
    ds: TokenizedDataset, batch_size: int, *, max_seq_length: int, packing: bool = False, world_size: int = 1
) -> int:
    """Global batches per epoch of :func:`iterate_batches`, without building them: ceil(items /
    (batch_size * world_size)), items being examples (preference pairs), or packed rows
    (best-fit decreasing decides by sizes alone, so every epoch packs into the same number of rows)."""
    sizes = unit_sizes(ds)
    items = len(pack(sizes, max_seq_length)) if packing else len(sizes)
    return -(-items // (batch_size * world_size))


def _make_batch(ds: TokenizedDataset, rows: list[np.ndarray], length: int, packed: bool, per_item: int = 1) -> Batch:
    B = len(rows)
    inputs = np.zeros((B, length), np.int32)
    targets = np.zeros((B, length), np.int32)
    loss = np.zeros((B, length), np.float32)
    segments = np.zeros((B, length), np.int32) if packed else None
    lengths = np.zeros(B, np.int64)
    for b, members in enumerate(rows):
        at = 0
        for k, e in enumerate(members):
            tokens, mask = ds.examples[e]
            n = len(tokens) - 1
            inputs[b, at : at + n] = tokens[:-1]
            targets[b, at : at + n] = tokens[1:]
            loss[b, at : at + n] = mask[1:]
            if packed:
                segments[b, at : at + n] = k + 1
            at += n
        lengths[b] = at
    items = None if packed else np.array([int(m[0]) for m in rows], dtype=np.int64)
    return Batch(inputs, targets, loss, segments, lengths, items, per_item)


def padded_length(n, pad_multiple: int, cap: Optional[int] = None):
    """``n`` positions (an int or an array) rounded up to a multiple of ``pad_multiple``, at most ``cap``."""
    padded = -(-n // pad_multiple) * pad_multiple
    return padded if cap is None else np.minimum(padded, cap)


def iterate_batches(
    ds: TokenizedDataset,
    batch_size: int,
    *,
    max_seq_length: int,
    seed: int,
    shuffle: bool = True,
    packing: bool = False,
    start: BatchPosition = BatchPosition(),
    loop: bool = True,
    rank: int = 0,
    world_size: int = 1,
    pad_multiple: int = PAD_MULTIPLE,
    bucketing: bool = False,
) -> Iterator[tuple[Batch, BatchPosition]]:
    """Yield ``(batch for this rank, position after it)``.

    A global batch has ``batch_size * world_size`` rows; rank r gets rows
    ``[r * batch_size, (r + 1) * batch_size)``. The order depends only on ``(seed, epoch)``, so
    starting from a saved position replays exactly the remaining batches. Each batch is padded to
    a multiple of ``pad_multiple`` positions (capped at ``max_seq_length``) so compiled steps see
    few shapes. With ``packing``, examples are packed (best-fit decreasing, per epoch) into rows of
    at most ``max_seq_length`` positions and ``segments`` tells them apart. ``loop=False`` stops at
    the end of ``start.epoch``. ``bucketing=False`` draws batches without regard to length. A
    dataset with ``for_epoch(seed, epoch)`` (a mixture of sources) gives each epoch's examples.

    A dataset of preference pairs (``ds.per_item == 2``) is batched by pairs: ``batch_size``
    counts pairs, and each pair gives two consecutive rows (chosen, rejected) of the batch, so a
    pair is never split across batches or ranks. Pairs cannot be packed."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or pad_multiple < 1:
        raise ValueError(f"bad batching arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
    if len(ds) == 0:
        raise ValueError(f"no examples to batch in {ds.stats.path}")
    if packing and ds.per_item > 1:
        raise ValueError("preference pairs cannot be packed")
    pool = ds
    sizes = unit_sizes(pool)  # positions each example (pair) fills
    if sizes.max() > max_seq_length:
        raise ValueError(
            f"an example of {sizes.max() + 1} tokens exceeds max_seq_length={max_seq_length}; "
            "tokenize with the same data.max_seq_length"
        )
    global_batch = batch_size * world_size
    epoch, index = start.epoch, start.index
    while True:
        if hasattr(pool, "for_epoch"):  # a mixture of sources: this epoch's sample (data_sources)
            ds = pool.for_epoch(seed, epoch)
            sizes = unit_sizes(ds)
        if packing:
            members = pack(
                sizes, max_seq_length, np.random.default_rng(seed_seq(seed, 3, epoch)).permutation(len(sizes))
            )
            item_sizes = np.array([sizes[m].sum() for m in members], dtype=np.int64)
        else:
            members, item_sizes = None, sizes
        plan = epoch_plan(item_sizes, global_batch, seed, epoch, shuffle, BUCKET_BATCHES if bucketing else 1)
        for i in range(index, len(plan)):
            items = plan[i][rank * batch_size : (rank + 1) * batch_size]
            g = ds.per_item
            rows = [members[j] for j in items] if packing else [[g * j + k] for j in items for k in range(g)]
            longest = int(item_sizes[items].max())
            length = int(padded_length(longest, pad_multiple, max_seq_length))
            after = BatchPosition(epoch, i + 1) if i + 1 < len(plan) else BatchPosition(epoch + 1, 0)
            yield _make_batch(ds, rows, length, packing, g), after
        if not loop:
            return
        epoch, index = epoch + 1, 0


def length_groups(
    lengths: np.ndarray,
    max_rows: int,
    *,
    pad_multiple: int = PAD_MULTIPLE,
    cap: Optional[int] = None,
    overhead: int = 0,
) -> list[tuple[np.ndarray, int]]:
    """Split one batch's rows into groups of similar length, each padded only to its own longest
    row: ``[(row indices, padded length), ...]``, at most ``max_rows`` rows per group.

    Their gradients summed give the step of the whole batch (the loss is a sum over target
    tokens), so this changes how much padding is computed, not what is learned. The split
    minimises ``sum(rows * padded length + overhead)`` over groups of consecutive rows in length
    order (exact, by dynamic programming); ``overhead`` is the fixed cost of one more call, in
    positions (a GPU wants large groups, a CPU barely minds small ones). Lengths are rounded up to
    a multiple of ``pad_multiple`` (capped at ``cap``) so compiled steps see few shapes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    padded = padded_length(np.maximum(lengths[order], 1), pad_multiple, cap)
    best = [0] + [None] * n  # best[j]: cost of the first j rows (in length order)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            c = best[i] + (j - i) * int(padded[j - 1]) + overhead
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        groups.append((order[i:j], int(padded[j - 1])))
        j = i
    return groups[::-1]


def attention_mask_from_segments(segments: np.ndarray) -> np.ndarray:
    """[B, 1, L, L] bool: query t may attend key s when s <= t and both are in the same example
    (segment > 0). A padding query attends only to itself: an all-False row would make softmax
    produce NaN, which the value matmul (0 * NaN) would spread into real positions."""
    seg = np.asarray(segments)
    L = seg.shape[-1]
    causal = np.tril(np.ones((L, L), dtype=bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    mask = causal[None] & same
    pad = seg == 0
    mask |= np.eye(L, dtype=bool)[None] & pad[:, :, None]
    return mask[:, None]


@dataclass(frozen=True)
class BatchPlan:
    """How one split is cut into batches for a run, built once from the config (and this rank's
    place in a data-parallel world) and used by everything that walks the data: the training loop,
    evaluation, preference precomputation, the shape policy, the dry-run estimate and the memory
    trace. ``batch_size`` is rows per rank per step (a training plan's is ``batch_size *
    grad_accum``: one optimizer step's rows, which the trainer splits into micro-batches)."""

    dataset: TokenizedDataset
    batch_size: int
    max_seq_length: int
    seed: int
    shuffle: bool = True
    packing: bool = False
    bucketing: bool = False
    rank: int = 0
    world_size: int = 1

    @classmethod
    def for_training(cls, cfg, dataset: TokenizedDataset, rank: int = 0, world_size: int = 1) -> "BatchPlan":
        """The training order of ``cfg`` (a :class:`~mlx_lora.config.Config`): shuffled per epoch by
        the run's seed, packed and length-bucketed as the config says."""
        t, d = cfg.train, cfg.data
        return cls(
            dataset,
            t.batch_size * t.grad_accum,
            d.max_seq_length,
            t.seed,
            shuffle=True,
            packing=d.packing,
            bucketing=d.length_bucketing,
            rank=rank,
            world_size=world_size,
        )

    @classmethod
    def for_evaluation(cls, cfg, dataset: TokenizedDataset, rank: int = 0, world_size: int = 1) -> "BatchPlan":
        """Every example once, in order (``cfg.train.batch_size`` rows per rank)."""
        return cls(
            dataset,
            cfg.train.batch_size,
            cfg.data.max_seq_length,
            cfg.train.seed,
            shuffle=False,
            packing=cfg.data.packing,
            rank=rank,
            world_size=world_size,
        )

    def batches(
        self, *, start: BatchPosition = BatchPosition(), loop: bool = True
    ) -> Iterator[tuple[Batch, BatchPosition]]:
        """:func:`iterate_batches` of this plan from ``start`` (``loop=False``: to the end of its epoch)."""
        return iterate_batches(
            self.dataset,
            self.batch_size,
            max_seq_length=self.max_seq_length,
            seed=self.seed,
            shuffle=self.shuffle,
            packing=self.packing,
            start=start,
            loop=loop,
            rank=self.rank,
            world_size=self.world_size,
            bucketing=self.bucketing,
        )

    def first_epoch(self) -> Iterator[Batch]:
        """The batches of the first epoch, in the order the run sees them."""
        return (b for b, _ in self.batches(loop=False))

    def steps_per_epoch(self) -> int:
        return num_batches(
            self.dataset,
            self.batch_size,
            max_seq_length=self.max_seq_length,
            packing=self.packing,
            world_size=self.world_size,
        )
