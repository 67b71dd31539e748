"""The containers of tokenized data: one split's examples and statistics, and the three splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class DataStats:
    """What became of one file (or split): rows read, examples kept, and why the rest were not."""

    path: str
    format: str
    rows: int
    examples: int
    truncated: int
    """Examples cut to data.max_seq_length (kept)."""
    skipped: int
    """Rows dropped: too long with data.overlong: skip, or no target token left."""
    target_tokens: int
    total_tokens: int

    def summary(self) -> str:
        return (
            f"{self.path} ({self.format}): {self.rows} rows -> {self.examples} examples, "
            f"{self.truncated} truncated, {self.skipped} skipped, "
            f"{self.target_tokens:,} target of {self.total_tokens:,} tokens"
        )


@dataclass
class TokenizedDataset:
    examples: list[tuple[np.ndarray, np.ndarray]]
    """(token ids int32 [n], target mask bool [n]) per example."""
    stats: DataStats
    lines: Optional[np.ndarray] = None
    """1-based source line of each example."""
    per_item: int = 1
    """Consecutive examples that travel together through batching: 2 for preference pairs
    (chosen, rejected), 1 otherwise."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t, _ in self.examples), dtype=np.int64, count=len(self.examples))


@dataclass
class DataSplits:
    train: Optional[TokenizedDataset]
    """None only when "train" was not among the requested splits."""
    valid: Optional[TokenizedDataset]
    test: Optional[TokenizedDataset]
