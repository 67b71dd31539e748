"""The one typed configuration of a training run.

Defaults live here and nowhere else. A config comes from a YAML file, CLI options and
``--set section.key=value`` overrides, in that order of precedence (later wins). :func:`validate` collects
every problem and raises a single :class:`~mlx_lora.plumbing.errors.ConfigError` naming each key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import numbers
import os
import re
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union, get_args, get_origin, get_type_hints

import yaml

import mlx_lora.training.rewards as rewards_mod
from mlx_lora.data.formats import FORMATS
from mlx_lora.data.shapes import POLICIES as SHAPE_POLICIES
from mlx_lora.data.sources import config_problems
from mlx_lora.mlx_lm_config import is_mlx_lm_config, key_lines
from mlx_lora.mlx_lm_config import translate as translate_mlx_lm
from mlx_lora.plumbing.errors import SHOW_CHARS, ConfigError, MlxLoraError, clip, show  # noqa: F401 (re-exported)


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
    dequantize_on_cpu: str = "auto"
    """Quantized base on the CPU backend: compute with its weights dequantized to float32 (the same
    values; 10-30x faster there, where quantized matmuls have no fast kernel). auto: when they fit in
    half the available memory; true: always; false: never. The quantized folder stays the base the
    adapter records; GPUs always compute quantized."""


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
    """Module names (``q_proj``, ``self_attn.q_proj``: the end of the module path) or regexes
    (``re:.*mlp.*``); default: every linear layer of attention and MLP blocks, and every expert
    layer of MoE blocks (not their routers); ``[all-linear]``: those and the routers (as mlx-lm)."""
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
    """A JSONL file (validation split carved off), a folder with train.jsonl [valid.jsonl test.jsonl], a
    folder saved with datasets' save_to_disk, or a Hugging Face data set hf:org/name[:config][@split]."""
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
    columns: Optional[dict] = None
    """Map a source's columns onto format fields, {field: column}, e.g. {prompt: question, completion:
    answer}; the data sets the recipes name are mapped already."""
    sources: Optional[list[dict]] = None
    """Mix several sources instead of path: a list of {path, weight (default 1), columns, format,
    split}; each epoch gives source i a share w_i / sum(w) of all sources' examples (README "Data")."""


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
    shapes: str = "auto"
    """How batches are laid out, and so how many shapes the compiled step meets: exact (each
    batch padded to its longest row, rounded up to 32), ladder (padded up to a short ladder of
    lengths ~1.41x apart), packed (the batch's examples packed into rows of one fixed length with a
    block-diagonal mask) or auto (exact on the CPU; on a GPU the cheapest by a cost model of
    padding against compile time). Same examples and loss either way."""
    wired_limit_gb: Optional[float] = None
    """Metal: memory (GB) the GPU keeps wired (mx.set_wired_limit), at most the device's
    recommended working set; null leaves MLX's default. No effect on other backends."""
    cache_limit_gb: Optional[float] = None
    """Most memory (GB) MLX's allocator keeps cached for reuse (mx.set_cache_limit); 0 returns
    every freed buffer at once. null leaves MLX's default (its memory limit)."""
    clear_cache_after_eval: bool = True
    """Return the allocator's cached buffers (mx.clear_cache) after each evaluation, so
    evaluation's buffers do not sit beside training's."""
    compile: bool = True
    """Compile the training step with mx.compile (faster; off for debugging)."""
    seed: int = 0
    """Seeds data order, validation split, LoRA init and dropout."""
    log_every: int = 10
    """Progress and metrics.jsonl every this many steps."""
    nan_policy: str = "stop"
    """On a non-finite loss: stop (keep the last good checkpoint) or skip the step."""
    method: str = "sft"
    """sft (cross-entropy on the targets), dpo or orpo (preference tuning on prompt/chosen/rejected
    rows; batch_size then counts pairs) or grpo (reinforcement learning from rewards on prompt/answer
    rows; batch_size then counts prompts, each sampled group_size times; docs/grpo.md)."""
    dpo_loss: str = "sigmoid"
    """train.method dpo's loss: sigmoid (DPO) or ipo (IPO, squared loss on per-token log ratios)."""
    dpo_beta: float = 0.1
    """DPO/IPO beta: how far the policy may move from the reference (the base, adapter off)."""
    dpo_label_smoothing: float = 0.0
    """Conservative DPO: the assumed share of pairs whose preference is flipped (sigmoid loss only)."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term added to the chosen responses' NLL."""
    dpo_precompute_ref: bool = False
    """DPO: compute the reference log-probs of the training pairs in one pass before training and
    cache them in the run folder (reference_logps.npz, reused on resume) instead of in every step."""
    group_size: int = 4
    """GRPO: completions sampled per prompt; their rewards are compared within the group."""
    temperature: float = 1.0
    """GRPO: sampling temperature of the completions."""
    max_completion_length: int = 256
    """GRPO: most tokens sampled per completion (EOS included)."""
    grpo_beta: float = 0.04
    """GRPO: weight of the KL penalty against the reference (the base, adapter off); 0 skips the
    reference pass."""
    grpo_loss: str = "grpo"
    """GRPO loss as TRL names it: grpo (mean per completion), bnpo (mean over the batch's tokens) or
    dr_grpo (tokens summed, divided by completions x max_completion_length)."""
    epsilon: float = 0.2
    """GRPO: the importance ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: Optional[float] = None
    """GRPO: upper clipping bound (DAPO's clip-higher); null: epsilon."""
    grpo_scale_rewards: bool = True
    """GRPO: divide each group's centred rewards by their standard deviation (Dr. GRPO: false)."""
    grpo_kl_bias_correction: bool = False
    """GRPO: weight each token's KL term by its importance ratio (TRL's use_bias_correction_kl,
    true by default in TRL 1.x): the same value on policy, a gradient with an extra KL term."""
    reward: Optional[str] = None
    """GRPO: one reward function: number, exact, contains, json, pass@1, length, length:N,
    regex:PATTERN, format:PATTERN, or a function of yours as module:function (docs/grpo.md)."""
    rewards: Optional[dict] = None
    """GRPO: several reward functions with weights, {name: weight}, e.g. {number: 1.0, format: 0.2}."""
    report_to: Optional[list[str]] = None
    """Also send the metrics.jsonl records to these trackers: tensorboard (event files in
    RUN/tensorboard/), wandb (RUN/wandb/; offline without an API key). Optional extras:
    pip install 'mlx-lora[tensorboard]' / 'mlx-lora[wandb]'. null: none."""


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
    "model.dequantize_on_cpu": ("auto", "true", "false"),
    "data.format": ("auto", *FORMATS),  # the formats are defined once, in data_formats
    "data.train_on": ("assistant", "last", "all"),
    "data.overlong": ("truncate", "skip", "error"),
    "train.optimizer": ("adam", "adamw", "sgd", "adafactor"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.nan_policy": ("stop", "skip"),
    "train.method": ("sft", "dpo", "orpo", "grpo"),
    "train.dpo_loss": ("sigmoid", "ipo"),
    "train.grpo_loss": ("grpo", "dr_grpo", "bnpo"),
    "train.shapes": SHAPE_POLICIES,
}
LIST_CHOICES = {
    "train.report_to": ("tensorboard", "wandb"),
}
"""Keys whose value is a list (or null) of these choices."""

INT_CAP = 2**31 - 1
"""Largest count of steps, batches or checkpoints: a larger one is a typo (at a millisecond a step,
2**31 steps take weeks)."""
MAX_SEQ_LENGTH = 2**20
"""Longest sequence any model takes (1M-token contexts): a larger value is a typo."""
MAX_RANK = 2**14
"""No model's layers are wider than this (16384), and a rank above a layer's width adds nothing;
:mod:`mlx_lora.model.adapters` checks the rank against the actual layers once the model is loaded."""
MAX_BATCH = 2**16
"""Rows per micro-batch, or micro-batches per step: more than any run uses; a larger value is a typo."""
MAX_SEED = 2**32 - 1
MAX_MEMORY_GB = 2**20
"""A memory limit above a petabyte is a typo."""
"""Seeds are combined with step and rank numbers into one unsigned 64-bit seed."""


@dataclass(frozen=True)
class Bound:
    """The values a number may take: its type, an interval and whether null is allowed.

    ``cap`` marks an upper bound that only guards against absurd values (say ``<= 16384``) rather
    than one that belongs to the meaning (a fraction's 1); a value below the lower bound is then
    told the lower bound alone, as ``>= 1``."""

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False
    cap: bool = True

    def interval(self) -> str:
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"

    def violation(self, value: Any) -> Optional[str]:
        """None when ``value`` is allowed, else what is wrong ("must be >= 1, got 0")."""
        null = " or null" if self.nullable else ""
        if value is None:
            return None if self.nullable else f"required ({self.interval()}), got null"
        number = numbers.Real if self.kind is float else numbers.Integral  # numpy scalars included
        if isinstance(value, bool) or not isinstance(value, number):
            return f"expected {self.kind.__name__}, got {show(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number in {self.interval()}{null}, got {show(value)}"
        low = value <= self.lo if self.lo_open else value < self.lo
        high = value >= self.hi if self.hi_open else value > self.hi
        if not (low or high):
            return None
        if not self.cap:
            return f"must be in {self.interval()}{null}, got {show(value)}"
        if low:
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}{null}, got {show(value)}"
        return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}{null}, got {show(value)}"


# Every number of the config: its type and range. validate() checks each one.
BOUNDS = {
    "lora.r": Bound(int, 1, MAX_RANK),
    "lora.alpha": Bound(float, 0, 1e6, lo_open=True),
    "lora.dropout": Bound(float, 0, 1, hi_open=True, cap=False),
    "data.valid_fraction": Bound(float, 0, 1, hi_open=True, cap=False),
    "data.max_seq_length": Bound(int, 2, MAX_SEQ_LENGTH),
    "train.iters": Bound(int, 1, INT_CAP, nullable=True),
    "train.epochs": Bound(float, 0, 10_000, lo_open=True, nullable=True),
    "train.batch_size": Bound(int, 1, MAX_BATCH),
    "train.grad_accum": Bound(int, 1, MAX_BATCH),
    "train.lr": Bound(float, 0, 10, lo_open=True),
    "train.weight_decay": Bound(float, 0, 10),
    "train.warmup_steps": Bound(int, 0, INT_CAP),
    "train.min_lr_ratio": Bound(float, 0, 1, cap=False),
    "train.max_grad_norm": Bound(float, 0, 1e6, lo_open=True, nullable=True),
    "train.eval_every": Bound(int, 1, INT_CAP),
    "train.eval_batches": Bound(int, 1, INT_CAP, nullable=True),
    "train.save_every": Bound(int, 1, INT_CAP),
    "train.keep_checkpoints": Bound(int, 1, INT_CAP),
    "train.early_stopping_patience": Bound(int, 1, INT_CAP, nullable=True),
    "train.loss_chunk_tokens": Bound(int, 1, INT_CAP, nullable=True),
    "train.seed": Bound(int, 0, MAX_SEED),
    "train.log_every": Bound(int, 1, INT_CAP),
    "train.dpo_beta": Bound(float, 0, 1e3, lo_open=True),
    "train.dpo_label_smoothing": Bound(float, 0, 0.5, hi_open=True, cap=False),
    "train.orpo_lambda": Bound(float, 0, 1e3),
    "train.group_size": Bound(int, 2, MAX_BATCH),
    "train.temperature": Bound(float, 0, 100, lo_open=True),
    "train.max_completion_length": Bound(int, 1, MAX_SEQ_LENGTH),
    "train.grpo_beta": Bound(float, 0, 1e3),
    "train.epsilon": Bound(float, 0, 1, lo_open=True, hi_open=True, cap=False),
    "train.epsilon_high": Bound(float, 0, 100, lo_open=True, nullable=True),
    "train.wired_limit_gb": Bound(float, 0, MAX_MEMORY_GB, nullable=True),
    "train.cache_limit_gb": Bound(float, 0, MAX_MEMORY_GB, nullable=True),
}
SOURCE_BOUNDS = {"data.sources[].weight": Bound(float, 0, 1e6, lo_open=True)}
"""Numbers inside each entry of data.sources (checked by validate() with the entry's index)."""
SOURCE_CHOICES = {"data.sources[].format": ("auto", *FORMATS)}
MAX_LAYER_INDEX = 2**16
"""lora.layers_to_transform entries beyond this cannot name a block of any model."""


def check_options(checks: Iterable[tuple[str, Any, Union[Bound, tuple]]]) -> None:
    """Check the options of a command (or the arguments of the API function behind it) before any
    work starts. ``checks`` holds (the option as the command line spells it, its value, a Bound or
    a tuple of choices); raises one MlxLoraError naming every bad one, e.g. "--top-p must be in
    (0, 1], got 5"."""
    problems = []
    for option, value, allowed in checks:
        if isinstance(allowed, Bound):
            problem = allowed.violation(value)
            if problem:
                problems.append(f"{option} {problem}")
        elif not isinstance(value, str) or value not in allowed:
            problems.append(f"{option} must be one of {', '.join(allowed)}, got {show(value)}")
    if problems:
        raise MlxLoraError("; ".join(problems))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ----------------------------------------------------------------------------------------------
# building


# Names users bring from PEFT, mlx-lm and transformers configs.
ALIASES = {
    "rank": "r",
    "lora_rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "iterations": "iters",
    "gradient_accumulation_steps": "grad_accum",
    "max_length": "max_seq_length",
    "model": "path",
    "data": "path",
    "warmup": "warmup_steps",
    "lr_schedule": "schedule",
    "grad_checkpointing": "grad_checkpoint",
    "gradient_checkpointing": "grad_checkpoint",
    "steps_per_eval": "eval_every",
    "batch": "batch_size",
}


def _scale_hint(value: Any, r: Any) -> str:
    """mlx-lm's ``scale`` multiplies B A directly, ours is alpha / r: the alpha that gives it."""
    where = "lora.alpha"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(r, int) and r > 0:
        return (
            f" (mlx-lm's scale is alpha / r: for scale {value:g} with r {r}, set {where}: {value * r:g}, "
            f"i.e. alpha = scale * r)"
        )
    return f" (mlx-lm's scale is alpha / r: set {where} to scale * r)"


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
            problems.append(f"{key}: expected a list, got {type(value).__name__} {show(value)}")
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
            if isinstance(value, (float, str)):  # "1e3" is fine; "8.5", "1e400" and ".nan" are not
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                # Past 2**53 a float is no exact integer: 1e30 is a typo, never a count or a size.
                if abs(number) > 2**53:
                    bound = BOUNDS.get(key)
                    limit = f" <= {_num(bound.hi)}" if bound else ""
                    problems.append(f"{key}: expected an int{limit}, got {show(value)}")
                    return value
                return int(number)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            # YAML reads a bare true/false as a bool; for a choice that names them it means the word
            if isinstance(value, bool) and "true" in CHOICES.get(key, ()):
                return "true" if value else "false"
            return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        problems.append(f"{key}: expected {tp.__name__}, got {show(value)}")
        return value
    return value


def _section_from_dict(cls, data: dict, prefix: str, problems: list[str], base=None):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k == "scale" and k not in names:
            r = data.get("r", getattr(base, "r", None)) if cls is LoraConfig else None
            problems.append(f"unknown key '{prefix}scale'{_scale_hint(v, r)}")
            continue
        if k not in names:
            k = clip(k)
            # the same key in another section is a surer hint than a near spelling in this one
            problems.append(
                f"unknown key '{prefix}{k}'" + (_in_other_section(k, prefix.rstrip(".")) or _did_you_mean(k, names))
            )
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
                problems.append(f"'{k}' must be a mapping of keys, got {show(v)}")
                continue
            kwargs[k] = _section_from_dict(SECTIONS[k], v, k + ".", problems, getattr(base, k))
        elif k == "out":
            if v is None or isinstance(v, (dict, list)) or str(v).strip() == "":
                problems.append(f"out: expected a folder path, got {show(v)}")
            else:
                kwargs[k] = str(v)
        elif k == "scale":
            problems.append(f"unknown key 'scale'{_scale_hint(v, None)}")
        else:
            k = clip(k)
            problems.append(
                f"unknown key '{k}'" + (_in_other_section(k, None) or _did_you_mean(k, list(SECTIONS) + ["out"]))
            )
    if problems:
        raise ConfigError(problems, source)
    return replace(base, **kwargs)


MAX_YAML_NODES = 10_000
"""Values a config document may hold once its YAML aliases are expanded. A config has a few dozen;
aliases of aliases (the "billion laughs" file) reach billions from a few lines, which would take
minutes and gigabytes to build and to print."""


def _expanded_nodes(root: yaml.Node, limit: int) -> Optional[int]:
    """How many nodes ``root`` holds with every alias expanded, counted up to ``limit + 1``, or
    None when a node contains itself. Each distinct node is visited once (aliases share nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        key = id(node)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        if closing:
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            open_nodes.discard(key)
        elif key not in sizes:
            if key in open_nodes:
                return None
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return sizes[id(root)]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with its own copy of the implicit resolvers, so what a config means
    does not depend on which other library changed ``yaml.SafeLoader`` at import (mlx-lm's
    ``lora`` module adds one). Numbers in exponent form without a dot (``1e-4``, which YAML 1.1
    reads as a string) are floats, as people write learning rates."""

    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a document whose aliases expand past MAX_YAML_NODES values
    or refer to themselves (ConfigError without a source; callers add it)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_nodes(node, MAX_YAML_NODES)
        if size is None:
            raise ConfigError(["a YAML alias refers to a value that contains it"])
        if size > MAX_YAML_NODES:
            raise ConfigError(
                [
                    f"the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                    f"(&anchor / *alias); a config needs far fewer"
                ]
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: Union[str, os.PathLike]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
        data = safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text ({e.reason} at byte {e.start})"], str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"YAML syntax error{where}: {clip(getattr(e, 'problem', e))}"], str(path)) from None
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    except RecursionError:
        raise ConfigError(["YAML nested too deeply"], str(path)) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError([f"unreadable value: {clip(e)}"], str(path)) from None
    return data or {}


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["lora.r=16", "train.lr=1e-4"]`` into a nested dict; values are parsed as YAML."""
    out: dict = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"--set '{clip(item)}': expected section.key=value")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except ConfigError as e:
            problems.append(f"--set '{clip(key)}': {e.problems[0]}")
            continue
        except RecursionError:
            problems.append(f"--set '{clip(key)}': YAML nested too deeply")
            continue
        except (yaml.YAMLError, ValueError):  # not YAML: the text itself (a bad type is reported later)
            value = raw
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                problems.append(f"--set '{clip(item)}': '{clip(p)}' is not a section")
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


class _ListsInline(yaml.SafeDumper):
    """Block mappings with lists on one line, as a config is written by hand."""


_ListsInline.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def build(
    config_file: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    extra: Optional[dict] = None,
    check: bool = True,
    on_translate: Optional[Callable[[str], None]] = None,
) -> Config:
    """Defaults <- YAML file <- ``extra`` (CLI options) <- ``--set`` overrides, then validate.

    An mlx-lm config file (:mod:`mlx_lora.mlx_lm_config`) is translated first; ``on_translate``
    then receives the equivalent config as YAML, followed by a ``note:`` line for each difference."""
    data: dict = {}
    if config_file:
        data = load_yaml(config_file)
        if not isinstance(data, dict):
            raise ConfigError(["expected a mapping at the top level"], str(config_file))
        if is_mlx_lm_config(data):
            try:
                lines = key_lines(Path(config_file).read_text(encoding="utf-8"))
                t = translate_mlx_lm(data, methods=CHOICES["train.method"], lines=lines)
            except ConfigError as e:
                raise ConfigError(e.problems, f"{config_file} (an mlx-lm config)") from None
            data = {k: t.config[k] for k in (*SECTIONS, "out") if k in t.config}  # our order
            if on_translate is not None:
                order = {k: [f.name for f in fields(cls)] for k, cls in SECTIONS.items()}
                text = yaml.dump(
                    {k: {n: v[n] for n in order[k] if n in v} if k in order else v for k, v in data.items()},
                    Dumper=_ListsInline,
                    sort_keys=False,
                    width=120,
                ).rstrip()
                on_translate(
                    "\n".join(
                        [f"{config_file}: an mlx-lm config; the same job in mlx-lora's keys:", text]
                        + [f"note: {n}" for n in t.notes]
                    )
                )
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
        if not isinstance(value, str) or value not in choices:
            p.append(f"{key}: {show(value)} is not one of {', '.join(choices)}" + _did_you_mean(clip(value), choices))
    for key, choices in LIST_CHOICES.items():
        sec, name = key.split(".")
        for value in getattr(getattr(cfg, sec), name) or ():
            if not isinstance(value, str) or value not in choices:
                p.append(
                    f"{key}: {show(value)} is not one of {', '.join(choices)}" + _did_you_mean(clip(value), choices)
                )
    m, lo, d = cfg.model, cfg.lora, cfg.data
    if not m.path:
        p.append("model.path: required (a local folder, a Hugging Face repo id or a .gguf file)")
    if need_data and not d.path and not d.sources:
        p.append("data.path: required (a JSONL file or a folder with train.jsonl)")
    if d.sources and d.path:
        p.append("data.sources: set either data.path or data.sources, not both")

    p += config_problems(
        d.columns, d.sources, SOURCE_CHOICES["data.sources[].format"][1:], SOURCE_BOUNDS["data.sources[].weight"]
    )
    # Numbers: type, finiteness and range, in the order of BOUNDS (NaN fails every comparison, so
    # a bare "< 1" test would let it through).
    for key, bound in BOUNDS.items():
        sec, name = key.split(".")
        problem = bound.violation(getattr(getattr(cfg, sec), name))
        if problem:
            p.append(f"{key}: {problem}")
    if lo.target_modules is not None:
        if not lo.target_modules:
            p.append("lora.target_modules: empty list; leave unset for all linear layers")
        for pat in lo.target_modules:
            if not isinstance(pat, str):
                p.append(f"lora.target_modules: expected names or re: patterns, got {show(pat)}")
            elif pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    p.append(f"lora.target_modules: bad regex {show(pat)}: {e}")
    t = cfg.train
    if t.method in ("dpo", "orpo", "grpo") and d.packing:
        p.append(f"data.packing: not available with train.method {t.method} (each response is a row of its own)")
    if t.method in ("dpo", "orpo", "grpo") and t.shapes == "packed":
        p.append(
            f"train.shapes: packed is not available with train.method {t.method} (each response is a row of "
            "its own); use ladder or exact"
        )
    if (
        BOUNDS["train.dpo_label_smoothing"].violation(t.dpo_label_smoothing) is None
        and t.dpo_label_smoothing
        and (t.method != "dpo" or t.dpo_loss != "sigmoid")
    ):
        p.append("train.dpo_label_smoothing: applies to train.method dpo with train.dpo_loss sigmoid only")
    if t.dpo_precompute_ref is True and t.method != "dpo":
        p.append("train.dpo_precompute_ref: applies to train.method dpo only (orpo has no reference model)")
    p += _reward_problems(cfg)
    if lo.layers_to_transform is not None:
        index = Bound(int, -MAX_LAYER_INDEX, MAX_LAYER_INDEX - 1)
        bad = [show(i) for i in lo.layers_to_transform if index.violation(i)]
        if bad:
            p.append(
                f"lora.layers_to_transform: block indices must be integers in {index.interval()}, got "
                + clip(", ".join(bad))
            )
    if p:
        raise ConfigError(p, source)
    return cfg


def _reward_problems(cfg: Config) -> list[str]:
    """Problems of the GRPO keys: the rewards (names, weights) and what GRPO cannot combine with."""
    t, p = cfg.train, []
    if t.method != "grpo":
        for key in ("reward", "rewards"):
            if getattr(t, key) is not None:
                p.append(f"train.{key}: applies to train.method grpo only")
        return p
    if t.reward is not None and t.rewards is not None:
        p.append("train.reward: set either train.reward or train.rewards, not both")
    if t.reward is None and not t.rewards:
        p.append(
            "train.reward: required with train.method grpo (e.g. number; or train.rewards: {number: 1.0, format: 0.2})"
        )
    if t.reward is not None:
        problem = rewards_mod.name_problem(t.reward)
        if problem:
            p.append(f"train.reward: {problem}")
    if t.rewards is not None:
        if not isinstance(t.rewards, dict) or not t.rewards:
            p.append(f"train.rewards: expected a mapping of reward names to weights, got {show(t.rewards)}")
        else:
            weight = Bound(float, -1e6, 1e6)
            for name, w in t.rewards.items():
                problem = rewards_mod.name_problem(name)
                if problem:
                    p.append(f"train.rewards: {problem}")
                bad = weight.violation(w)
                if bad:
                    p.append(f"train.rewards.{clip(str(name))}: weight {bad}")
    if cfg.data.sources:
        p.append("data.sources: mixing sources is not available with train.method grpo; use data.path")
    if (
        BOUNDS["train.max_completion_length"].violation(t.max_completion_length) is None
        and isinstance(cfg.data.max_seq_length, int)
        and t.max_completion_length >= cfg.data.max_seq_length
    ):
        p.append(
            f"train.max_completion_length: must be < data.max_seq_length ({cfg.data.max_seq_length}), which "
            f"holds the prompt and the completion, got {t.max_completion_length}"
        )
    return p


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
