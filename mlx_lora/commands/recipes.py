"""Recipes: ready-made fine-tuning jobs (a YAML config each, plus scripts) and the bundled demo data.

The recipes live in the repository's ``recipes/`` folder, which a wheel installs as
``mlx_lora/recipes_data/``, so ``mlx-lora recipes list|show|copy`` works from a wheel too.
A recipe's header comment starts with the exact command that runs it, followed by a one-line
description and ``key: value`` lines (task, model, data, prepare, memory, fits, demo); the
first line that is not a comment ends the header.

Memory. :func:`estimate_peak_memory` is a model of what one training step keeps alive:

    weights      P * bits / 8, quantized layers + 32 bits (a 16-bit scale and bias) per group of 64
    adapter      16 bytes per LoRA parameter (float32 weight, gradient, two AdamW moments)
    activations  per layer and token, c bytes each: 8 h + 3 kv + 4 i values kept for the backward
                 pass, plus 2 a L attention scores and probabilities (the attention matrix is
                 materialized in the backward pass); with attention checkpointing the scores of
                 one layer at a time; with gradient checkpointing only the block input (h values)
                 per layer, plus one block's full set while it is recomputed
    logits       N V (c + 12) bytes for N token rows: the logits, their float32 copy, log-softmax
                 and gradient. N = B L with the plain loss; with the chunked loss (chunk of C
                 tokens) two chunks are alive at a time, N = min(B L, 2 C), plus the B L h c
                 bytes of the hidden-state gradient it keeps
    runtime      0.4 GB (framework, compiled graphs, allocator slack)

with h, i, kv (key/value width), a (heads), V (vocabulary) from the model's config, batch B,
sequence length L and c = 2 bytes (bfloat16 on Metal and CUDA) or 4 (float32 on a CPU). It
matches the peak MLX reports for SmolLM2-135M on a CPU within the tolerance in the tests; it is
conservative where a backend has a fused attention backward pass.
"""

from __future__ import annotations

import difflib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

from mlx_lora.config import TrainConfig
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.io import atomic_path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# An installed package holds the recipes as mlx_lora/recipes_data (mapped from recipes/ at build
# time); a source checkout or editable install reads the repository's recipes/ folder itself.
RECIPES_DIR = next(
    (d for d in (PACKAGE_DIR / "recipes_data", PACKAGE_DIR.parent / "recipes") if d.is_dir()),
    PACKAGE_DIR / "recipes_data",
)
DEMO_DIR = PACKAGE_DIR / "demo_data"
# Bundled demo data sets: name -> path relative to DEMO_DIR.
DEMO_DATA = {
    "triage": "triage",
    "instruct": "instruct.jsonl",
    "chat": "chat.jsonl",
    "summarize": "summarize.jsonl",
    "code": "code.jsonl",
    "text": "text.jsonl",
    "preference": "preference.jsonl",
    "arithmetic": "arithmetic",
}
HEADER_KEYS = ("task", "model", "data", "prepare", "memory", "fits", "demo")
SCRIPT_SUFFIXES = (".py",)
SHIPPED_SCRIPTS = ("train_fuse_export.py", "prepare_data.py")
"""The recipe scripts (the folder's other scripts maintain the recipes and demo data)."""
MAC_SIZES_GB = (8, 16, 24, 32, 48, 64, 96, 128, 192)
MAC_USABLE_FRACTION = 0.7
"""Share of a Mac's unified memory that training may use: macOS caps what the GPU may wire at
roughly two thirds to three quarters of RAM, and the system needs the rest."""


class RecipeError(MlxLoraError):
    """An unknown recipe or a recipe file that breaks the header rules."""


# ---------------------------------------------------------------------------------------------
# finding and reading recipes


@dataclass
class Recipe:
    name: str
    path: Path
    kind: str  # "config" (YAML) or "script" (Python)
    command: str  # the exact command from the first header line
    description: str
    fields: dict = field(default_factory=dict)  # header key -> value

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


def _header_lines(text: str) -> list[str]:
    """The comment lines at the top of a YAML file, or of a script's leading docstring-free
    comment block (after an optional shebang), without their '#'."""
    out = []
    for i, line in enumerate(text.splitlines()):
        if i == 0 and line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


_KEY_LINE = re.compile(r"^([a-z]+):\s+(.*)$")


def parse_header(text: str, path: Path) -> tuple[str, str, dict]:
    """(command, description, {key: value}) from a recipe's header comment."""
    lines = _header_lines(text)
    if not lines or not lines[0]:
        raise RecipeError(f"{path}: line 1: the header must start with the command that runs the recipe")
    command = lines[0]
    description, fields = "", {}
    for number, line in enumerate(lines[1:], start=2):
        m = _KEY_LINE.match(line)
        if m and m.group(1) in HEADER_KEYS:
            if m.group(1) in fields:
                raise RecipeError(f"{path}: line {number}: header key '{m.group(1)}' repeated")
            fields[m.group(1)] = m.group(2).strip()
        elif line and not description and not fields:
            description = line
    if not description:
        raise RecipeError(f"{path}: the header needs a one-line description after the command")
    return command, description, fields


def read_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read ({e})") from None
    command, description, fields = parse_header(text, path)
    kind = "script" if path.suffix in SCRIPT_SUFFIXES else "config"
    return Recipe(path.stem, path, kind, command, description, fields)


def recipe_files(folder: Optional[Path] = None) -> list[Path]:
    folder = Path(folder) if folder is not None else RECIPES_DIR
    if not folder.is_dir():
        raise RecipeError(f"{folder}: recipes folder missing (a broken installation?)")
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".yaml" or p.name in SHIPPED_SCRIPTS))


def list_recipes(folder: Optional[Path] = None) -> list[Recipe]:
    return [read_recipe(p) for p in recipe_files(folder)]


def get_recipe(name: str, folder: Optional[Path] = None) -> Recipe:
    """The recipe called ``name`` (with or without .yaml / .py)."""
    files = recipe_files(folder)
    by_name = {p.stem: p for p in files} | {p.name: p for p in files}
    if name not in by_name:
        close = difflib.get_close_matches(name, [p.stem for p in files], n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"no recipe named '{name}'{hint}; `mlx-lora recipes list` shows them all")
    return read_recipe(by_name[name])


def copy_recipe(name: str, dest, overwrite: bool = False) -> Path:
    """Copy recipe ``name`` to ``dest`` (a file, or a folder to put it in); returns the new file."""

    recipe = get_recipe(name)
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / recipe.path.name
    if dest.exists() and not overwrite:
        raise RecipeError(f"{dest} already exists (pass --force to replace it)")
    with atomic_path(dest) as tmp:
        shutil.copyfile(recipe.path, tmp)
    return dest


def demo_data(name: str) -> Path:
    """Path of bundled demo data set ``name`` (a JSONL file, or a folder with train/valid/test)."""
    if name not in DEMO_DATA:
        close = difflib.get_close_matches(name, list(DEMO_DATA), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"no demo data set named '{name}'{hint}; choose one of {', '.join(DEMO_DATA)}")
    path = DEMO_DIR / DEMO_DATA[name]
    if not path.exists():
        raise RecipeError(f"{path}: bundled demo data missing (a broken installation?)")
    return path


# ---------------------------------------------------------------------------------------------
# memory


@dataclass(frozen=True)
class ModelShape:
    """The config.json facts that decide memory use."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: Optional[int] = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one block."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        """Weights of the linear layers and embeddings (norms and biases are < 0.1% and left out)."""
        return self.layers * self.block_params + self.embed_params

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        text = cfg.get("text_config", cfg)
        return cls(
            hidden=text["hidden_size"],
            layers=text["num_hidden_layers"],
            intermediate=text["intermediate_size"],
            heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            vocab=text["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            head_dim=text.get("head_dim"),
        )


# Published config.json values of the models the recipes and the memory table name.
KNOWN_MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": (ModelShape(576, 30, 1536, 9, 3, 49152, True), 16),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (ModelShape(960, 32, 2560, 15, 5, 49152, True), 16),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (ModelShape(2048, 24, 8192, 32, 32, 49152, True), 16),
    "Qwen/Qwen2.5-0.5B": (ModelShape(896, 24, 4864, 14, 2, 151936, True), 16),
    "Qwen/Qwen2.5-0.5B-Instruct": (ModelShape(896, 24, 4864, 14, 2, 151936, True), 16),
    "Qwen/Qwen2.5-1.5B": (ModelShape(1536, 28, 8960, 12, 2, 151936, True), 16),
    "Qwen/Qwen2.5-1.5B-Instruct": (ModelShape(1536, 28, 8960, 12, 2, 151936, True), 16),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": (ModelShape(1536, 28, 8960, 12, 2, 151936, True), 16),
    "Qwen/Qwen2.5-3B-Instruct": (ModelShape(2048, 36, 11008, 16, 2, 151936, True), 16),
    "Qwen/Qwen2.5-7B-Instruct": (ModelShape(3584, 28, 18944, 28, 4, 152064, False), 16),
    "mlx-community/Qwen2.5-7B-Instruct-4bit": (ModelShape(3584, 28, 18944, 28, 4, 152064, False), 4),
    "Qwen/Qwen2.5-14B-Instruct": (ModelShape(5120, 48, 13824, 40, 8, 152064, False), 16),
    "meta-llama/Llama-3.2-1B-Instruct": (ModelShape(2048, 16, 8192, 32, 8, 128256, True), 16),
    "meta-llama/Llama-3.2-3B-Instruct": (ModelShape(3072, 28, 8192, 24, 8, 128256, True), 16),
    "meta-llama/Llama-3.1-8B-Instruct": (ModelShape(4096, 32, 14336, 32, 8, 128256, False), 16),
    "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit": (ModelShape(4096, 32, 14336, 32, 8, 128256, False), 4),
    "mistralai/Mistral-7B-Instruct-v0.3": (ModelShape(4096, 32, 14336, 32, 8, 32768, False), 16),
}
RUNTIME_BYTES = 0.4e9
QUANT_GROUP = 64


@dataclass
class MemoryEstimate:
    weights: float
    adapter: float
    activations: float
    logits: float
    runtime: float = RUNTIME_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits + self.runtime

    def gb(self) -> float:
        return self.total / 1e9


def estimate_peak_memory(
    shape: ModelShape,
    *,
    bits: int = 16,
    seq_len: int = 2048,
    batch: int = 1,
    r: int = 8,
    grad_checkpoint: bool = False,
    checkpoint_attention: bool = False,
    loss_chunk_tokens: Optional[int] = None,
    compute_bytes: int = 2,
    lora_layers: Optional[int] = None,
    weight_bytes: Optional[float] = None,
) -> MemoryEstimate:
    """Peak memory of one training step (see the module docstring for the model).

    ``bits``: 16 for float weights (stored in ``weight_bytes``, default ``compute_bytes``), else the
    quantization bits. ``lora_layers``: blocks with adapters (default all).
    """
    h, L, B, c = shape.hidden, seq_len, batch, compute_bytes
    if bits >= 16:
        per_weight = weight_bytes if weight_bytes is not None else c
    else:
        per_weight = (bits + 32 / QUANT_GROUP) / 8
    weights = shape.params * per_weight
    n_lora = lora_layers if lora_layers is not None else shape.layers
    adapter = 16 * shape.lora_params(r) * n_lora / shape.layers
    kv = shape.kv_heads * shape.hd
    kept = B * L * c * (8 * h + 3 * kv + 4 * shape.intermediate)  # one block, without attention scores
    scores = B * L * c * 2 * shape.heads * L  # one block's scores + probabilities
    if grad_checkpoint:
        activations = shape.layers * B * L * h * c + kept + scores
    elif checkpoint_attention:
        activations = shape.layers * kept + scores
    else:
        activations = shape.layers * (kept + scores)
    tokens = B * L
    if loss_chunk_tokens:
        logits = min(tokens, 2 * loss_chunk_tokens) * shape.vocab * (c + 12) + tokens * h * c
    else:
        logits = tokens * shape.vocab * (c + 12)
    return MemoryEstimate(weights, adapter, activations, logits)


def smallest_mac(gb: float) -> Optional[int]:
    """The smallest common Mac memory size (GB) whose usable share holds ``gb``; None if none does."""
    for size in MAC_SIZES_GB:
        if gb <= size * MAC_USABLE_FRACTION:
            return size
    return None


def estimate_for_config(
    cfg, shape: Optional[ModelShape] = None, bits: Optional[int] = None, compute_bytes: int = 2
) -> Optional[MemoryEstimate]:
    """Estimate for a training :class:`~mlx_lora.config.Config` whose model is in
    :data:`KNOWN_MODELS` (or whose ``shape``/``bits`` are given); None when the model is unknown."""
    if shape is None:
        known = KNOWN_MODELS.get(cfg.model.path or "")
        if known is None:
            return None
        shape, known_bits = known
        bits = bits or known_bits
    layers = cfg.lora.layers_to_transform
    t = cfg.train
    # GRPO updates on group_size completions of each prompt (the sampling phase's KV cache is smaller)
    rows = t.batch_size * (t.group_size if getattr(t, "method", "sft") == "grpo" else 1)
    return estimate_peak_memory(
        shape,
        bits=bits or 16,
        seq_len=cfg.data.max_seq_length,
        batch=rows,
        r=cfg.lora.r,
        grad_checkpoint=t.grad_checkpoint,
        checkpoint_attention=getattr(t, "checkpoint_attention", False),
        loss_chunk_tokens=getattr(t, "loss_chunk_tokens", None),
        compute_bytes=compute_bytes,
        lora_layers=len(layers) if layers else None,
    )


def memory_text(est: MemoryEstimate) -> tuple[str, str]:
    """The header's (memory, fits) values for an estimate."""
    gb = est.gb()
    mac = smallest_mac(gb)
    return f"~{gb:.1f} GB peak (estimated, bfloat16 compute)", (f"{mac} GB Mac" if mac else "no single Mac")


# ---------------------------------------------------------------------------------------------
# CLI


def _truncate(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


@click.group(name="recipes")
def recipes_group():
    """Ready-made fine-tuning jobs: list, show and copy them; find the bundled demo data.

    \b
    mlx-lora recipes list
    mlx-lora recipes show chat-sft
    mlx-lora recipes copy chat-sft my.yaml
    mlx-lora train --config my.yaml --set data.path=$(mlx-lora recipes data chat)
    """


def list_lines(recipes: list[Recipe], width: int) -> list[str]:
    """``recipes list`` laid out in ``width`` columns (at least 60): the training configs as a table
    (name, model, memory, fits) with each one's task and description on the line below, then the
    scripts with their descriptions. Nothing is wider than ``width``; ``recipes show`` has it all."""
    width = max(60, width)
    configs = [r for r in recipes if r.kind == "config"]
    scripts = [r for r in recipes if r.kind != "config"]
    out: list[str] = []
    if configs:
        rows = [
            (
                r.name,
                r.get("model", "-"),
                r.get("memory", "-").split(" (")[0].removesuffix(" peak").lstrip("~"),
                r.get("fits", "-"),
            )
            for r in configs
        ]
        head = ("recipe", "model", "memory", "fits")
        fixed = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in (0, 2, 3)]
        model_w = max(len(head[1]), min(max(len(row[1]) for row in rows), width - sum(fixed) - 6))
        widths = [fixed[0], model_w, fixed[1], fixed[2]]

        def fmt(cells) -> str:
            return "  ".join(_truncate(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()

        out.append(fmt(head))
        for r, row in zip(configs, rows):
            out.append(fmt(row))
            out.append(_truncate(f"    {r.get('task', r.kind)}: {r.description}", width))
        out.append(_truncate("  memory: estimated peak with bfloat16 compute (Metal/CUDA)", width))
        out.append(_truncate("  copy one to edit and run it: mlx-lora recipes copy NAME my.yaml", width))
    if scripts:
        out.append("")
        name_w = max(len("script"), *(len(r.name) for r in scripts))
        out.append("script")
        for r in scripts:
            out.append(_truncate(f"{r.name.ljust(name_w)}  {r.description}", width))
        out.append(_truncate("  copy one to run it: mlx-lora recipes copy NAME . && python NAME.py --help", width))
    return out


@recipes_group.command(name="list")
def list_command():
    """Training recipes (name, model, estimated peak memory, task and description) and scripts,
    fitted to the terminal's width."""

    width = shutil.get_terminal_size((80, 24)).columns
    for line in list_lines(list_recipes(), width):
        click.echo(line)


@recipes_group.command(name="show")
@click.argument("name")
def show_command(name):
    """Print a recipe (YAML config or script) exactly as shipped."""
    click.echo(get_recipe(name).path.read_text(encoding="utf-8"), nl=False)


@recipes_group.command(name="copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def copy_command(name, dest, force):
    """Copy recipe NAME to DEST (a file name, or a folder) to edit it."""
    out = copy_recipe(name, dest, overwrite=force)
    recipe = get_recipe(name)
    click.echo(f"wrote {out}")
    if recipe.kind == "config":
        click.echo(f"run it with: mlx-lora train --config {out}")


@recipes_group.command(name="data")
@click.argument("name", required=False)
def data_command(name):
    """Print the path of bundled demo data set NAME (all of them without NAME)."""
    if name:
        click.echo(str(demo_data(name)))
        return
    for key in DEMO_DATA:
        click.echo(f"{key:<10} {demo_data(key)}")


# ---------------------------------------------------------------------------------------------
# the README's "fits my Mac?" table

TABLE_MODELS = (
    ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
    ("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
    ("Mistral-7B", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
    ("Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"),
)
TABLE_LENGTHS = (512, 2048, 8192)


def memory_table_markdown(r: int = 16, grad_checkpoint: bool = True) -> str:
    """Estimated peak memory (bfloat16 compute, batch 1, LoRA rank ``r`` on every linear layer,
    the trainer's default loss) per model, weight precision and sequence length, with the smallest
    Mac it fits."""

    chunk = getattr(TrainConfig(), "loss_chunk_tokens", None)
    lines = [
        "| model | weights | " + " | ".join(f"{n} tokens" for n in TABLE_LENGTHS) + " |",
        "|---|---|" + "---|" * len(TABLE_LENGTHS),
    ]
    for label, key in TABLE_MODELS:
        shape = KNOWN_MODELS[key][0]
        for bits, name in ((16, "bf16"), (8, "8-bit"), (4, "4-bit")):
            cells = []
            for n in TABLE_LENGTHS:
                gb = estimate_peak_memory(
                    shape, bits=bits, seq_len=n, r=r, grad_checkpoint=grad_checkpoint, loss_chunk_tokens=chunk
                ).gb()
                mac = smallest_mac(gb)
                cells.append(f"{gb:.1f} GB ({mac} GB)" if mac else f"{gb:.1f} GB (none)")
            lines.append(f"| {label} ({shape.params / 1e9:.2f}B) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
