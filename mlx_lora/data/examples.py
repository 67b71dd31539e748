"""Training data: JSONL rows -> tokenized examples with a target mask (batches: :mod:`mlx_lora.data.batching`).

An example is ``(tokens, mask)``: ``mask[i]`` is True when token ``i`` is a target, i.e. the loss
includes ``-log p(tokens[i] | tokens[:i])``. ``mask[0]`` is always False (nothing predicts the first
token). A batch row built from an example holds ``inputs = tokens[:-1]``, ``targets = tokens[1:]``
and ``loss_mask = mask[1:]``, so an example of ``n`` tokens fills ``n - 1`` positions.

Formats (detected per file from the first row's keys, or forced with ``data.format``; each is a
class in :mod:`mlx_lora.data.formats`):

==========  ======================================  ==========================================
format      keys                                    targets (``train_on: assistant``)
==========  ======================================  ==========================================
chat        messages: [{role, content}], tools?     every assistant turn, end-of-turn included
sharegpt    conversations: [{from, value}]          as chat (from: human/user/gpt/assistant/system)
completions prompt, completion                      completion + EOS
alpaca      instruction, input?, output             output + EOS, after the Alpaca prompt
text        text                                    every token
preference  prompt?, chosen, rejected               two examples (chosen, rejected), as above
==========  ======================================  ==========================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mlx_lora.config import DataConfig
from mlx_lora.data.batching import (
    BUCKET_BATCHES,
    PAD_MULTIPLE,
    Batch,
    BatchPosition,
    attention_mask_from_segments,
    epoch_plan,
    iterate_batches,
    length_groups,
    num_batches,
    pack,
    padded_length,
    seed_seq,
)
from mlx_lora.data.dataset import DataSplits, DataStats, TokenizedDataset
from mlx_lora.data.formats import (
    CHAT_ROLES,
    CUT_MARGIN,
    FORMATS,
    SHAREGPT_ROLES,
    Sample,
    detect_format,
    examples_per_row,
    file_samples,
    one_line,
    tname,
)
from mlx_lora.data.sources import is_datasets_source, map_jsonl_rows, missing, open_source
from mlx_lora.data.templates import ChatTemplate, resolve_chat_template
from mlx_lora.plumbing.cache import cache_root
from mlx_lora.plumbing.errors import DataError
from mlx_lora.plumbing.io import atomic_path

log = logging.getLogger(__name__)

# The data API in one place: the batching and format names are defined in their own modules.
__all__ = [
    "BUCKET_BATCHES",
    "CHAT_ROLES",
    "FORMATS",
    "PAD_MULTIPLE",
    "SHAREGPT_ROLES",
    "Batch",
    "BatchPosition",
    "DataSplits",
    "DataStats",
    "TokenizedDataset",
    "attention_mask_from_segments",
    "default_cache_dir",
    "detect_format",
    "epoch_plan",
    "iterate_batches",
    "length_groups",
    "load_jsonl_dataset",
    "load_rows_dataset",
    "load_source",
    "num_batches",
    "pack",
    "padded_length",
    "read_jsonl_rows",
    "split_rows",
]

_CACHE_VERSION = 1
_OK, _TRUNCATED, _SKIPPED = 0, 1, 2
_ENCODE_BLOCK = 512  # rows rendered and tokenized together (one batched tokenizer call)

# Work per row is bounded by what data.max_seq_length can use: a text longer than
# _CHARS_PER_TOKEN * (max_seq_length + _CUT_MARGIN) characters is cut (at a space where it can be)
# before it is tokenized. Tokenizers average 3-5 characters per token on prose and fewer on code or
# other scripts, so 16 leaves the cut several times max_seq_length tokens away; a text that still
# yields too few tokens (long runs of one character, say) is cut again with 4 times the characters,
# so the result never depends on this factor, only the work does. The last _CUT_MARGIN tokens of a
# cut text are not trusted: a word split by the cut may tokenize differently from the whole word.
_CHARS_PER_TOKEN = 16
_CUT_MARGIN = CUT_MARGIN

# ----------------------------------------------------------------------------------------------
# datasets


# ----------------------------------------------------------------------------------------------
# reading and checking rows


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(missing(str(path)).replace("file or folder", "file", 1), str(path))
    if not path.is_file():
        raise DataError("not a file", str(path))
    return path.read_bytes()


def _parse_rows(path: Path, data: bytes) -> list[tuple[int, dict]]:
    """(1-based line, JSON object) for every non-blank line."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    rows = []
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", str(path), line
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", str(path), line) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", str(path), line) from None
        except ValueError as e:  # an integer of more digits than Python converts (4300 by default)
            what = "a number with too many digits" if "digits" in str(e) else one_line(e)
            raise DataError(f"invalid JSON: {what}", str(path), line) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {tname(obj)}", str(path), line)
        rows.append((line, obj))
    if not rows:
        raise DataError("empty file: no JSON rows", str(path))
    return rows


def read_jsonl_rows(path) -> list[tuple[int, dict]]:
    """(1-based line, JSON object) of every non-blank line of a JSONL file, checked as training
    files are (UTF-8, valid JSON, one object per line)."""
    path = Path(path).expanduser()
    return _parse_rows(path, _read_bytes(path))


# ----------------------------------------------------------------------------------------------
# tokenizing and masking


def _int_or_none(v) -> Optional[int]:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


class _Encoder:
    """The tokenizer facts tokenization depends on, plus batched encoding."""

    def __init__(self, tokenizer, template: Optional[ChatTemplate]):
        self.tokenizer, self.template = tokenizer, template
        self.bos_id = _int_or_none(getattr(tokenizer, "bos_token_id", None))
        self.eos_id = _int_or_none(getattr(tokenizer, "eos_token_id", None))
        probe = list(tokenizer.encode("a", add_special_tokens=True))
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        # mlx-lm's TokenizerWrapper forwards attributes but not calls; batch through the HF tokenizer.
        inner = getattr(tokenizer, "_tokenizer", None) if type(tokenizer).__name__ == "TokenizerWrapper" else tokenizer
        self._batch = inner if callable(inner) and hasattr(inner, "convert_ids_to_tokens") else None
        self.size = self._size()  # ids the tokenizer produces are below this (None: it does not say)

    def _size(self) -> Optional[int]:
        for obj in (self.tokenizer, getattr(self.tokenizer, "_tokenizer", None)):
            try:
                return int(len(obj))
            except TypeError:
                continue
        return _int_or_none(getattr(self.tokenizer, "vocab_size", None))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._batch is not None:
            try:
                return [list(ids) for ids in self._batch(texts, add_special_tokens=False)["input_ids"]]
            except Exception:  # not an HF-style tokenizer after all; encode one text at a time
                self._batch = None
        return [list(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    def identity(self) -> dict:
        tok = self.tokenizer
        size = None
        for obj in (tok, getattr(tok, "_tokenizer", None)):
            try:
                size = len(obj)
                break
            except TypeError:
                continue
        probe = "Hello, world! <|im_start|>user\n  tabs\tand ünïcödé 12345<|im_end|></s><s>"
        ids = self.encode_many([probe])[0]
        return {
            "name": str(getattr(tok, "name_or_path", "")),
            "vocab_size": _int_or_none(getattr(tok, "vocab_size", None)),
            "len": size,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "adds_bos": self.adds_bos,
            "probe": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest(),
            "template": self.template.fingerprint if self.template is not None else None,
        }


def _why_no_target(sample: Sample, cfg: DataConfig, truncated: bool) -> tuple[Optional[str], str]:
    """(field, reason) for a row that kept no target token."""
    why = sample.no_target(cfg.train_on)
    if why is not None:
        return why
    if truncated:
        return None, f"its target tokens lie past data.max_seq_length={cfg.max_seq_length}"
    return None, "it has no target token"


@dataclass
class _FileData:
    """Everything tokenization produced for one file; what the cache stores."""

    path: str
    format: str
    lines: np.ndarray  # int64 [rows] source line of each row
    status: np.ndarray  # int8 [rows] _OK, _TRUNCATED or _SKIPPED
    tokens: np.ndarray  # int32 [total] examples concatenated
    mask: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [examples + 1]
    ex_rows: np.ndarray  # int64 [examples] row index of each example


def _tokenize_file(path: Path, data: bytes, cfg: DataConfig, enc: _Encoder) -> _FileData:

    return _tokenize_rows(str(path), map_jsonl_rows(_parse_rows(path, data), cfg.columns, str(path)), cfg, enc)


def _tokenize_rows(p: str, rows: list[tuple[int, dict]], cfg: DataConfig, enc: _Encoder) -> _FileData:
    fmt, samples = file_samples(p, rows, cfg.format)
    status = np.zeros(len(rows), dtype=np.int8)
    examples, ex_rows = [], []
    first_skip = None  # (line, field, why) of the first row dropped: says why when nothing is left
    max_len = cfg.max_seq_length
    budget = _CHARS_PER_TOKEN * (max_len + _CUT_MARGIN)
    for start in range(0, len(rows), _ENCODE_BLOCK):
        block = range(start, min(start + _ENCODE_BLOCK, len(rows)))
        texts, rows_texts = [], []
        for r in block:
            t, c, pre = samples[r].texts(enc, cfg.train_on, max_len, p, rows[r][0], budget)
            texts += t or []
            rows_texts.append((r, len(t or []), c, pre))
        ids = enc.encode_many(texts)
        at = 0
        for r, n, row_cut, pre in rows_texts:
            line, sample = rows[r][0], samples[r]
            row_ids, chars = (ids[at : at + n] if pre is None else pre), budget
            at += n
            while not sample.window_known(row_ids, row_cut, max_len):
                chars *= 4  # too few tokens before the cut (see _CHARS_PER_TOKEN): cut later
                t, row_cut, pre = sample.texts(enc, cfg.train_on, max_len, p, line, chars)
                row_ids = enc.encode_many(t) if pre is None else pre
            made = sample.examples(row_ids, enc, cfg.train_on, p, line, row_cut)  # a preference pair: 2
            longest = max(len(t) for t, _ in made)
            if longest > max_len:
                # A cut row's length is known only to exceed max_seq_length.
                size = f"is {longest} tokens, longer than" if not any(row_cut) else "is longer than"
                if cfg.overlong == "error":
                    raise DataError(
                        f"example {size} data.max_seq_length={max_len} "
                        "(data.overlong is error; truncate or skip would keep going)",
                        p,
                        line,
                    )
                if cfg.overlong == "skip":
                    status[r] = _SKIPPED
                    first_skip = first_skip or (line, None, f"it {size} data.max_seq_length and data.overlong is skip")
                    continue
                made = [(t[:max_len], m[:max_len]) for t, m in made]
                status[r] = _TRUNCATED
            if not all(m.any() for _, m in made):
                first_skip = first_skip or (line, *_why_no_target(sample, cfg, status[r] == _TRUNCATED))
                status[r] = _SKIPPED
                continue
            examples += made
            ex_rows += [r] * len(made)
    if not examples:
        line, field, why = first_skip
        raise DataError(
            f"nothing to learn: none of the {len(rows)} rows has a target token after masking and "
            f"truncation (data.train_on: {cfg.train_on}, data.max_seq_length: {cfg.max_seq_length}); "
            f"the first, line {line}: {why}",
            p,
            line,
            field,
        )
    lengths = np.array([len(t) for t, _ in examples], dtype=np.int64)
    return _FileData(
        path=p,
        format=fmt,
        lines=np.array([line for line, _ in rows], dtype=np.int64),
        status=status,
        tokens=np.concatenate([t for t, _ in examples]),
        mask=np.concatenate([m for _, m in examples]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        ex_rows=np.array(ex_rows, dtype=np.int64),
    )


def _dataset(fd: _FileData, rows: Optional[np.ndarray] = None) -> TokenizedDataset:
    """The examples of ``fd`` whose rows are selected (bool [rows]; all when None)."""
    sel = np.ones(len(fd.lines), dtype=bool) if rows is None else rows
    keep = np.flatnonzero(sel[fd.ex_rows])
    o = fd.offsets
    examples = [(fd.tokens[o[i] : o[i + 1]], fd.mask[o[i] : o[i + 1]]) for i in keep]
    stats = DataStats(
        path=fd.path,
        format=fd.format,
        rows=int(sel.sum()),
        examples=len(examples),
        truncated=int(((fd.status == _TRUNCATED) & sel).sum()),
        skipped=int(((fd.status == _SKIPPED) & sel).sum()),
        target_tokens=int(sum(int(m.sum()) for _, m in examples)),
        total_tokens=int(sum(len(t) for t, _ in examples)),
    )
    return TokenizedDataset(examples, stats, fd.lines[fd.ex_rows[keep]], examples_per_row(fd.format))


# ----------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    """$MLX_LORA_CACHE/data when set, else ~/.cache/mlx-lora/data."""

    return cache_root() / "data"


def _cache_path(cache_dir: Path, path: Path, file_sha: str, cfg: DataConfig, enc: _Encoder) -> Path:
    key = {
        "version": _CACHE_VERSION,
        "file": file_sha,
        "tokenizer": enc.identity(),
        "data": {k: getattr(cfg, k) for k in ("format", "max_seq_length", "train_on", "chat_template", "overlong")},
    }
    if cfg.columns:  # only when set, so the keys of existing caches stay what they were
        key["columns"] = cfg.columns
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{path.stem}-{digest[:40]}.npz"


def _write_cache(cpath: Path, fd: _FileData) -> None:
    try:
        with atomic_path(cpath) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(fd.format),
                lines=fd.lines,
                status=fd.status,
                tokens=fd.tokens,
                mask=fd.mask,
                offsets=fd.offsets,
                ex_rows=fd.ex_rows,
            )
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("could not write the data cache %s: %s", cpath, e)


def _cache_problem(z, n_lines: int, vocab: Optional[int], max_len: int) -> Optional[str]:
    """What makes the arrays of a cache file unusable, or None. Training indexes the embedding
    with these ids and slices batches by these offsets, so anything out of range or out of shape
    would crash it (or silently train on garbage) instead of failing here."""
    ints = ("lines", "status", "tokens", "offsets", "ex_rows")
    for name in ints + ("mask",):
        a = z[name]
        if a.ndim != 1 or a.dtype.kind not in ("b" if name == "mask" else "iu"):
            return f"'{name}' is not a vector of {'booleans' if name == 'mask' else 'integers'}"
    if z["format"].ndim != 0 or str(z["format"]) not in FORMATS:
        return "unknown format"
    lines, status, tokens, offsets, ex_rows, mask = (z[n] for n in (*ints, "mask"))
    k, per = len(ex_rows), examples_per_row(str(z["format"]))
    if k % per or bool(np.any(ex_rows.reshape(-1, per) != ex_rows[::per, None])):
        return "a row's examples do not come together"
    if not (len(status) == len(lines) and 0 < k <= per * len(lines) and len(offsets) == k + 1):
        return "arrays of inconsistent lengths"
    if not (offsets[0] == 0 and offsets[-1] == len(tokens) == len(mask)):
        return "offsets do not match the tokens"
    lengths = np.diff(offsets)
    if not bool(np.all((lengths >= 2) & (lengths <= max_len))):
        return f"an example shorter than 2 or longer than {max_len} tokens"
    if len(tokens) and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        return f"token ids outside the vocabulary (0..{vocab - 1 if vocab is not None else 'n'})"
    if not (int(lines[0]) >= 1 and int(lines[-1]) <= n_lines and bool(np.all(np.diff(lines) > 0))):
        return "source lines out of order or past the end of the file"
    if not bool(np.all((status >= 0) & (status <= _SKIPPED))):
        return "unknown row status"
    if not (int(ex_rows[0]) >= 0 and int(ex_rows[-1]) < len(lines) and bool(np.all(np.diff(ex_rows[::per]) > 0))):
        return "example rows out of order or out of range"
    if k != per * int(np.sum(status != _SKIPPED)) or bool(np.any(status[ex_rows] == _SKIPPED)):
        return "examples do not match the rows kept"
    if bool(np.any(mask[offsets[:-1]])) or not bool(np.all(np.logical_or.reduceat(mask, offsets[:-1]))):
        return "an example with a target on its first token or with no target"
    return None


def _read_cache(cpath: Path, path: Path, n_lines: int, vocab: Optional[int], max_len: int) -> Optional[_FileData]:
    if not cpath.is_file():
        return None
    try:
        with np.load(cpath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("format", "lines", "status", "tokens", "mask", "offsets", "ex_rows")}
        reason = _cache_problem(arrays, n_lines, vocab, max_len)
        if reason is None:
            return _FileData(
                path=str(path),
                format=str(arrays["format"]),
                lines=arrays["lines"].astype(np.int64),
                status=arrays["status"].astype(np.int8),
                tokens=arrays["tokens"].astype(np.int32),
                mask=arrays["mask"].astype(bool),
                offsets=arrays["offsets"].astype(np.int64),
                ex_rows=arrays["ex_rows"].astype(np.int64),
            )
    except Exception as e:  # any unreadable cache file is rebuilt, never an error
        reason = f"{type(e).__name__}: {one_line(e)}"
    log.warning("ignoring corrupt data cache %s (%s); rebuilding it", cpath, reason)
    return None


# ----------------------------------------------------------------------------------------------
# loading


def _load_file(path: Path, cfg: DataConfig, enc: _Encoder, cache_dir: Optional[Path]) -> _FileData:
    data = _read_bytes(path)
    if cache_dir is None:
        return _tokenize_file(path, data, cfg, enc)
    cpath = _cache_path(cache_dir, path, hashlib.sha256(data).hexdigest(), cfg, enc)
    fd = _read_cache(cpath, path, data.count(b"\n") + 1, enc.size, cfg.max_seq_length)
    if fd is None:
        fd = _tokenize_file(path, data, cfg, enc)
        _write_cache(cpath, fd)
    return fd


def _load_rows(src, cfg: DataConfig, enc: _Encoder, cache_dir: Optional[Path]) -> _FileData:
    """:func:`_load_file` for one split of a ``datasets`` data set (a
    :class:`~mlx_lora.data.sources.RowSource`); errors name its label and row index."""

    cfg = replace(cfg, format=src.fmt, columns=src.columns)
    try:
        if cache_dir is None:
            return _tokenize_rows(src.label, src.rows(), cfg, enc)
        cpath = _cache_path(cache_dir, Path(re.sub(r"[^A-Za-z0-9._-]", "_", src.label)), src.fingerprint(), cfg, enc)
        fd = _read_cache(cpath, Path(src.label), len(src), enc.size, cfg.max_seq_length)
        if fd is None:
            fd = _tokenize_rows(src.label, src.rows(), cfg, enc)
            _write_cache(cpath, fd)
        fd.path = src.label
        return fd
    except DataError as e:
        raise src.relabel(e) from None


def _encoder(cfg: DataConfig, tokenizer) -> _Encoder:
    return _Encoder(tokenizer, resolve_chat_template(cfg.chat_template, tokenizer))


def load_jsonl_dataset(path, cfg: DataConfig, tokenizer, *, cache_dir: Optional[Path] = None) -> TokenizedDataset:
    """Tokenize one JSONL file as a whole (no split). Uses the cache when ``cfg.cache``."""
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cfg.cache else None
    return _dataset(_load_file(Path(path).expanduser(), cfg, _encoder(cfg, tokenizer), cache))


def load_rows_dataset(src, cfg: DataConfig, tokenizer, *, cache_dir: Optional[Path] = None) -> TokenizedDataset:
    """Tokenize one split of a ``datasets`` data set (a :class:`~mlx_lora.data.sources.RowSource`)
    as a whole (no split). Uses the cache when ``cfg.cache``."""
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cfg.cache else None
    return _dataset(_load_rows(src, cfg, _encoder(cfg, tokenizer), cache))


def split_rows(n_rows: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Bool [n_rows], True for the rows held out for validation: round(valid_fraction * n_rows)
    of them, at least 1 when n_rows >= 2 and valid_fraction > 0, never all; chosen by ``seed``."""
    valid = np.zeros(n_rows, dtype=bool)
    if n_rows < 2 or valid_fraction <= 0:
        return valid
    k = min(max(1, round(valid_fraction * n_rows)), n_rows - 1)
    valid[np.random.default_rng(seed_seq(seed, 1)).permutation(n_rows)[:k]] = True
    return valid


def load_source(
    cfg: DataConfig,
    tokenizer,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    splits: Sequence[str] = ("train", "valid", "test"),
    split: Optional[str] = None,
) -> DataSplits:
    """:func:`load_datasets` of the one source ``cfg.path`` (``split``: a data set's training split)."""
    if not cfg.path:
        raise DataError("data.path is not set (a JSONL file or a folder with train.jsonl)")
    enc = _encoder(cfg, tokenizer)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cfg.cache else None
    if is_datasets_source(cfg.path):
        srcs = open_source(cfg.path, split=split, columns=cfg.columns, fmt=cfg.format)
        train_file, valid_file, test_file = srcs["train"], srcs["valid"], srcs["test"]
        label = train_file.label
        has_valid_file, has_test_file = valid_file is not None, test_file is not None

        def load(src):
            return _load_rows(src, cfg, enc, cache)
    else:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise DataError(missing(cfg.path), str(root), field="data.path")
        if split is not None:
            raise DataError(f"split {split!r} given, but this is JSONL, not a data set with splits", str(root))
        if root.is_dir():
            train_file = root / "train.jsonl"
            if not train_file.is_file():
                raise DataError(
                    "folder has no train.jsonl (expected train.jsonl, optional valid.jsonl and "
                    "test.jsonl, or a folder saved with datasets' save_to_disk)",
                    str(root),
                )
            valid_file, test_file = root / "valid.jsonl", root / "test.jsonl"
        else:
            train_file, valid_file, test_file = root, None, None
        label = str(train_file)
        has_valid_file = valid_file is not None and valid_file.is_file()
        has_test_file = test_file is not None and test_file.is_file()

        def load(path):
            return _load_file(path, cfg, enc, cache)

    train = valid = test = None
    if "train" in splits or ("valid" in splits and not has_valid_file):
        fd = load(train_file)
        held_out = (
            np.zeros(len(fd.lines), bool) if has_valid_file else split_rows(len(fd.lines), cfg.valid_fraction, seed)
        )
        if "train" in splits:
            train = _dataset(fd, ~held_out)
            if len(train) == 0:
                raise DataError(
                    f"nothing to learn: every row left for training after holding out {int(held_out.sum())} "
                    "for validation was skipped (see data.max_seq_length, data.train_on)",
                    label,
                )
        if "valid" in splits and held_out.any():
            valid = _dataset(fd, held_out)
            if len(valid) == 0:
                log.warning("%s: all %d validation rows were skipped; no validation split", label, valid.stats.rows)
                valid = None
    if "valid" in splits and has_valid_file:
        valid = _dataset(load(valid_file))
    if "test" in splits and has_test_file:
        test = _dataset(load(test_file))
    return DataSplits(train, valid, test)
