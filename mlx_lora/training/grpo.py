"""GRPO: group relative policy optimisation (Shao et al. 2024, arXiv:2402.03300) with verifiable
rewards, as TRL's ``GRPOTrainer`` defines it, run by the trainer's one compiled step.

Each step takes ``batch_size x grad_accum`` prompts per rank. For every prompt ``x`` it samples a
group of ``G = train.group_size`` completions ``y_1..y_G`` from the current policy (one batched
call per group, :func:`sample_group`, at ``train.temperature``, at most
``train.max_completion_length`` tokens), scores each with the reward functions
(:mod:`mlx_lora.training.rewards`; weighted sum ``r_i``) and uses the group-normalised reward as every
token's advantage:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (std with Bessel's correction, as torch.std;
                                                    train.grpo_scale_rewards: false drops it)

With ``pi`` the policy's and ``pi_old`` the sampling policy's per-token probabilities,
``rho_t = pi(y_t) / pi_old(y_t)`` and ``pi_ref`` the reference (the same model with its adapter
off, :func:`mlx_lora.model.lora.adapters_off`: no second copy), the per-token loss is

    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator, >= 0)

(``beta KL_t`` becomes ``beta rho_t KL_t`` with ``train.grpo_kl_bias_correction``, TRL's
``use_bias_correction_kl``; ``eps = train.epsilon``, ``eps_high = train.epsilon_high`` or
``eps``; ``beta = train.grpo_beta``; the KL term and the reference pass are skipped when beta
is 0). The completion tokens (``m_t``, EOS included when it was sampled) are reduced as TRL's ``loss_type``:

- ``grpo``: ``sum_i (sum_t m_t l_t / sum_t m_t) / n_completions`` (each completion's mean);
- ``bnpo``: ``sum_{i,t} m_t l_t / sum_{i,t} m_t`` (mean over the batch's tokens);
- ``dr_grpo``: ``sum_{i,t} m_t l_t / (n_completions * max_completion_length)`` (Liu et al. 2025,
  arXiv:2503.20783; use it with ``grpo_scale_rewards: false``, as they do).

Each micro-batch returns ``(sum of the numerator, its share of the denominator, statistics)`` and
the trainer divides once by the whole step's denominator (all micro-batches and ranks), so
accumulation and data parallelism take the step one large batch would (``bnpo``'s token count is
the global batch's, where TRL normalises per device). One optimizer update follows each sampling,
so ``pi_old`` is the policy itself (detached): ``rho = 1`` and the clipping bounds the update's
gradient only through ``A`` (as in TRL with ``num_iterations: 1``); :func:`token_loss` takes
``pi_old`` explicitly.

Sampling draws from a random key derived from ``(train.seed, step, prompt index)`` alone: a
resumed run samples exactly what the uninterrupted run did, for any number of ranks, without
storing generator state in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.config import Config, DataConfig, TrainConfig
from mlx_lora.data.batching import PAD_MULTIPLE, Batch
from mlx_lora.data.examples import DataSplits, DataStats, TokenizedDataset, _Encoder, read_jsonl_rows, split_rows
from mlx_lora.data.formats import chat_messages, check_unicode, one_line, tname
from mlx_lora.data.sources import is_datasets_source, map_jsonl_rows, open_source
from mlx_lora.data.templates import TemplateLimitError, resolve_chat_template
from mlx_lora.inference.evaluation import eos_ids, generate_tokens
from mlx_lora.model.lora import adapters_off
from mlx_lora.plumbing.errors import DataError
from mlx_lora.plumbing.mlx_lm_compat import batch_kv_cache
from mlx_lora.training import rewards as R
from mlx_lora.training.losses import Loss, _cache, _token_ce, make_loss, model_logits, split_head, target_positions
from mlx_lora.training.preference import _fused_head_logp

log = logging.getLogger(__name__)

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)
STATS = ("kl", "tokens", "clipped_low", "clipped_high", "completions")
"""What the loss sums over a micro-batch, in the order of its statistics vector."""


@dataclass(frozen=True)
class Objective:
    """GRPO's constants (from ``train.*``)."""

    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    max_completion_length: int = 256
    scale_rewards: bool = True
    kl_bias_correction: bool = False

    @classmethod
    def from_config(cls, t: TrainConfig) -> "Objective":
        return cls(
            t.grpo_loss,
            t.grpo_beta,
            t.epsilon,
            t.epsilon_high,
            t.max_completion_length,
            t.grpo_scale_rewards,
            t.grpo_kl_bias_correction,
        )

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ----------------------------------------------------------------------------------------------
# the math


def advantages(rewards: np.ndarray, group_size: int, scale: bool = True) -> np.ndarray:
    """Group-normalised advantages of ``rewards`` [n_groups * G] (groups consecutive)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale:
        std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(adv[:, :1])
        adv = adv / (std + STD_EPS)
    return adv.reshape(-1).astype(np.float32)


def token_loss(
    obj: Objective,
    logps: mx.array,
    mask: mx.array,
    adv: mx.array,
    old_logps: Optional[mx.array] = None,
    ref_logps: Optional[mx.array] = None,
):
    """(numerator, denominator, statistics [len(STATS)]) of the GRPO loss of completions with
    per-token log-probs ``logps`` [B, T], completion mask ``mask`` [B, T] and advantages
    ``adv`` [B]; the loss is numerator / denominator (see the module docstring)."""
    mask = mask.astype(mx.float32)
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    ratio = mx.exp(logps - old)
    a = adv[:, None]
    clipped = mx.clip(ratio, 1.0 - obj.epsilon, 1.0 + obj.eps_high)
    per_token = -mx.minimum(ratio * a, clipped * a)
    kl = mx.zeros_like(per_token)
    if obj.beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_beta > 0 needs the reference model's log-probs")
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1.0
        per_token = per_token + obj.beta * (kl * ratio if obj.kl_bias_correction else kl)
    counts = mask.sum(axis=-1)
    B = logps.shape[0]
    if obj.loss_type == "grpo":
        num = ((per_token * mask).sum(axis=-1) / mx.maximum(counts, 1.0)).sum()
        den = mx.array(float(B))
    elif obj.loss_type == "bnpo":
        num, den = (per_token * mask).sum(), counts.sum()
    else:  # dr_grpo
        num, den = (per_token * mask).sum(), mx.array(float(B * obj.max_completion_length))
    low = ((ratio < 1.0 - obj.epsilon) & (a < 0)).astype(mx.float32)
    high = ((ratio > 1.0 + obj.eps_high) & (a > 0)).astype(mx.float32)
    stats = mx.stack([(kl * mask).sum(), counts.sum(), (low * mask).sum(), (high * mask).sum(), mx.array(float(B))])
    return num, den, mx.stop_gradient(stats)


class TokenLogps:
    """Per-token log-probs ``[B, L]`` of a batch's targets (0 off the target positions), through
    the chunked output layer when ``split`` is given (only target positions get logits)."""

    def __init__(self, split, chunk_tokens: Optional[int]):
        self.split, self.chunk = split, chunk_tokens
        self.fused = _fused_head_logp(split.head, chunk_tokens) if split is not None else None

    def __call__(self, model, inputs, targets, mask, attn=None, positions=None) -> mx.array:
        mask = mask.astype(mx.float32)
        if self.split is None:
            return -_token_ce(model_logits(model, inputs, attn), targets) * mask
        B, L = inputs.shape
        h = self.split.body(inputs, _cache(model, attn))
        h = h.reshape(-1, h.shape[-1])
        if positions is None:
            positions = target_positions(np.asarray(mask))
        valid = positions >= 0
        idx = mx.where(valid, positions, 0)
        lp = self.fused(h[idx], targets.reshape(-1)[idx])[0] * valid
        return mx.zeros((B * L,), mx.float32).at[idx].add(lp).reshape(B, L) * mask


def grpo_loss(model: nn.Module, obj: Objective, chunk_tokens: Optional[int]) -> Loss:
    """The :class:`~mlx_lora.training.losses.Loss` of ``obj``: its ``train`` takes the advantages of the
    rows [B] as its last argument (after the target positions when the output layer is chunked)."""
    base = make_loss(model, chunk_tokens)
    tl = TokenLogps(split_head(model) if base.chunk_tokens is not None else None, base.chunk_tokens)

    def objective(model, inputs, targets, mask, attn, positions, adv):
        logps = tl(model, inputs, targets, mask, attn, positions)
        ref = None
        if obj.beta != 0.0:
            with adapters_off(model):
                ref = mx.stop_gradient(tl(model, inputs, targets, mask, attn, positions))
        return token_loss(obj, logps, mask, adv, None, ref)

    if base.chunk_tokens is not None:

        def train(model, inputs, targets, mask, attn=None, positions=None, adv=None):
            return objective(model, inputs, targets, mask, attn, positions, adv)
    else:

        def train(model, inputs, targets, mask, attn=None, adv=None):
            return objective(model, inputs, targets, mask, attn, None, adv)

    def evaluate(model, inputs, targets, mask, attn=None):
        raise NotImplementedError("GRPO evaluates by generation (GRPOMethod.evaluate)")

    return Loss(train, evaluate, base.chunk_tokens, base.note)


# ----------------------------------------------------------------------------------------------
# sampling


def sample_key(seed: int, step: int, item: int) -> mx.array:
    """The random key of one group's sampling: a function of (seed, step, prompt index) only."""
    mixed = np.random.SeedSequence([int(seed) % 2**64, 27, int(step), int(item)]).generate_state(1, np.uint32)[0]
    return mx.random.key(int(mixed))


def sample_group(
    model,
    prompt: Sequence[int],
    n: int,
    max_tokens: int,
    eos: set,
    *,
    temperature: float,
    key: Optional[mx.array] = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """``n`` completions (token ids) of one token prompt, sampled in one batched decode (the rows
    share the prompt; mlx-lm's batch KV cache). A completion ends with the EOS token it sampled
    (included) or after ``max_tokens`` tokens. ``temperature`` 0 is greedy. ``stop_at_eos=False``
    always decodes ``max_tokens`` (the memory measurement of ``--dry-run``).

    The one place GRPO generates: a batched engine can replace its body."""
    key = mx.random.key(0) if key is None else key
    cache = [batch_kv_cache([0] * n) for _ in range(len(model.layers))]
    tokens = mx.array([list(prompt)] * n, dtype=mx.int32)
    logits = model(tokens, cache=cache)[:, -1, :]
    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for step in range(max_tokens):
        if temperature > 0:
            key, sub = mx.random.split(key)
            nxt = mx.random.categorical(logits.astype(mx.float32) / temperature, key=sub)
        else:
            nxt = mx.argmax(logits, axis=-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = stop_at_eos and t in eos
        if all(done) or step == max_tokens - 1:
            break
        logits = model(nxt.reshape(-1, 1).astype(mx.int32), cache=cache)[:, -1, :]
    return out


def completion_batch(prompts: list[list[int]], completions: list[list[int]], items: np.ndarray) -> Batch:
    """Rows ``prompt + completion`` (inputs/targets shifted by one), the completion tokens as targets,
    padded to a multiple of PAD_MULTIPLE positions."""
    lengths = np.array([len(p) + len(c) - 1 for p, c in zip(prompts, completions)], np.int64)
    L = int(-(-lengths.max() // PAD_MULTIPLE) * PAD_MULTIPLE)
    B = len(prompts)
    inputs, targets = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        n = len(seq) - 1
        inputs[b, :n], targets[b, :n] = seq[:-1], seq[1:]
        mask[b, len(p) - 1 : n] = 1.0
    return Batch(inputs, targets, mask, lengths=lengths, items=items)


# ----------------------------------------------------------------------------------------------
# prompt data


class PromptDataset(TokenizedDataset):
    """Prompts for GRPO: ``examples`` hold each prompt's tokens (no targets; batching orders them
    as it orders any examples) and ``rows`` the data rows the rewards read."""

    def __init__(self, examples, stats, lines, rows: list[dict], texts: list[str]):
        super().__init__(examples, stats, lines)
        self.rows, self.texts = rows, texts


def _rows_of(path: str, columns: Optional[dict]) -> list[tuple[int, dict]]:
    rows = read_jsonl_rows(path)
    return map_jsonl_rows(rows, columns, path)


def _prompt_text(row: dict, template, path: str, line: int) -> str:
    if "prompt" not in row:
        raise DataError(
            "missing key (GRPO rows need a prompt and what the rewards read, e.g. answer)", path, line, "prompt"
        )
    p = row["prompt"]
    check_unicode(p, path, line, "prompt")
    if isinstance(p, str):
        if not p.strip():
            raise DataError("empty prompt", path, line, "prompt")
        return p
    if not isinstance(p, list):
        raise DataError(f"expected a string or a list of messages, got {tname(p)}", path, line, "prompt")
    msgs = chat_messages(p, "prompt", path, line)
    if template is None:
        raise DataError(
            "chat prompts need a chat template and the tokenizer has none; set data.chat_template "
            "(chatml, or a path to a .jinja file)",
            path,
            line,
            "prompt",
        )
    # A conversation that ends with an assistant turn is continued: the completion goes on from
    # its text (the start of the answer), as TRL does with continue_final_message.
    prefix = ""
    if msgs[-1]["role"] == "assistant" and isinstance(msgs[-1].get("content"), str):
        prefix, msgs = msgs[-1]["content"], msgs[:-1]
        if not msgs:
            raise DataError("the prompt is one assistant turn; it needs a user turn before it", path, line, "prompt")
    try:
        return template.render(msgs, add_generation_prompt=True) + prefix
    except TemplateLimitError as e:
        raise DataError(f"chat template {template.name} {e} (rendering this row)", path, line, "prompt") from None
    except Exception as e:
        raise DataError(
            f"chat template ({template.name}) failed: {type(e).__name__}: {one_line(e)}", path, line, "prompt"
        ) from None


def prompt_dataset(
    label: str, rows: list[tuple[int, dict]], cfg: DataConfig, enc: _Encoder, rewards: list, max_completion: int
) -> PromptDataset:
    """Checked, rendered and tokenized GRPO rows."""
    if not rows:
        raise DataError("no rows", label)
    texts = [_prompt_text(row, enc.template, label, line) for line, row in rows]
    R.check_rows(rewards, rows, label)
    room = cfg.max_seq_length - max_completion
    examples, lines, kept, skipped = [], [], [], 0
    for (line, row), text, ids in zip(rows, texts, enc.encode_many(texts)):
        if enc.adds_bos and ids[:1] != [enc.bos_id]:
            ids = [enc.bos_id] + ids
        if len(ids) > room:
            if cfg.overlong == "skip":
                skipped += 1
                continue
            raise DataError(
                f"the prompt has {len(ids)} tokens; with train.max_completion_length {max_completion} "
                f"at most {room} fit in data.max_seq_length {cfg.max_seq_length} (data.overlong: skip "
                f"drops such rows)",
                label,
                line,
                "prompt",
            )
        examples.append((np.asarray(ids, np.int32), np.zeros(len(ids), bool)))
        lines.append(line)
        kept.append((row, text))
    stats = DataStats(label, "prompts", len(rows), len(examples), 0, skipped, 0, int(sum(len(t) for t, _ in examples)))
    return PromptDataset(examples, stats, np.asarray(lines, np.int64), [r for r, _ in kept], [t for _, t in kept])


def _subset(ds: PromptDataset, keep: np.ndarray) -> PromptDataset:
    idx = np.flatnonzero(keep)
    stats = DataStats(
        ds.stats.path,
        ds.stats.format,
        int(len(idx)),
        int(len(idx)),
        0,
        0,
        0,
        int(sum(len(ds.examples[i][0]) for i in idx)),
    )
    return PromptDataset(
        [ds.examples[i] for i in idx], stats, ds.lines[idx], [ds.rows[i] for i in idx], [ds.texts[i] for i in idx]
    )


def load_prompt_splits(
    cfg: Config, tokenizer, *, seed: int = 0, splits: Sequence[str] = ("train", "valid", "test")
) -> DataSplits:
    """GRPO's train/valid/test prompts from ``data.path`` (a JSONL file, a folder with train.jsonl
    and optional valid.jsonl/test.jsonl, a ``datasets`` folder or an ``hf:`` id), with
    ``data.columns`` applied; validation rows are held out as for the other methods."""
    d, t = cfg.data, cfg.train
    if d.sources:
        raise DataError(
            "data.sources: mixing sources is not available with train.method grpo; use data.path", field="data.sources"
        )
    rewards = R.build(t.reward, t.rewards)
    enc = _Encoder(tokenizer, resolve_chat_template(d.chat_template, tokenizer))
    srcs: dict[str, Optional[tuple[str, list]]] = {"train": None, "valid": None, "test": None}
    if is_datasets_source(d.path):
        opened = open_source(d.path, columns=d.columns, fmt="auto")
        for name, src in opened.items():
            if src is not None:
                try:
                    srcs[name] = (src.label, src.rows())
                except DataError as e:
                    raise src.relabel(e) from None
    else:
        root = Path(d.path).expanduser()
        if not root.exists():
            raise DataError("no such file or folder", str(root), field="data.path")
        if root.is_dir():
            if not (root / "train.jsonl").is_file():
                raise DataError(
                    "folder has no train.jsonl (expected train.jsonl, optional valid.jsonl and test.jsonl)", str(root)
                )
            for name in srcs:
                f = root / f"{name}.jsonl"
                if f.is_file():
                    srcs[name] = (str(f), _rows_of(str(f), d.columns))
        else:
            srcs["train"] = (str(root), _rows_of(str(root), d.columns))

    def load(name):
        label, rows = srcs[name]
        return prompt_dataset(label, rows, d, enc, rewards, t.max_completion_length)

    out = {"train": None, "valid": None, "test": None}
    need_train = "train" in splits or ("valid" in splits and srcs["valid"] is None)
    if need_train:
        full = load("train")
        held = np.zeros(len(full), bool) if srcs["valid"] is not None else split_rows(len(full), d.valid_fraction, seed)
        out["train"] = _subset(full, ~held) if held.any() else full
        if "valid" in splits and held.any():
            out["valid"] = _subset(full, held)
    if "valid" in splits and srcs["valid"] is not None:
        out["valid"] = load("valid")
    if "test" in splits and srcs["test"] is not None:
        out["test"] = load("test")
    # A user's reward function meets every row before anything is written.
    for ds in (out["train"], out["valid"]):
        if ds is not None:
            R.probe(rewards, list(zip(ds.lines.tolist(), ds.rows)), ds.stats.path, t.max_completion_length)
    return DataSplits(out["train"] if "train" in splits else None, out["valid"], out["test"])


# ----------------------------------------------------------------------------------------------
# the method


class GRPOMethod:
    """``train.method: grpo`` behind the trainer's method interface (:mod:`mlx_lora.training.methods`):
    its ``prepare`` is the sampling phase, which turns a batch of prompts into a batch of scored
    completions whose advantages :meth:`extras` hands to the loss."""

    name = "grpo"
    allows_packing = False
    reference_pass = True

    def __init__(self, cfg: Config):
        self.cfg, t = cfg, cfg.train
        self.obj = Objective.from_config(t)
        self.rewards = R.build(t.reward, t.rewards)
        self.group_size, self.temperature = t.group_size, t.temperature
        self.full_length = False  # --dry-run: decode max_completion_length tokens (the sampling phase's peak)
        self._adv: Optional[np.ndarray] = None
        self._host = np.zeros(0)
        self._sample_s = 0.0
        self._prepared_at = 0.0
        self._eos: Optional[set] = None
        self.tokenizer = None

    # -- data ----------------------------------------------------------------------------------

    def load_datasets(self, cfg: Config, tokenizer, *, seed: int, splits=("train", "valid", "test")) -> DataSplits:
        self.tokenizer = tokenizer
        return load_prompt_splits(cfg, tokenizer, seed=seed, splits=splits)

    def check_data(self, cfg: Config, *datasets) -> None:
        for ds in datasets:
            if ds is not None and not isinstance(ds, PromptDataset):
                raise DataError(
                    "train.method grpo needs prompt rows (prompt, answer, ...); this data is in "
                    f"{ds.stats.format} format",
                    ds.stats.path,
                    field="train.method",
                )

    def loss(self, model, cfg: Config) -> Loss:
        return grpo_loss(model, self.obj, cfg.train.loss_chunk_tokens)

    def start(self, trainer) -> None:
        pass

    # -- the sampling phase ----------------------------------------------------------------------

    def _eos_ids(self) -> set:
        if self._eos is None:
            if self.tokenizer is None:
                raise RuntimeError("GRPO needs the tokenizer (load the data through the method)")
            self._eos = eos_ids(self.tokenizer)
        return self._eos

    def _score(self, ds: PromptDataset, item: int, completions: list[list[int]], eos: set) -> np.ndarray:
        """[G, F] rewards of one group's completions (EOS left out of the text)."""
        row, line = ds.rows[item], int(ds.lines[item])
        out = np.zeros((len(completions), len(self.rewards)), np.float64)
        for g, c in enumerate(completions):
            text = self.tokenizer.decode([t for t in c if t not in eos])
            for f, r in enumerate(self.rewards):
                out[g, f] = R.call(r, text, row, len(c), self.obj.max_completion_length, ds.stats.path, line)
        return out

    def prepare(self, trainer, batch: Batch) -> Batch:
        """Sample, score and build the training batch of completions for ``batch``'s prompts."""
        t0 = time.perf_counter()
        ds, model, G = trainer.train_set, trainer.model, self.group_size
        eos = self._eos_ids()
        training = model.training
        model.eval()  # no adapter dropout while sampling
        prompts, comps, rewards = [], [], []
        try:
            for item in batch.items.tolist():
                prompt = ds.examples[item][0].tolist()
                key = sample_key(self.cfg.train.seed, trainer.state.step, item)
                group = sample_group(
                    model,
                    prompt,
                    G,
                    self.obj.max_completion_length,
                    eos,
                    temperature=self.temperature,
                    key=key,
                    stop_at_eos=not self.full_length,
                )
                rewards.append(self._score(ds, item, group, eos))
                prompts += [prompt] * G
                comps += group
        finally:
            model.train(training)
        per_func = np.concatenate(rewards)  # [n * G, F]
        weights = np.array([r.weight for r in self.rewards])
        total = per_func @ weights
        self._adv = advantages(total, G, self.obj.scale_rewards)
        groups = total.reshape(-1, G)
        std = groups.std(axis=1, ddof=1) if G > 1 else np.zeros(len(groups))
        lengths = np.array([len(c) for c in comps], np.float64)
        truncated = np.array([len(c) >= self.obj.max_completion_length and c[-1] not in eos for c in comps])
        self._host = np.concatenate(
            [
                [total.sum()],
                per_func.sum(axis=0),
                [
                    std.sum(),
                    float((std < 1e-9).sum()),
                    float(len(groups)),
                    lengths.sum(),
                    float(len(comps)),
                    float(truncated.sum()),
                ],
            ]
        )
        items = np.repeat(batch.items, G)
        self._sample_s = time.perf_counter() - t0
        self._prepared_at = time.perf_counter()
        return completion_batch(prompts, comps, items)

    def extras(self, batch: Batch, rows) -> tuple:
        return (mx.array(self._adv[rows]),)

    def host_stats(self) -> list[float]:
        return self._host.tolist()

    def metrics(self, sums: list, n: float, prefix: str = "") -> tuple[dict, float]:
        """(metrics, target tokens) of the summed loss statistics and sampling statistics."""
        k = len(STATS)
        s = dict(zip(STATS, sums[:k]))
        host = sums[k:]
        F = len(self.rewards)
        total, per_func = host[0], host[1 : 1 + F]
        std_sum, zero, groups, len_sum, count, trunc = host[1 + F : 7 + F]
        count = max(count, 1.0)
        out = {"reward": total / count}
        for r, v in zip(self.rewards, per_func):
            out[f"reward_{r.name}"] = v / count
        out.update(
            {
                "reward_std": std_sum / max(groups, 1.0),
                "zero_std_groups": zero / max(groups, 1.0),
                "completion_length": len_sum / count,
                "truncated_completions": trunc / count,
            }
        )
        if self.obj.beta != 0.0:
            out["kl"] = s["kl"] / max(s["tokens"], 1.0)
        out["clip_ratio"] = (s["clipped_low"] + s["clipped_high"]) / max(s["tokens"], 1.0)
        out["sample_s"] = self._sample_s
        out["update_s"] = max(time.perf_counter() - self._prepared_at, 0.0)
        return {prefix + k: v for k, v in out.items()}, s["tokens"]

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, trainer, dataset: PromptDataset, max_batches: Optional[int], metrics: Optional[dict]):
        """Greedy completions of this rank's share of ``dataset`` (the first ``max_batches`` x
        batch_size prompts): (minus the mean reward, prompts scored); ``metrics`` gets
        ``val_reward`` and ``val_reward_<name>``."""
        t = self.cfg.train
        n = len(dataset) if max_batches is None else min(len(dataset), max_batches * t.batch_size * trainer.world)
        mine = list(range(trainer.rank, n, trainer.world))
        eos = self._eos_ids()
        outs = (
            generate_tokens(
                trainer.model, [dataset.examples[i][0].tolist() for i in mine], self.obj.max_completion_length, eos
            )
            if mine
            else []
        )
        F = len(self.rewards)
        sums = np.zeros(F + 2)
        weights = np.array([r.weight for r in self.rewards])
        for i, c in zip(mine, outs):
            per = self._score(dataset, i, [c], eos)[0]
            sums[:F] += per
            sums[F] += per @ weights
            sums[F + 1] += 1
        sums = trainer.sync.sum(sums.tolist(), "the validation reward all_sum")
        count = max(sums[F + 1], 1.0)
        if metrics is not None:
            metrics["val_reward"] = sums[F] / count
            for r, v in zip(self.rewards, sums[:F]):
                metrics[f"val_reward_{r.name}"] = v / count
        return -sums[F] / count, int(sums[F + 1])


def greedy_accuracy(model, tokenizer, ds: PromptDataset, reward: str, max_tokens: int) -> float:
    """The mean of ``reward`` over greedy completions of every prompt of ``ds`` (the held-out
    score the guide reports)."""
    fn = R.build(reward, None)[0]  # an unknown reward fails before the generation
    outs = generate_tokens(model, [e[0].tolist() for e in ds.examples], max_tokens, eos_ids(tokenizer))
    return _mean_reward(fn, tokenizer, ds, [[o] for o in outs], max_tokens)


def sampled_reward(
    model, tokenizer, ds: PromptDataset, reward: str, max_tokens: int, n: int, temperature: float, seed: int = 0
) -> float:
    """The mean of ``reward`` over ``n`` completions of every prompt of ``ds`` sampled as training
    samples them, from a key fixed per prompt (``seed``, prompt index): a before and an after
    measurement see the same prompts sampled the same way."""
    fn = R.build(reward, None)[0]
    eos = eos_ids(tokenizer)
    groups = [
        sample_group(model, e[0].tolist(), n, max_tokens, eos, temperature=temperature, key=sample_key(seed, 0, i))
        for i, e in enumerate(ds.examples)
    ]
    return _mean_reward(fn, tokenizer, ds, groups, max_tokens)


def _mean_reward(fn, tokenizer, ds: PromptDataset, groups: list[list[list[int]]], max_tokens: int) -> float:
    """The mean of reward ``fn`` over completions ``groups[i]`` (token ids) of each prompt ``i`` of ``ds``."""
    vals = [
        R.call(fn, tokenizer.decode(o), row, len(o), max_tokens, ds.stats.path, int(line))
        for group, row, line in zip(groups, ds.rows, ds.lines)
        for o in group
    ]
    return float(np.mean(vals)) if vals else math.nan
