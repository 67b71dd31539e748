"""Where training rows come from besides JSONL: Hugging Face data sets, column mapping, mixing.

A data path (``data.path``, ``--data`` or one entry of ``data.sources``) is one of

- ``hf:org/name[:config][@split]``: a data set on the Hugging Face hub, loaded with ``datasets``
  into its own cache (``HF_DATASETS_CACHE``); offline mode (``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE``) uses the cached copy or says what to do;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose
  ``train``/``validation``/``test`` splits are our train/valid/test);
- a JSONL file or a folder of JSONL files (read by :mod:`mlx_lora.data.examples`, unchanged).

Rows of a data set are numbered from 0 (``hf:org/name@train row 12``), and go through the same
format detection, validation, templates, truncation and token cache as JSONL rows; the cache is
keyed by the data set's fingerprint and files. ``data.columns`` ({our field: their column}) renames
a source's columns onto a format's fields; :data:`PRESETS` does it for the data sets the recipes
name, so ``hf:tatsu-lab/alpaca`` needs no options.

Mixing (``data.sources``): an epoch holds as many examples as all sources' training examples
together, N. Source i of weight w_i gets k_i = N * w_i / sum(w) of them (largest remainders, so
the k_i add up to N). A source with k_i <= n_i examples gives k_i of them drawn without replacement,
a new draw each epoch; a larger share repeats the whole source floor(k_i / n_i) times plus a draw
of the remainder (sampling with replacement, as evenly as it can be). The draw depends only on the
seed, the epoch and the sources, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlx_lora.data.formats import BY_NAME, REGISTRY, one_line
from mlx_lora.plumbing import hub
from mlx_lora.plumbing.errors import DataError, show

HF_PREFIX = "hf:"
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
"""A data set's split names and the split of ours each becomes."""
SOURCE_KEYS = ("path", "weight", "columns", "format", "split")
"""The keys of one ``data.sources`` entry."""
ROW_FIELDS = ("answer", "tests")
"""Fields besides the formats' that rows carry: GRPO's rewards and pass@1 read them."""


def format_fields() -> tuple[str, ...]:
    """Every field some data format reads: what ``data.columns`` may map onto (derived from the
    format classes, so a new format's fields are mappable as soon as it is registered)."""
    seen: dict[str, None] = {}
    for f in REGISTRY:
        for k in (*f.keys, *f.reads):
            seen.setdefault(k, None)
    for k in ROW_FIELDS:
        seen.setdefault(k, None)
    return tuple(seen)


@dataclass(frozen=True)
class Preset:
    """What a known data set needs: its format, column mapping, config and split names."""

    format: str = "auto"
    columns: Optional[dict] = None
    config: Optional[str] = None
    train: str = "train"
    valid: Optional[str] = None
    """Its validation split when it is not named validation/valid (None: use those, if any)."""
    test: Optional[str] = None


PRESETS: dict[str, Preset] = {
    "tatsu-lab/alpaca": Preset(format="alpaca"),
    "yahma/alpaca-cleaned": Preset(format="alpaca"),
    "sahil2801/CodeAlpaca-20k": Preset(format="alpaca"),
    "databricks/databricks-dolly-15k": Preset(format="alpaca", columns={"input": "context", "output": "response"}),
    "HuggingFaceH4/ultrachat_200k": Preset(format="chat", train="train_sft", valid="test_sft"),
    "HuggingFaceH4/no_robots": Preset(format="chat"),
    "FiscalNote/billsum": Preset(format="completions", columns={"prompt": "text", "completion": "summary"}),
    "abisee/cnn_dailymail": Preset(
        format="completions", config="3.0.0", columns={"prompt": "article", "completion": "highlights"}
    ),
    "Salesforce/wikitext": Preset(format="text", config="wikitext-103-raw-v1"),
}
"""The data sets the recipes name (``recipes/*.yaml``, ``recipes/prepare_data.py``)."""


# ----------------------------------------------------------------------------------------------
# naming a source


@dataclass(frozen=True)
class HubId:
    name: str
    config: Optional[str] = None
    split: Optional[str] = None

    def __str__(self) -> str:
        return (
            HF_PREFIX
            + self.name
            + (f":{self.config}" if self.config else "")
            + (f"@{self.split}" if self.split else "")
        )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_hf_id(spec: str) -> HubId:
    """``hf:org/name[:config][@split]`` -> HubId; DataError naming what is malformed."""
    if not spec.startswith(HF_PREFIX):
        raise DataError(f"not a hub data set id (expected {HF_PREFIX}org/name[:config][@split])", spec)
    rest = spec[len(HF_PREFIX) :]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    what = "expected hf:org/name[:config][@split]"
    if not _NAME.match(name) or ".." in name:
        raise DataError(f"bad data set name {name!r} ({what})", spec)
    if ":" in config or (not config and ":" in rest):
        raise DataError(f"bad config {config!r} ({what})", spec)
    if config and not _PART.match(config):
        raise DataError(f"bad config {config!r} ({what})", spec)
    if "@" in spec and not _PART.match(split):
        raise DataError(f"bad split {split!r} ({what})", spec)
    return HubId(name, config or None, split or None)


def is_hf_id(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def is_datasets_folder(path: Path) -> bool:
    """A folder written by ``save_to_disk``: a DatasetDict (dataset_dict.json) or a Dataset (state.json)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_datasets_source(path: Any) -> bool:
    return is_hf_id(path) or (isinstance(path, str) and is_datasets_folder(Path(path).expanduser()))


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing(path: str) -> str:
    """What to say of a data path that does not exist: for an ``org/name`` that could be a hub
    data set, how to name one."""
    if _HUB_NAME.match(str(path)):
        return f"no such file or folder; for the Hugging Face data set, write {HF_PREFIX}{path}"
    return "no such file or folder"


def check_exists(path: str, field: str = "data.path") -> None:
    """Fail fast (before the model loads) on a local path that does not exist or an hf: id that
    cannot be one; a hub data set itself is checked when it loads."""
    if is_hf_id(path):
        parse_hf_id(path)
    elif not Path(path).expanduser().exists():
        raise DataError(missing(path), path, field=field)


# ----------------------------------------------------------------------------------------------
# rows of a data set


@dataclass
class RowSource:
    """One split of a ``datasets`` data set, read as rows like a JSONL file's."""

    label: str
    """How messages name it: ``hf:org/name@train`` or ``folder[train]``."""
    dataset: Any
    """The ``datasets.Dataset``."""
    columns: Optional[dict]
    fmt: str

    def __len__(self) -> int:
        return int(self.dataset.num_rows)

    def fingerprint(self) -> str:
        """What the token cache is keyed by: the data set's fingerprint, its files (name, size,
        modification time), its length, columns and the mapping."""
        files = []
        for f in getattr(self.dataset, "cache_files", None) or []:
            name = f.get("filename") if isinstance(f, dict) else None
            if name and os.path.exists(name):
                st = os.stat(name)
                files.append([name, st.st_size, st.st_mtime_ns])
        key = {
            "fingerprint": getattr(self.dataset, "_fingerprint", None),
            "files": files,
            "rows": len(self),
            "columns": list(self.dataset.column_names),
            "map": self.columns,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def rows(self) -> list[tuple[int, dict]]:
        """(row index + 1, row with ``columns`` applied) for every row; the +1 keeps the
        1-based numbering of file lines that tokenization and the cache expect."""
        ds = self.dataset
        if self.columns:
            check_columns(self.columns, ds.column_names, self.label)
        if self.fmt in BY_NAME:  # a known format: only the columns it reads are converted
            cls, theirs = BY_NAME[self.fmt], dict(self.columns or {})
            for key in cls.keys:
                if theirs.get(key, key) not in ds.column_names:
                    raise DataError(
                        f"no column {theirs.get(key, key)!r}, which {cls.name} rows need for field "
                        f"{key!r} (columns: {', '.join(ds.column_names)}); map one with data.columns",
                        self.label,
                        field="data.columns",
                    )
            ds = ds.select_columns(
                [c for c in dict.fromkeys(theirs.get(k, k) for k in cls.reads) if c in ds.column_names]
            )
        if ds.num_rows == 0:
            raise DataError("empty data set: no rows", self.label)
        return [(i + 1, map_row(row, self.columns)) for i, row in enumerate(ds.to_list())]

    def relabel(self, e: DataError) -> DataError:
        """A DataError raised on this source's rows, naming ``label row i`` (0-based, as
        ``dataset[i]``) instead of a file line."""
        if e.path != self.label or e.line is None:
            return e
        reason = re.sub(r"\bline (\d+)\b", lambda m: f"row {int(m.group(1)) - 1}", e.reason)
        return DataError(reason, f"{self.label} row {e.line - 1}", None, e.field)


def check_columns(columns: dict, available, label: str) -> None:
    missing = [c for c in columns.values() if c not in available]
    if missing:
        field = next(k for k, v in columns.items() if v == missing[0])
        raise DataError(
            f"data.columns maps {field!r} to column {missing[0]!r}, which it does not have "
            f"(columns: {', '.join(map(str, available)) or 'none'})",
            label,
            field="data.columns",
        )


def map_row(row: dict, columns: Optional[dict]) -> dict:
    """``row`` with each mapped column under its field's name (a column mapped away is dropped,
    a column already named like a mapped field is replaced); other columns are kept."""
    if not columns:
        return row
    used = set(columns.values())
    out = {k: v for k, v in row.items() if k not in used and k not in columns}
    for field, column in columns.items():
        if column in row:
            out[field] = row[column]
    return out


def map_jsonl_rows(rows: list[tuple[int, dict]], columns: Optional[dict], path: str) -> list[tuple[int, dict]]:
    """``data.columns`` applied to a JSONL file's rows (a missing column is checked on the first row)."""
    if not columns:
        return rows
    check_columns(columns, list(rows[0][1]), f"{path}:{rows[0][0]}")
    return [(line, map_row(row, columns)) for line, row in rows]


# ----------------------------------------------------------------------------------------------
# opening a source


def _datasets():
    try:
        import datasets
    except ImportError:  # an optional dependency
        raise DataError(
            "reading a Hugging Face data set needs the datasets package: pip install 'mlx-lora[datasets]'"
        ) from None
    return datasets


def _offline() -> bool:

    flag = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        cfg = _datasets().config
        flag = flag or bool(getattr(cfg, "HF_HUB_OFFLINE", False)) or bool(getattr(cfg, "HF_DATASETS_OFFLINE", False))
    except Exception:  # the flags only choose a message
        pass
    return flag or hub.offline_mode()


def _hub_error(hid: HubId, e: Exception) -> DataError:
    """One line saying what to do about a data set the hub did not give."""
    name, text = type(e).__name__, one_line(e)
    if isinstance(e, ValueError) and "config" in text.lower():  # a config name it does not have
        return DataError(text, str(hid))
    if _offline() or "OfflineModeIsEnabled" in text or "offline" in text.lower():
        return DataError(
            "not in the local datasets cache, and offline mode is on (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE). Load it once with network access (the datasets cache keeps it), "
            "or save it with save_to_disk and pass that folder",
            str(hid),
        )
    if "DatasetNotFound" in name or "doesn't exist" in text or "404" in text:
        return DataError(
            "no such data set on the Hugging Face hub (or it is private: run `huggingface-cli login`)", str(hid)
        )
    return DataError(f"could not load it with datasets ({name}: {text}). Check the network and the name", str(hid))


def _load_hub(hid: HubId, config: Optional[str]):
    datasets = _datasets()
    try:
        return datasets.load_dataset(hid.name, config)
    except Exception as e:  # datasets and the hub raise many types; each becomes one line
        raise _hub_error(hid, e) from None


def _load_folder(path: Path):
    datasets = _datasets()
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"not a readable datasets folder ({type(e).__name__}: {one_line(e)})", str(path)) from None


def open_source(
    path: str, *, split: Optional[str] = None, columns: Optional[dict] = None, fmt: str = "auto"
) -> dict[str, Optional[RowSource]]:
    """The train/valid/test splits of a data set source (valid and test None when it has none).

    ``split`` (or ``@split`` in an hf: id) picks the training split; then the others are used only
    for a preset that names them. ``columns`` and ``fmt`` override the preset's."""
    datasets = _datasets()
    if is_hf_id(path):
        hid = parse_hf_id(path)
        if split and hid.split and split != hid.split:
            raise DataError(f"two splits given: @{hid.split} in the id and split: {split}", path)
        preset = PRESETS.get(hid.name, Preset())
        config = hid.config or preset.config
        hid = HubId(hid.name, config, hid.split or split)
        data = _load_hub(hid, config)
        base = HF_PREFIX + hid.name + (f":{config}" if config else "")
        label = lambda s: f"{base}@{s}"
    else:
        folder = Path(path).expanduser()
        preset = Preset()
        data = _load_folder(folder)
        hid = None
        label = lambda s: f"{path}[{s}]" if isinstance(data, datasets.DatasetDict) else str(path)
    cols = columns if columns else preset.columns
    fmt = fmt if fmt != "auto" else preset.format
    make = lambda s, ds: RowSource(label(s), ds, cols, fmt)
    if not isinstance(data, datasets.DatasetDict):
        if split and split != "train":
            raise DataError(f"no split {split!r}: this folder holds one data set (no splits)", str(path))
        return {"train": make("train", data), "valid": None, "test": None}
    names = list(data)
    train_split = split or (hid.split if hid else None)
    out: dict[str, Optional[RowSource]] = {"train": None, "valid": None, "test": None}
    if train_split is not None:
        if train_split not in data:
            raise DataError(f"no split {train_split!r} (splits: {', '.join(names)})", path)
        out["train"] = make(train_split, data[train_split])
        if train_split == preset.train:  # the preset's own split: its valid/test come with it
            for ours, theirs in (("valid", preset.valid), ("test", preset.test)):
                if theirs and theirs in data:
                    out[ours] = make(theirs, data[theirs])
        return out
    wanted = {"train": preset.train, "valid": preset.valid, "test": preset.test}
    for theirs in names:
        ours = SPLIT_NAMES.get(theirs)
        if ours and out[ours] is None and wanted.get(ours) in (None, theirs):
            out[ours] = make(theirs, data[theirs])
    for ours, theirs in wanted.items():
        if theirs and theirs in data:
            out[ours] = make(theirs, data[theirs])
    if out["train"] is None:
        raise DataError(f"no train split (splits: {', '.join(names)}); name one with @split or split:", path)
    return out


# ----------------------------------------------------------------------------------------------
# config checks


def config_problems(columns: Any, sources: Any, formats: tuple, weight_bound) -> list[str]:
    """Problems of ``data.columns`` and ``data.sources`` as config lines naming the key."""
    p: list[str] = []
    fields = format_fields()

    def check_columns_value(key: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, dict) or not value:
            p.append(
                f"{key}: expected a mapping of format fields to column names (e.g. "
                f"{{prompt: question, completion: answer}}), got {_show(value)}"
            )
            return
        for k, v in value.items():
            if k not in fields:
                p.append(f"{key}: {_show(k)} is not a field of any data format ({', '.join(fields)})")
            if not isinstance(v, str) or not v:
                p.append(f"{key}.{k}: expected a column name, got {_show(v)}")
        if len(set(map(str, value.values()))) < len(value):
            p.append(f"{key}: two fields map to the same column")

    check_columns_value("data.columns", columns)
    if sources is None:
        return p
    if not isinstance(sources, list) or not sources:
        p.append(f"data.sources: expected a list of {{path, weight, columns?, format?, split?}}, got {_show(sources)}")
        return p
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(s, dict):
            p.append(f"{key}: expected a mapping {{path, weight, columns?, format?, split?}}, got {_show(s)}")
            continue
        for k in s:
            if k not in SOURCE_KEYS:
                p.append(f"{key}: unknown key {_show(k)} (expected {', '.join(SOURCE_KEYS)})")
        path = s.get("path")
        if not isinstance(path, str) or not path.strip():
            p.append(f"{key}.path: required (a JSONL file or folder, a datasets folder or hf:org/name)")
        elif is_hf_id(path):
            try:
                parse_hf_id(path)
            except DataError as e:
                p.append(f"{key}.path: {e}")
        problem = weight_bound.violation(s.get("weight", 1.0))
        if problem:
            p.append(f"{key}.weight: {problem}")
        f = s.get("format", "auto")
        if f not in ("auto", *formats):
            p.append(f"{key}.format: {_show(f)} is not one of auto, {', '.join(formats)}")
        sp = s.get("split")
        if sp is not None and (not isinstance(sp, str) or not _PART.match(sp)):
            p.append(f"{key}.split: expected a split name, got {_show(sp)}")
        check_columns_value(f"{key}.columns", s.get("columns"))
    return p


def _show(v: Any) -> str:
    return show(v)
