"""``mlx-lora eval --generate``: answer held-out rows with the model, score the answers, and with
``--compare`` score the base model (adapter off) and the adapter on the same rows side by side.

Rows, prompts, generation and metrics live in :mod:`mlx_lora.inference.evaluation` and
:mod:`mlx_lora.inference.metrics`; this module checks the options, loads the model once (the adapter is
attached after the base has answered), prints the table and writes the per-example file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

from mlx_lora.config import CHOICES, INT_CAP, MAX_BATCH, MAX_SEED, MAX_SEQ_LENGTH, Bound, check_options
from mlx_lora.inference import evaluation
from mlx_lora.inference.loading import attach_adapter, eval_data_file, load_for_inference
from mlx_lora.inference.metrics import default_metric, parse_metrics
from mlx_lora.model.adapters import read_adapter
from mlx_lora.model.integrity import check_adapter_base
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.io import atomic_write_text
from mlx_lora.plumbing.ownership import OwnershipError, check_output_file
from mlx_lora.plumbing.sandbox import require_isolation

logger = logging.getLogger(__name__)

OUT_MAGIC = b'{"line": '
"""How every line of an ``--out`` file starts: ``--overwrite`` replaces only such a file."""
MAX_TIMEOUT_S = 3600.0


def _stderr(msg: str) -> None:
    logger.info(msg)


def evaluate_generate(
    model_path: str,
    data: str,
    adapter: Optional[str] = None,
    *,
    compare: bool = False,
    metrics: Sequence[str] = (),
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: Optional[int] = None,
    limit: Optional[int] = None,
    chat_template: Optional[str] = None,
    out: Optional[str] = None,
    overwrite: bool = False,
    timeout_s: float = 10.0,
    dtype: str = "auto",
    strict: bool = False,
    unsafe_exec: bool = False,
    log: Optional[Callable[[str], None]] = _stderr,
    trust_remote_code: bool = False,
) -> dict:
    """Generate an answer for each row of ``data`` (a JSONL file, or a folder's test.jsonl /
    valid.jsonl) and score it with ``metrics`` (default: chosen from the data, see
    :func:`mlx_lora.inference.metrics.default_metric`). Scores the adapter when one is given, the base
    model otherwise, and both with ``compare``. Returns the summary (what ``--json`` prints);
    ``out`` receives one JSON object per row. pass@1 runs each row's code in
    :mod:`mlx_lora.plumbing.sandbox`; where this machine offers no isolation it is refused unless
    ``unsafe_exec``."""

    log = log or (lambda m: None)
    # Everything a user can get wrong is checked before the model loads.
    check_options(
        [
            ("--max-tokens", max_tokens, Bound(int, 1, MAX_SEQ_LENGTH)),
            ("--temperature", temperature, Bound(float, 0, 100)),
            ("--top-p", top_p, Bound(float, 0, 1, lo_open=True, cap=False)),
            ("--seed", seed, Bound(int, 0, MAX_SEED)),
            ("--timeout", timeout_s, Bound(float, 0, MAX_TIMEOUT_S, lo_open=True)),
            ("dtype", dtype, CHOICES["model.dtype"]),
        ]
        + ([("--batch-size", batch_size, Bound(int, 1, MAX_BATCH))] if batch_size is not None else [])
        + ([("--limit", limit, Bound(int, 1, INT_CAP))] if limit is not None else [])
    )
    chosen = parse_metrics(metrics)
    if compare and not adapter:
        raise MlxLoraError("--compare scores the base model and an adapter side by side: give --adapter")
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
        raise MlxLoraError("--chat-template must be 'chatml' or the path of a .jinja file")
    path = eval_data_file(data)
    eval_set = evaluation.read_eval_set(path, limit=limit)
    reason = None
    if not chosen:
        metric, why = default_metric([r.reference for r in eval_set.rows], [bool(r.tests) for r in eval_set.rows])
        chosen, reason = [metric], why
    evaluation.check_metrics(chosen, eval_set)
    if "pass@1" in chosen:  # before anything runs: where the rows' code will run, or a refusal
        level = require_isolation(unsafe_exec)
        log(
            f"sandbox   {level.description}"
            if level.contained
            else "sandbox   none: each row's code runs WITHOUT isolation, as your user (--unsafe-exec)"
        )
    out_path = None
    if out is not None:
        try:
            out_path = check_output_file(out, overwrite=overwrite, what="--out file", magic=OUT_MAGIC)
        except OwnershipError as e:
            if "is not a" not in str(e):
                raise
            raise OwnershipError(
                f"--out file {out} exists and is not an output of mlx-lora eval --generate; "
                f"--overwrite replaces only such files. Choose another name"
            ) from None
        check_replaceable(out_path)
    batch = batch_size or evaluation.DEFAULT_BATCH_SIZE

    model, tokenizer, info = load_for_inference(
        model_path, None, dtype, strict=strict, dequantize_on_cpu="auto", trust_remote_code=trust_remote_code
    )
    if adapter:  # an unreadable adapter (or, with strict, one for another base) fails before any generation
        ainfo, _ = read_adapter(adapter, model)
        if strict:
            check_adapter_base(ainfo, info.local_path, strict=True, adapter_name=str(adapter))
    # Prompts that leave no room for --max-tokens in the model's context are skipped and counted.
    evaluation.render_prompts(
        eval_set, tokenizer, chat_template, context=evaluation.context_length(info.config), max_tokens=max_tokens
    )
    n, skipped = len(eval_set.rows), eval_set.skipped
    if skipped and not n:
        raise MlxLoraError(
            f"{eval_set.path}: all {len(skipped)} rows skipped, none fits the model's context "
            f"(line {skipped[0][0]}: {skipped[0][1]})"
        )
    log(
        f"data      {eval_set.path}: {n} rows ({eval_set.format})"
        + (
            f"; {len(skipped)} skipped, their prompts do not fit (line {skipped[0][0]}: {skipped[0][1]})"
            if skipped
            else ""
        )
    )
    log(
        f"metric    {', '.join(chosen)}"
        + (f" (chosen from the data: {reason}; choose with --metric)" if reason else "")
    )
    how = "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}, top-p {top_p:g}, seed {seed}"
    log(f"generate  {how}, at most {max_tokens} new tokens, batches of {batch}")

    kw = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch, timeout_s=timeout_s
    )
    results: dict[str, evaluation.Scores] = {}
    if compare or not adapter:
        results["base"] = evaluation.generate_and_score(model, tokenizer, eval_set, chosen, desc="base", **kw)
        log(f"base      {n} rows in {results['base'].seconds:.0f} s")
    if adapter:
        attach_adapter(model, info, adapter, strict=strict)
        results["adapter"] = evaluation.generate_and_score(model, tokenizer, eval_set, chosen, desc="adapter", **kw)
        log(f"adapter   {n} rows in {results['adapter'].seconds:.0f} s")

    cols = evaluation.columns(chosen)
    summary = {
        "path": eval_set.path,
        "format": eval_set.format,
        "rows": n,
        "metrics": chosen,
        "metric_reason": reason,
        "skipped": len(skipped),
        "skipped_lines": [line for line, _ in skipped],
        "model": model_path,
        "adapter": adapter,
        "generation": {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "batch_size": batch,
        },
        "scores": {name: s.means for name, s in results.items()},
        "seconds": {name: round(s.seconds, 2) for name, s in results.items()},
    }
    if "base" in results and "adapter" in results:
        summary["delta"] = {c: results["adapter"].means[c] - results["base"].means[c] for c in cols}
    if out_path is not None:
        check_replaceable(out_path)  # again: the file may have changed while the rows were generated
        atomic_write_text(
            out_path,
            "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in example_records(eval_set, results, "pass@1" in chosen)
            ),
        )
        summary["out"] = str(out_path)
    return summary


_RECORD_KEYS = {"line", "prompt", "reference", "scores", "sandbox", "tests"}


def is_example_record(obj) -> bool:
    """Whether ``obj`` (a parsed line) is a record :func:`example_records` writes."""
    return (
        isinstance(obj, dict)
        and {"line", "prompt", "reference", "scores"} <= obj.keys()
        and all(k in _RECORD_KEYS or (k.endswith("_output") and isinstance(obj[k], str)) for k in obj)
        and isinstance(obj["line"], int)
        and isinstance(obj["scores"], dict)
    )


def check_replaceable(path) -> None:
    """An existing ``--out`` file is replaced only when every line of it is a record this command
    writes; else :class:`~mlx_lora.plumbing.ownership.OwnershipError` names the first line that is not."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        raise OwnershipError(f"--out file {path} is not a regular file; choose another name")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OwnershipError(
            f"--out file {path} cannot be read as text ({getattr(e, 'strerror', None) or e}); choose another name"
        ) from None
    for i, line in enumerate(lines, 1):
        try:
            ok = is_example_record(json.loads(line))
        except ValueError:
            ok = False
        if not ok:
            raise OwnershipError(
                f"--out file {path}, line {i}: not a record of mlx-lora eval --generate; "
                f"--overwrite replaces only such files. Choose another name"
            )


def example_records(eval_set, results: dict, sandbox: bool) -> list[dict]:
    """One record per row: its line, prompt, reference, each model's output and scores."""
    records = []
    for k, row in enumerate(eval_set.rows):
        r = {"line": row.line, "prompt": row.prompt, "reference": row.reference}
        for name, s in results.items():
            r[f"{name}_output"] = s.outputs[k]
        r["scores"] = {name: s.rows[k] for name, s in results.items()}
        if sandbox:
            r["sandbox"] = {name: s.statuses[k] for name, s in results.items()}
        if row.tests is not None:
            r["tests"] = row.tests
        records.append(r)
    # A skipped row has a record too, saying why it has no output.
    records += [{"line": line, "skipped": why} for line, why in eval_set.skipped]
    return sorted(records, key=lambda r: r["line"])


def table_lines(summary: dict) -> list[str]:
    """The scores as a table: a row per metric column, a column per model (and the delta, in
    percentage points, when both were scored)."""
    models = list(summary["scores"])
    cols = [c for c in next(iter(summary["scores"].values()))]
    head = ["metric", *models] + (["delta"] if "delta" in summary else [])
    rows = []
    for c in cols:
        cells = [c] + [f"{100 * summary['scores'][m][c]:.1f}%" for m in models]
        if "delta" in summary:
            cells.append(f"{100 * summary['delta'][c]:+.1f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), *map(fmt, rows)]


def summary_text(summary: dict) -> str:
    lines = table_lines(summary)
    lines.append(
        f"({summary['rows']} rows of {summary['path']}"
        + (
            f"; {summary['skipped']} rows skipped, their prompts do not fit the model's context"
            if summary.get("skipped")
            else ""
        )
        + ("; delta in percentage points" if "delta" in summary else "")
        + ")"
    )
    if summary.get("out"):
        lines.append(f"per-example outputs: {summary['out']}")
    return "\n".join(lines)
