"""Numeric verification of exported files: reload what was written and compare logits.

For every prompt, both models score every position; per position ``p``:

    top-1 agreement    = mean_p [argmax ref_p == argmax test_p]
    relative error e_p = max_v |test_p,v - ref_p,v| / (max_v ref_p,v - min_v ref_p,v)

The relative error is normalised by the spread of the reference logits at that position, so it
means the same for a random tiny model (logits near 0) and a trained one. Each export type has a
threshold (:data:`THRESHOLDS`) on the top-1 agreement and on the typical error, the 90th
percentile of ``e_p`` over positions; beyond them the export fails loudly. The worst position is
reported too but not judged: a wrong file (tensor, layout, scale, rope) is wrong at nearly every
position, while correct rounding can be amplified at a single sensitive position (measured: an
f16 fine-tune of SmolLM2-135M at 1.5e-2 on one position of 89, under 3e-3 at all others).

GGUF files are read back without llama.cpp: the tensors are dequantized with the gguf package
(``gguf.quants.dequantize``), mapped back to Hugging Face names, loaded into the mlx-lm model
of the same architecture and run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.converters.gguf_arch import TensorNames, arch_spec, from_gguf
from mlx_lora.converters.gguf_import import read_gguf as parse
from mlx_lora.converters.gguf_tokenizer import build_tokenizer
from mlx_lora.data.templates import apply_chat_template
from mlx_lora.inference.generation import encode
from mlx_lora.plumbing.errors import ExportError
from mlx_lora.plumbing.mlx_lm_compat import model_classes as _get_classes

VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers such as 17, 42, 256 and 1024 appear in the answers.",
)
CHAT_PROMPT = "What is the code word for the red apple?"


@dataclass(frozen=True)
class Threshold:
    rel_error: float
    """Limit on the typical (90th-percentile position's) relative error."""
    min_top1: float


PERCENTILE = 90


# Calibrated on SmolLM2-135M with a trained LoRA (the worst case: small models lose the most to
# quantization) and on the tiny test models: float formats only round (f16 ~1e-3, bf16 ~1e-2),
# q8_0 reached 0.023 / 99% top-1, q5_0 0.17 / 88%, q4_k_m 0.29 / 84%, q4_0 0.39 / 62%. A broken
# file (wrong tensor, layout or scale) gives errors above 1 and near-random top-1. Exceeding the
# limit at 4-5 bits can also be real information: the rounding is larger than the fine-tune's
# change, so the file behaves like the base model again.
THRESHOLDS: dict[str, Threshold] = {
    "f32": Threshold(1e-4, 1.0),
    "f16": Threshold(2e-2, 0.9),
    "bf16": Threshold(6e-2, 0.8),
    "q8_0": Threshold(6e-2, 0.8),
    "q6_k": Threshold(0.15, 0.7),
    "q5_0": Threshold(0.3, 0.6),
    "q5_1": Threshold(0.3, 0.6),
    "q5_k_m": Threshold(0.3, 0.6),
    "q4_0": Threshold(0.5, 0.5),
    "q4_1": Threshold(0.5, 0.5),
    "q4_k_m": Threshold(0.5, 0.5),
}
DTYPE_KIND = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class Comparison:
    what: str
    kind: str
    positions: int
    top1_agreement: float
    max_rel_error: float
    threshold: Threshold
    typical_rel_error: float = math.nan
    """The 90th-percentile position's relative error (the judged one)."""

    @property
    def ok(self) -> bool:
        return self.typical_rel_error <= self.threshold.rel_error and self.top1_agreement >= self.threshold.min_top1

    def line(self) -> str:
        mark = "ok" if self.ok else "FAILED"
        # Each limit sits next to the statistic it judges; the worst position is shown, not judged.
        return (
            f"verify {self.what} [{self.kind}]: top-1 agreement {self.top1_agreement:.1%} over "
            f"{self.positions} positions (needs >= {self.threshold.min_top1:.0%}), relative logit error "
            f"{self.typical_rel_error:.2e} at the {PERCENTILE}th-percentile position (needs <= "
            f"{self.threshold.rel_error:.2g}); {self.max_rel_error:.2e} at the worst position (shown, not "
            f"judged): {mark}"
        )


@dataclass
class VerifyReport:
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    def lines(self) -> list[str]:
        return [c.line() for c in self.comparisons] + self.notes + [f"verify FAILED: {p}" for p in self.problems]

    def raise_if_failed(self, target: str, hint: str = "") -> None:
        if not self.ok:
            raise ExportError(
                f"verification of {target} failed; nothing was written:\n  "
                + "\n  ".join(self.lines())
                + (f"\n{hint}" if hint else "")
                + "\n(pass --no-verify to write it anyway)"
            )


# ---------------------------------------------------------------------------------------------
# Logits


def prompts(tokenizer, max_tokens: int = 48) -> list[list[int]]:
    """Token ids of the verification prompts (plain texts, plus a chat turn when the tokenizer
    has a template), each cut to ``max_tokens``."""
    out = [list(tokenizer.encode(t))[:max_tokens] for t in VERIFY_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = apply_chat_template(
                tokenizer, [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True
            )
            ids = encode(tokenizer, text)
            out.append(list(ids)[:max_tokens])
        except Exception:
            pass
    return [p for p in out if p]


def logits(model, token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """float32 logits [T, vocab] of ``model`` for each token list."""

    out = []
    for toks in token_lists:
        y = model(mx.array([list(toks)]))
        out.append(np.array(y[0].astype(mx.float32)))
    return out


def position_errors(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """(top-1 agreement, relative error of every position); see the module docstring."""
    agree, errs = 0, []
    for r, t in zip(ref, test):
        if r.shape != t.shape:
            raise ExportError(f"logit shapes differ: {r.shape} vs {t.shape}")
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        spread = np.maximum(r.max(-1) - r.min(-1), 1e-12)
        err = np.abs(t - r).max(-1) / spread
        errs.append(np.where(np.isfinite(err), err, math.inf))
    errs = np.concatenate(errs) if errs else np.zeros(0)
    return agree / max(len(errs), 1), errs


def compare(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> tuple[float, float, int]:
    """(top-1 agreement, max relative error, positions); see the module docstring."""
    top1, errs = position_errors(ref, test)
    return top1, float(errs.max()) if len(errs) else 0.0, len(errs)


def compare_models(ref_logits: Sequence[np.ndarray], model, token_lists, what: str, kind: str) -> Comparison:
    top1, errs = position_errors(ref_logits, logits(model, token_lists))
    typical = float(np.percentile(errs, PERCENTILE)) if len(errs) else 0.0
    if not np.isfinite(errs).all():
        typical = math.inf  # a non-finite logit anywhere is a broken file
    return Comparison(what, kind, len(errs), top1, float(errs.max()) if len(errs) else 0.0, THRESHOLDS[kind], typical)


# ---------------------------------------------------------------------------------------------
# Reading GGUF back


def read_gguf(path) -> tuple[dict, dict[str, tuple[int, tuple[int, ...], np.ndarray]]]:
    """(metadata, {name: (ggml type id, numpy shape, raw bytes as uint8 rows)})."""

    gf = parse(Path(path))
    return gf.metadata, {n: (t.ggml_type, t.shape, gf.raw(t)) for n, t in gf.tensors.items()}


def dequantize(type_id: int, shape: tuple[int, ...], raw: np.ndarray) -> np.ndarray:
    """float32 values of one GGUF tensor in numpy order."""

    qtype = gguf.GGMLQuantizationType(type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)


def model_from_gguf(path, config: dict):
    """The mlx-lm model for ``config`` with weights read back from the GGUF file ``path``
    (float32). Returns (model, metadata)."""

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    spec = arch_spec(config["model_type"])
    meta, tensors = read_gguf(path)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    names = TensorNames(spec, int(config["num_hidden_layers"]))
    weights, used = [], set()
    for hf_name, p in tree_flatten(model.parameters()):
        g = names.gguf_name(hf_name)
        if g not in tensors and hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # a head built before loading (gemma3_text); its sanitize below drops it
        if g not in tensors:
            raise ExportError(f"{path}: tensor '{g}' (for {hf_name}) is missing")
        type_id, shape, raw = tensors[g]
        if tuple(shape) != tuple(p.shape):
            raise ExportError(f"{path}: tensor '{g}' has shape {list(shape)}, the model expects {list(p.shape)}")
        w = from_gguf(spec, config, hf_name, dequantize(type_id, shape, raw))
        weights.append((hf_name, mx.array(w)))
        used.add(g)
    extra = sorted(set(tensors) - used - set(spec.extra_tensor_names))
    if extra:
        raise ExportError(f"{path}: unexpected tensors {extra[:8]}")
    if hasattr(model, "sanitize"):  # as mlx-lm's loader does (a tied head is dropped here)
        weights = list(model.sanitize(dict(weights)).items())
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, meta


def check_gguf_tokenizer(meta: dict, hf_tokenizer, texts: Sequence[str] = VERIFY_TEXTS) -> tuple[list[str], list[str]]:
    """Rebuild the tokenizer from the GGUF metadata and compare its token ids with the source
    tokenizer on ``texts``; returns (notes, problems)."""

    try:
        tok = build_tokenizer(meta, "exported GGUF")
    except ExportError:
        raise
    except Exception as e:
        return [], [f"the GGUF tokenizer metadata cannot be rebuilt into a tokenizer: {e}"]
    inner = getattr(hf_tokenizer, "_tokenizer", hf_tokenizer)
    bad = []
    for text in texts:
        want = list(inner.encode(text, add_special_tokens=False))
        got = tok.encode(text, add_special_tokens=False).ids
        if want != got:
            bad.append(f"tokenizer mismatch on {text!r}: source {want[:12]}..., GGUF {got[:12]}...")
    if bad:
        return [], bad
    return [f"verify tokenizer: GGUF vocabulary encodes the {len(texts)} check texts exactly as the source"], []
