#!/usr/bin/env python3
# python recipes/prepare_data.py DATASET --out data/NAME
#
# Turn a public Hugging Face data set (or a local JSONL/JSON file) into train/valid/test JSONL files
# that mlx-lora reads.
#
# task:    data preparation
# data:    any data set `datasets.load_dataset` opens; presets for the ones the recipes name
# prepare: pip install datasets
"""Download a data set and write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` in one of
mlx-lora's formats (chat, completions, alpaca, text).

    python recipes/prepare_data.py yahma/alpaca-cleaned --out data/alpaca
    python recipes/prepare_data.py HuggingFaceH4/ultrachat_200k --limit 20000 --out data/ultrachat
    python recipes/prepare_data.py my_rows.jsonl --format completions --field prompt=question \\
        --field completion=answer --out data/mine

Presets (below) know the split, format and column names of the data sets the recipes use; for
any other data set give ``--format`` and, where its columns are named differently, ``--field
ours=theirs``. Rows are shuffled with ``--seed`` before ``--valid`` and ``--test`` rows are held
out, so the split is reproducible. Hub data sets need ``pip install datasets``; local files do not.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

FORMATS = ("chat", "completions", "alpaca", "text", "preference")
FIELDS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
SUMMARIZE = "Summarize the following document.\n\n{document}\n\nSummary:"

# name -> split, config, format, field map (ours -> theirs), prompt template for completions
PRESETS = {
    "yahma/alpaca-cleaned": {"format": "alpaca"},
    "sahil2801/CodeAlpaca-20k": {"format": "alpaca"},
    "databricks/databricks-dolly-15k": {"format": "alpaca", "fields": {"input": "context", "output": "response"}},
    "HuggingFaceH4/ultrachat_200k": {"format": "chat", "split": "train_sft"},
    "HuggingFaceH4/no_robots": {"format": "chat"},
    "FiscalNote/billsum": {
        "format": "completions",
        "fields": {"prompt": "text", "completion": "summary"},
        "template": SUMMARIZE,
    },
    "abisee/cnn_dailymail": {
        "format": "completions",
        "config": "3.0.0",
        "fields": {"prompt": "article", "completion": "highlights"},
        "template": SUMMARIZE,
    },
    "Salesforce/wikitext": {"format": "text", "config": "wikitext-103-raw-v1"},
    # chosen / rejected are whole conversations sharing the prompt turn (no prompt column)
    "trl-lib/ultrafeedback_binarized": {"format": "preference"},
}


class PrepareError(ValueError):
    pass


def convert_row(row: dict, fmt: str, fields: dict, template: str | None = None) -> dict | None:
    """One source row as a row of ``fmt``; None for a row with nothing to learn from."""

    def get(ours: str, optional: bool = False):
        theirs = fields.get(ours, ours)
        if theirs not in row:
            if optional:
                return ""
            raise PrepareError(
                f"column '{theirs}' missing (have: {', '.join(sorted(row))}); map it with --field {ours}=COLUMN"
            )
        return row[theirs]

    if fmt == "chat":
        messages = get("messages")
        if not isinstance(messages, list) or not any(m.get("role") == "assistant" for m in messages):
            return None
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if fmt == "completions":
        prompt, completion = str(get("prompt")).strip(), str(get("completion")).strip()
        if not prompt or not completion:
            return None
        if template:
            prompt = template.format(document=prompt)
        return {"prompt": prompt, "completion": " " + completion}
    if fmt == "alpaca":
        instruction, output = str(get("instruction")).strip(), str(get("output")).strip()
        if not instruction or not output:
            return None
        return {"instruction": instruction, "input": str(get("input", optional=True) or "").strip(), "output": output}
    if fmt == "preference":
        out = {k: get(k) for k in ("chosen", "rejected")}
        prompt = get("prompt", optional=True)
        if prompt:
            out = {"prompt": prompt, **out}
        plain = lambda v: v if isinstance(v, str) else [{"role": m["role"], "content": m["content"]} for m in v]
        return {k: plain(v) for k, v in out.items()} if all(out.values()) else None
    text = str(get("text"))
    # wikitext-style dumps: one paragraph per row, headings as " = Title = ", many empty rows.
    stripped = text.strip()
    if not stripped or (stripped.startswith("=") and stripped.endswith("=")):
        return None
    return {"text": stripped}


def load_rows(source: str, split: str, config: str | None):
    """Rows of a local .jsonl/.json file, or of a hub data set (needs the ``datasets`` package)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") and path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else data[split]
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrepareError("reading a Hugging Face data set needs the datasets package: pip install datasets") from None
    return load_dataset(source, config, split=split)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from mlx_lora.plumbing.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(
    source: str,
    out: Path,
    *,
    fmt: str | None = None,
    split: str | None = None,
    config: str | None = None,
    fields: dict | None = None,
    template: str | None = None,
    limit: int | None = None,
    valid: int = 200,
    test: int = 200,
    seed: int = 0,
) -> dict[str, int]:
    """Convert ``source`` and write the three splits into ``out``; returns rows per split."""
    preset = PRESETS.get(source, {})
    fmt = fmt or preset.get("format")
    if fmt not in FORMATS:
        raise PrepareError(f"{source}: no preset; pass --format ({', '.join(FORMATS)})")
    fields = {**preset.get("fields", {}), **(fields or {})}
    template = template or preset.get("template")
    rows = load_rows(source, split or preset.get("split", "train"), config or preset.get("config"))
    converted = []
    for i, row in enumerate(rows):
        try:
            r = convert_row(dict(row), fmt, fields, template)
        except PrepareError as e:
            raise PrepareError(f"{source}: row {i + 1}: {e}") from None
        if r is not None:
            converted.append(r)
    random.Random(seed).shuffle(converted)
    if limit is not None:
        converted = converted[: limit + valid + test]
    if len(converted) <= valid + test:
        raise PrepareError(
            f"{source}: only {len(converted)} usable rows; need more than --valid + --test = {valid + test}"
        )
    splits = {"valid": converted[:valid], "test": converted[valid : valid + test], "train": converted[valid + test :]}
    for name, part in splits.items():
        if part:
            write_jsonl(out / f"{name}.jsonl", part)
    return {k: len(v) for k, v in splits.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="hub data set id, or a local .jsonl / .json file")
    ap.add_argument("--out", required=True, type=Path, help="output folder (train.jsonl, valid.jsonl, test.jsonl)")
    ap.add_argument("--format", choices=FORMATS, help="output format (default: the preset's)")
    ap.add_argument("--split", help="source split (default: the preset's, else train)")
    ap.add_argument("--config", help="source configuration name (e.g. wikitext-103-raw-v1)")
    ap.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS", help="column mapping, repeatable")
    ap.add_argument("--template", help="completions prompt template with {document}")
    ap.add_argument("--limit", type=int, help="keep at most this many training rows")
    ap.add_argument("--valid", type=int, default=200, help="validation rows (default 200)")
    ap.add_argument("--test", type=int, default=200, help="test rows (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fields = {}
    for item in args.field:
        if "=" not in item:
            ap.error(f"--field {item}: expected OURS=THEIRS")
        ours, theirs = item.split("=", 1)
        fields[ours] = theirs
    try:
        counts = prepare(
            args.source,
            args.out,
            fmt=args.format,
            split=args.split,
            config=args.config,
            fields=fields,
            template=args.template,
            limit=args.limit,
            valid=args.valid,
            test=args.test,
            seed=args.seed,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:,} rows" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
