"""The one typed configuration of a training run.

Defaults live here and nowhere else. A config comes from a YAML file, CLI options and
``--set section.key=value`` overrides, in that order of precedence (later wins). :func:`validate` collects
every problem and raises a single :class:`~mlx_lora.errors.ConfigError` naming each key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how."""

    path: Optional[str] = None
    """Local HF or MLX folder, Hugging Face repo id, or a .gguf file."""
    dtype: str = "auto"
    """Compute dtype: auto (float32 on the CPU backend, bfloat16 on GPU), float32, bfloat16, float16."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when ``path`` is a repo id."""
    trust_remote_code: bool = False
    """Allow a model folder to run its own Python code to build the architecture."""


@dataclass(frozen=True)
class LoraConfig:
    """PEFT-style adapter settings. Scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: Optional[list[str]] = None
    """Module names (``q_proj``) or regexes (``re:.*mlp.*``); default: every linear layer of
    attention and MLP blocks."""
    layers_to_transform: Optional[list[int]] = None
    """Transformer block indices to adapt (negative counts from the end); default: all."""
    use_dora: bool = False
    """DoRA: also learn a per-output magnitude (arXiv:2402.09353)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(r), which keeps high ranks stable (arXiv:2312.03732)."""

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become token batches."""

    path: Optional[str] = None
    """A JSONL file (validation split carved off) or a folder with train.jsonl [valid.jsonl test.jsonl]."""
    format: str = "auto"
    """auto, chat, completions, text, alpaca or sharegpt (auto detects per file)."""
    valid_fraction: float = 0.05
    """Share of a single JSONL file held out for validation when no valid.jsonl exists."""
    max_seq_length: int = 2048
    """Longest example in tokens; longer ones follow ``overlong``."""
    train_on: str = "assistant"
    """Which tokens carry loss: assistant (every assistant turn / the completion), last (last
    assistant turn only) or all."""
    chat_template: Optional[str] = None
    """None uses the tokenizer's template; 'chatml' (built in) or a path to a .jinja file."""
    packing: bool = False
    """Pack several short examples per row; a block-diagonal mask keeps them apart."""
    length_bucketing: bool = False
    """Batch examples of similar length together (less padding where train.length_groups is off).
    Each step then sees only short or only long examples, which cost validation loss in short runs
    (bench/RESULTS.md); the default draws every batch at random."""
    overlong: str = "truncate"
    """What to do with an example longer than max_seq_length: truncate, skip or error."""
    cache: bool = True
    """Cache tokenized data on disk, keyed by file hash, tokenizer and settings."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    iters: Optional[int] = None
    """Optimizer steps; when unset, ``epochs`` decides."""
    epochs: Optional[float] = None
    """Passes over the training set (used when ``iters`` is unset; default 1)."""
    batch_size: int = 4
    """Examples (or packed rows) per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is weighted by target tokens across them."""
    lr: float = 1e-4
    """Peak learning rate."""
    optimizer: str = "adamw"
    """adam, adamw, sgd or adafactor."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw, sgd)."""
    schedule: str = "cosine"
    """constant, cosine or linear (decay to ``min_lr_ratio * lr``), after linear warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    """Final learning rate of cosine/linear decay, as a fraction of ``lr``."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm; null disables clipping."""
    eval_every: int = 100
    """Validate every this many steps (and at the end)."""
    eval_batches: Optional[int] = 25
    """Validation batches per evaluation; null evaluates the whole validation set."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep (the best one is kept as well)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without a new best validation loss."""
    grad_checkpoint: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% slower)."""
    checkpoint_attention: Optional[bool] = None
    """Recompute each block's attention in the backward pass instead of keeping its
    [heads x L x L] probabilities: true (always), false (never) or null (auto: only for the
    batches that set the peak, at least 3/4 as long as the longest row of the data and long
    enough that heads x L >= the MLP's intermediate size). Lowers peak memory on long rows for
    some extra compute; grad_checkpoint recomputes whole blocks instead."""
    loss_chunk_tokens: Optional[int] = 256
    """Apply the output layer and cross-entropy this many tokens at a time, computing their
    gradient in the same pass, so the full [tokens x vocab] logits never exist (same loss and
    gradients, same speed); null computes all logits at once."""
    length_groups: Optional[bool] = None
    """Run each batch as groups of rows of similar length, each padded only to its own longest
    row, and sum their gradients into the one optimizer step: the update of the whole batch
    (same examples, same loss) without computing its padding. null (auto): on for the CPU, where
    a one-row call of any real model is as efficient per position as a batch, so every row runs
    alone (a tiny model, whose calls cost more than its positions, groups rows); off on a GPU,
    which wants many rows per call (true there groups up to batch_size rows, trading padding
    against calls). Packed batches always run whole."""
    compile: bool = True
    """Compile the training step with mx.compile (faster; off for debugging)."""
    seed: int = 0
    """Seeds data order, validation split, LoRA init and dropout."""
    log_every: int = 10
    """Progress and metrics.jsonl every this many steps."""
    nan_policy: str = "stop"
    """On a non-finite loss: stop (keep the last good checkpoint) or skip the step."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/run"
    """Run folder: config, adapter, checkpoints, metrics."""


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.format": ("auto", "chat", "completions", "text", "alpaca", "sharegpt"),
    "data.train_on": ("assistant", "last", "all"),
    "data.overlong": ("truncate", "skip", "error"),
    "train.optimizer": ("adam", "adamw", "sgd", "adafactor"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.nan_policy": ("stop", "skip"),
}


# ----------------------------------------------------------------------------------------------
# building


# Names users bring from PEFT, mlx-lm and transformers configs.
ALIASES = {"rank": "r", "lora_rank": "r", "lora_r": "r", "lora_alpha": "alpha", "scale": "alpha",
           "lora_dropout": "dropout", "learning_rate": "lr", "num_epochs": "epochs", "iterations": "iters",
           "gradient_accumulation_steps": "grad_accum", "max_length": "max_seq_length", "model": "path",
           "data": "path", "warmup": "warmup_steps", "lr_schedule": "schedule", "grad_checkpointing": "grad_checkpoint",
           "gradient_checkpointing": "grad_checkpoint", "steps_per_eval": "eval_every", "batch": "batch_size"}


def _did_you_mean(key: str, options) -> str:
    options = list(options)
    if ALIASES.get(key) in options:
        return f" (did you mean '{ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _in_other_section(key: str, section: Optional[str]) -> str:
    """' (did you mean 'sec.key'?)' when ``key`` (or its alias) is a key of another section."""
    for name in (key, ALIASES.get(key)):
        for sec, cls in SECTIONS.items():
            if sec != section and name in {f.name for f in fields(cls)}:
                return f" (did you mean '{sec}.{name}'?)"
    return ""


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to the annotated type ``tp``; record a problem when it cannot."""
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key, problems)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, item_tp, key, problems) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (float, str)):  # "1e3" is fine; "8.5" and "1e400" are not
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        problems.append(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _section_from_dict(cls, data: dict, prefix: str, problems: list[str], base=None):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            problems.append(f"unknown key '{prefix}{k}'"
                            + (_did_you_mean(k, names) or _in_other_section(k, prefix.rstrip("."))))
            continue
        kwargs[k] = _coerce(v, hints[k], prefix + k, problems)
    base = base if base is not None else cls()
    return replace(base, **kwargs)


def from_dict(data: dict, base: Optional[Config] = None, source: Optional[str] = None) -> Config:
    """Build a Config from nested dicts, on top of ``base`` (defaults when None). Raises
    ConfigError listing every unknown key and bad type."""
    base = base or Config()
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping at the top level, got {type(data).__name__}"], source)
    kwargs = {}
    for k, v in data.items():
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                problems.append(f"'{k}' must be a mapping of keys, got {v!r}")
                continue
            kwargs[k] = _section_from_dict(SECTIONS[k], v, k + ".", problems, getattr(base, k))
        elif k == "out":
            if v is None or isinstance(v, (dict, list)) or str(v).strip() == "":
                problems.append(f"out: expected a folder path, got {v!r}")
            else:
                kwargs[k] = str(v)
        else:
            problems.append(f"unknown key '{k}'" + (_in_other_section(str(k), None)
                                                     or _did_you_mean(k, list(SECTIONS) + ["out"])))
    if problems:
        raise ConfigError(problems, source)
    return replace(base, **kwargs)


def load_yaml(path: Union[str, os.PathLike]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text ({e.reason} at byte {e.start})"], str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"YAML syntax error{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    return data or {}


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["lora.r=16", "train.lr=1e-4"]`` into a nested dict; values are parsed as YAML."""
    out: dict = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"--set '{item}': expected section.key=value")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                problems.append(f"--set '{item}': '{p}' is not a section")
                break
        else:
            d[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def build(
    config_file: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    extra: Optional[dict] = None,
    check: bool = True,
) -> Config:
    """Defaults <- YAML file <- ``extra`` (CLI options) <- ``--set`` overrides, then validate."""
    data: dict = {}
    if config_file:
        data = load_yaml(config_file)
        if not isinstance(data, dict):
            raise ConfigError(["expected a mapping at the top level"], str(config_file))
    if extra:
        data = deep_merge(data, extra)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    cfg = from_dict(data, source=str(config_file) if config_file else None)
    if check:
        validate(cfg, source=str(config_file) if config_file else None)
    return cfg


def validate(cfg: Config, source: Optional[str] = None, need_data: bool = True) -> Config:
    """Check every value; raise one ConfigError that lists all problems."""
    p: list[str] = []
    for key, choices in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in choices:
            p.append(f"{key}: '{value}' is not one of {', '.join(choices)}" + _did_you_mean(str(value), choices))
    m, lo, d, t = cfg.model, cfg.lora, cfg.data, cfg.train
    if not m.path:
        p.append("model.path: required (a local folder, a Hugging Face repo id or a .gguf file)")
    if need_data and not d.path:
        p.append("data.path: required (a JSONL file or a folder with train.jsonl)")
    if lo.r < 1:
        p.append(f"lora.r: must be >= 1, got {lo.r}")
    if lo.alpha <= 0:
        p.append(f"lora.alpha: must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if lo.target_modules is not None:
        if not lo.target_modules:
            p.append("lora.target_modules: empty list; leave unset for all linear layers")
        for pat in lo.target_modules:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    p.append(f"lora.target_modules: bad regex '{pat}': {e}")
    if not 0 <= d.valid_fraction < 1:
        p.append(f"data.valid_fraction: must be in [0, 1), got {d.valid_fraction}")
    if d.max_seq_length < 2:
        p.append(f"data.max_seq_length: must be >= 2, got {d.max_seq_length}")
    if t.iters is not None and t.iters < 1:
        p.append(f"train.iters: must be >= 1, got {t.iters}")
    if t.epochs is not None and t.epochs <= 0:
        p.append(f"train.epochs: must be > 0, got {t.epochs}")
    for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        p.append(f"train.max_grad_norm: must be > 0 or null, got {t.max_grad_norm}")
    if t.eval_batches is not None and t.eval_batches < 1:
        p.append(f"train.eval_batches: must be >= 1 or null, got {t.eval_batches}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        p.append(f"train.early_stopping_patience: must be >= 1 or null, got {t.early_stopping_patience}")
    if t.loss_chunk_tokens is not None and t.loss_chunk_tokens < 1:
        p.append(f"train.loss_chunk_tokens: must be >= 1 or null, got {t.loss_chunk_tokens}")
    if p:
        raise ConfigError(p, source)
    return cfg


def to_dict(cfg: Any) -> Any:
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass, by field name."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """The README's configuration reference, generated from the dataclasses (kept in sync by a test)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in SECTIONS.items():
        docs = _field_docs(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
            lines.append(f"| `{section}.{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    lines.append(f"| `out` | `{Config().out}` | Run folder: config, adapter, checkpoints, metrics. |")
    return "\n".join(lines)
