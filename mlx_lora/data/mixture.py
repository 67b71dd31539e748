"""Train/valid/test splits from any source, and the weighted mixture of several (``data.sources``).

Mixing: an epoch holds as many examples as all sources' training examples together, N. Source i of
weight w_i gets k_i = N * w_i / sum(w) of them (largest remainders, so the k_i add up to N). A source
with k_i <= n_i examples gives k_i of them drawn without replacement, a new draw each epoch; a larger
share repeats the whole source floor(k_i / n_i) times plus a draw of the remainder (sampling with
replacement, as evenly as it can be). The draw depends only on the seed, the epoch and the sources,
so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mlx_lora.config import DataConfig
from mlx_lora.data.batching import seed_seq
from mlx_lora.data.dataset import DataSplits, DataStats, TokenizedDataset
from mlx_lora.data.examples import load_rows_dataset, load_source
from mlx_lora.data.sources import is_datasets_source, is_hf_id, missing, open_source, parse_hf_id
from mlx_lora.plumbing.errors import DataError


def load_datasets(
    cfg: DataConfig,
    tokenizer,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    splits: Sequence[str] = ("train", "valid", "test"),
) -> DataSplits:
    """Load ``cfg.path``: a JSONL file (``valid_fraction`` of its rows held out for validation), a
    folder with train.jsonl and optional valid.jsonl, test.jsonl (without valid.jsonl the
    validation rows are carved out of train.jsonl the same way), a ``datasets`` folder or an
    ``hf:`` data set id (see :mod:`mlx_lora.data.sources`); or, with ``cfg.sources``, the mixture
    of several. The split depends only on the data and ``seed``."""
    unknown = set(splits) - {"train", "valid", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}")
    if cfg.sources:
        return load_mixture(cfg, tokenizer, seed=seed, cache_dir=cache_dir, splits=splits)
    return load_source(cfg, tokenizer, seed=seed, cache_dir=cache_dir, splits=splits)


def load_eval_split(cfg, tokenizer, *, cache_dir=None):
    """The examples ``mlx-lora eval`` scores in the data set ``cfg.path``: the split named with
    ``@split``, else its test split, else its validation split; a folder holding one Dataset is
    scored whole."""
    srcs = open_source(cfg.path, columns=cfg.columns, fmt=cfg.format)
    named = is_hf_id(cfg.path) and parse_hf_id(cfg.path).split is not None
    single = not is_hf_id(cfg.path) and srcs["train"].label == str(cfg.path)
    src = srcs["train"] if named or single else (srcs["test"] or srcs["valid"])
    if src is None:
        raise DataError("no test or validation split to evaluate on (name one with @split)", cfg.path)
    return load_rows_dataset(src, cfg, tokenizer, cache_dir=cache_dir)


def epoch_shares(sizes: list[int], weights: list[float]) -> list[int]:
    """Examples each source gives an epoch of sum(sizes) examples: proportional to ``weights``,
    rounded by largest remainders (ties to the earlier source) so they add up exactly."""
    total = int(sum(sizes))
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    shares = np.floor(exact).astype(np.int64)
    rest = total - int(shares.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[:rest]:
        shares[i] += 1
    return [int(s) for s in shares]


def epoch_sample(sizes: list[int], shares: list[int], seed: int, epoch: int) -> np.ndarray:
    """Indices into the sources' examples laid end to end: each source's share for ``epoch``
    (see the module docstring). A pure function of its arguments."""
    out, start = [], 0
    for i, (n, k) in enumerate(zip(sizes, shares)):
        rng = np.random.default_rng(seed_seq(seed, 5, epoch, i))
        whole, rest = divmod(k, n)
        picks = [np.arange(n)] * whole + [rng.choice(n, size=rest, replace=False)]
        out.append(start + np.concatenate(picks).astype(np.int64))
        start += n
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class SourcePart:
    """One source of a mixture as the banner reports it."""

    label: str
    weight: float
    share: int
    """Examples it gives each epoch."""
    train: Any
    """DataStats of its training examples."""
    valid: Any
    """DataStats of its validation examples, or None."""
    valid_how: str
    """Where its validation examples come from."""

    def line(self, max_seq_length: int) -> str:
        s = self.train
        n = max(s.examples, 1)
        how = f"{self.share / n:.2f}x" + (", repeated" if self.share > s.examples else "")
        cut = []
        if s.truncated:
            cut.append(f"{s.truncated} truncated to {max_seq_length} tokens")
        if s.skipped:
            cut.append(f"{s.skipped} skipped")
        valid = f"valid {self.valid.examples} ({self.valid_how})" if self.valid is not None else "no valid"
        return (
            f"{s.path} ({s.format}): {s.rows:,} rows -> {s.examples:,} examples"
            + (f" ({', '.join(cut)})" if cut else "")
            + f"; weight {self.weight:g} -> "
            f"{self.share:,}/epoch ({how}); {valid}"
        )


class MixedDataset(TokenizedDataset):
    """The training examples of several sources; :meth:`for_epoch` draws one epoch's sample
    (see the module docstring). ``examples`` holds every source's examples end to end."""

    def __init__(self, parts: list, reports: list[SourcePart]):
        examples = [e for p in parts for e in p.examples]
        lines = np.concatenate([p.lines for p in parts])
        stats = DataStats(
            path=f"{len(parts)} sources",
            format="mixed",
            rows=sum(p.stats.rows for p in parts),
            examples=len(examples),
            truncated=sum(p.stats.truncated for p in parts),
            skipped=sum(p.stats.skipped for p in parts),
            target_tokens=sum(p.stats.target_tokens for p in parts),
            total_tokens=sum(p.stats.total_tokens for p in parts),
        )
        super().__init__(examples, stats, lines)
        self.sizes = [len(p) for p in parts]
        self.shares = [r.share for r in reports]
        self.parts = reports
        self._memo: Optional[tuple] = None

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        return epoch_sample(self.sizes, self.shares, seed, epoch)

    def for_epoch(self, seed: int, epoch: int):
        """The examples of ``epoch``: a plain dataset of sum(sizes) examples."""
        if self._memo is None or self._memo[0] != (seed, epoch):
            idx = self.epoch_indices(seed, epoch)
            view = TokenizedDataset([self.examples[i] for i in idx], self.stats, self.lines[idx])
            self._memo = ((seed, epoch), view)
        return self._memo[1]

    def source_lines(self, max_seq_length: int) -> list[str]:
        return [f"source {i + 1}  {r.line(max_seq_length)}" for i, r in enumerate(self.parts)]


def _concat(sets: list, label: str):
    sets = [s for s in sets if s is not None and len(s)]
    if not sets:
        return None
    if len(sets) == 1:
        return sets[0]
    st = [s.stats for s in sets]
    stats = DataStats(
        path=label,
        format="mixed",
        rows=sum(s.rows for s in st),
        examples=sum(s.examples for s in st),
        truncated=sum(s.truncated for s in st),
        skipped=sum(s.skipped for s in st),
        target_tokens=sum(s.target_tokens for s in st),
        total_tokens=sum(s.total_tokens for s in st),
    )
    return TokenizedDataset([e for s in sets for e in s.examples], stats, np.concatenate([s.lines for s in sets]))


def load_mixture(cfg, tokenizer, *, seed: int, cache_dir=None, splits=("train", "valid", "test")):
    """``cfg.sources`` loaded one by one (each like ``data.path``, with its own columns, format
    and split; data.columns and data.format apply where an entry sets none) and mixed."""

    trains, valids, tests, reports = [], [], [], []
    for i, s in enumerate(cfg.sources):
        sub = replace(
            cfg,
            path=s["path"],
            sources=None,
            format=s.get("format") or cfg.format,
            columns=s.get("columns") or cfg.columns,
        )
        if not is_datasets_source(sub.path) and not Path(sub.path).expanduser().exists():
            raise DataError(missing(sub.path), sub.path, field=f"data.sources[{i}].path")
        got = load_source(sub, tokenizer, seed=seed, cache_dir=cache_dir, splits=splits, split=s.get("split"))
        trains.append(got.train)
        valids.append(got.valid)
        tests.append(got.test)
    if "train" in splits:
        weights = [float(s.get("weight", 1.0)) for s in cfg.sources]
        shares = epoch_shares([len(t) for t in trains], weights)
        for t, v, w, k in zip(trains, valids, weights, shares):
            how = "held out" if v is not None and v.stats.path == t.stats.path else "split"
            reports.append(SourcePart(t.stats.path, w, k, t.stats, v.stats if v is not None else None, how))
        train = MixedDataset(trains, reports)
    else:
        train = None
    n = len(cfg.sources)
    return DataSplits(train, _concat(valids, f"{n} sources"), _concat(tests, f"{n} sources"))
