"""Preference tuning: DPO (Rafailov et al. 2023, arXiv:2305.18290) with the sigmoid loss and
optional label smoothing (conservative DPO), IPO (Azar et al. 2023, arXiv:2310.12036) and ORPO
(Hong et al. 2024, arXiv:2403.07691), as loss objects the trainer's one compiled step runs.

A micro-batch of preference data holds pairs as consecutive rows (chosen, rejected), see
:mod:`mlx_lora.data.batching`. For each row the policy's log-probability of its target tokens is the
sum ``log pi(y | x) = sum_t m_t log p(y_t | y_<t, x)``, with the same target mask as supervised
training. With ``c``/``r`` the chosen/rejected sums, ``c0``/``r0`` the reference model's, and
``n_c``/``n_r`` their target-token counts:

- DPO (sigmoid): ``d = (c - c0) - (r - r0)``, ``loss = -(1 - e) log s(beta d) - e log s(-beta d)``
  (``e``: label smoothing, the conservative-DPO noise rate; 0 is plain DPO).
- IPO: ``d = (c - c0) / n_c - (r - r0) / n_r``, ``loss = (d - 1 / (2 beta))^2`` (log ratios per
  target token, as TRL computes it with the IPO authors' agreement).
- ORPO: with mean log-probs ``a_c = c / n_c``, ``a_r = r / n_r``,
  ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))`` and
  ``loss = -a_c - lambda log s(log_odds)``: the chosen answer's NLL per token plus the odds-ratio
  term. No reference model.

Rewards (the metrics): DPO/IPO ``beta (c - c0)`` and ``beta (r - r0)``; ORPO ``lambda a_c`` and
``lambda a_r``. A pair counts as correct when its chosen reward is strictly larger.

The reference model is the policy with its adapter switched off (:func:`mlx_lora.model.lora.adapters_off`)
under ``stop_gradient``: the same weights in the same process, never a second model. Losses return
``(sum of pair losses, number of pairs, statistics)``; the trainer divides gradients once by the
pairs of the whole step (all micro-batches and ranks), exactly as it divides by target tokens in
supervised training, so accumulation and data parallelism take the same step as one large batch.

The log-probabilities use the chunked output layer of :mod:`mlx_lora.training.losses` when it is in use:
the full ``[tokens x vocab]`` logits never exist, only per-token log-probs at target positions.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.config import Config, TrainConfig
from mlx_lora.data.batching import BatchPlan
from mlx_lora.model.lora import adapters_off
from mlx_lora.plumbing.errors import DataError
from mlx_lora.plumbing.io import atomic_path
from mlx_lora.plumbing.ownership import record
from mlx_lora.plumbing.progress import Ticker
from mlx_lora.training.losses import (
    HeadSplit,
    Loss,
    _cache,
    _token_ce,
    make_loss,
    model_logits,
    split_head,
    target_positions,
)

METHODS = ("sft", "dpo", "orpo")
STATS = ("correct", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "nll", "tokens")
"""What a preference loss sums over pairs, in the order of its statistics vector (``tokens``: the
target tokens of both responses, which throughput and ``trained_tokens`` count)."""
METRICS = (
    "reward_accuracy",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "nll",
)
"""The metrics a preference run records (``nll`` for ORPO only), per step and with ``val_`` at evaluation."""


@dataclass(frozen=True)
class Objective:
    """Which preference loss, with its constants (from ``train.*``)."""

    method: str = "dpo"
    """dpo or orpo."""
    loss: str = "sigmoid"
    """dpo's variant: sigmoid or ipo."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1

    @classmethod
    def from_config(cls, t: TrainConfig) -> "Objective":
        return cls(t.method, t.dpo_loss, t.dpo_beta, t.dpo_label_smoothing, t.orpo_lambda)

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"


# ----------------------------------------------------------------------------------------------
# the losses, on per-sequence log-probs


def log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    x = mx.minimum(x, -1e-12)  # log-probs are <= 0; a probability of exactly 1 has no odds
    return mx.where(x > -math.log(2), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def pair_losses(
    obj: Objective,
    chosen: mx.array,
    rejected: mx.array,
    n_chosen: mx.array,
    n_rejected: mx.array,
    ref_chosen: Optional[mx.array] = None,
    ref_rejected: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array]:
    """(loss of each pair [P], statistics [P, len(STATS)]) from the summed log-probs of the chosen
    and rejected responses [P], their target-token counts [P] and (DPO, IPO) the reference
    model's sums. See the module docstring for the formulas."""
    n_c, n_r = mx.maximum(n_chosen, 1), mx.maximum(n_rejected, 1)
    if obj.method == "orpo":
        a_c, a_r = chosen / n_c, rejected / n_r
        log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
        nll = -a_c
        losses = nll - obj.orpo_lambda * log_sigmoid(log_odds)
        r_c, r_r, lp_c, lp_r = obj.orpo_lambda * a_c, obj.orpo_lambda * a_r, a_c, a_r
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("DPO and IPO need the reference model's log-probs")
        ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
        if obj.loss == "ipo":
            d = ratio_c / n_c - ratio_r / n_r
            losses = (d - 1.0 / (2.0 * obj.beta)) ** 2
        else:
            d, e = obj.beta * (ratio_c - ratio_r), obj.label_smoothing
            losses = -(1.0 - e) * log_sigmoid(d) - e * log_sigmoid(-d)
        r_c, r_r, lp_c, lp_r = obj.beta * ratio_c, obj.beta * ratio_r, chosen, rejected
        nll = mx.zeros_like(losses)
    correct = (r_c > r_r).astype(mx.float32)
    stats = mx.stack([correct, r_c, r_r, lp_c, lp_r, nll, n_chosen + n_rejected], axis=-1)
    return losses, mx.stop_gradient(stats)


def metrics(stats, pairs: float, method: str, prefix: str = "") -> dict:
    """The metrics (:data:`METRICS`) of summed statistics over ``pairs`` pairs."""
    s = dict(zip(STATS, (float(x) for x in stats)))
    n = max(float(pairs), 1.0)
    out = {
        "reward_accuracy": s["correct"] / n,
        "chosen_reward": s["chosen_reward"] / n,
        "rejected_reward": s["rejected_reward"] / n,
        "reward_margin": (s["chosen_reward"] - s["rejected_reward"]) / n,
        "chosen_logp": s["chosen_logp"] / n,
        "rejected_logp": s["rejected_logp"] / n,
    }
    if method == "orpo":
        out["nll"] = s["nll"] / n
    return {prefix + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# per-sequence log-probs


def _fused_head_logp(head: Callable, chunk_tokens: int):
    """A differentiable ``(h [N, D], targets [N]) -> log p(targets) [N]`` that applies the output
    layer ``chunk_tokens`` rows at a time and computes each row's gradient ``d logp_t / d h_t`` in
    the forward pass (as :func:`mlx_lora.training.losses._fused_head_ce` does for the summed loss). Each
    token's log-prob depends on its own row of ``h`` only, so the backward pass is the cotangent
    of each token times its stored gradient row."""

    def forward(h, targets):
        logps, grads = [], []
        for s in range(0, h.shape[0], chunk_tokens):
            hc, tc = h[s : s + chunk_tokens], targets[s : s + chunk_tokens]
            if grads:  # finish the previous chunk before this one's logits exist
                hc = mx.depends(hc, [logps[-1], grads[-1]])

            def chunk_logp(x, tc=tc):
                return -_token_ce(head(x), tc)

            (lp,), (dh,) = mx.vjp(chunk_logp, [hc], [mx.ones((hc.shape[0],), mx.float32)])
            logps.append(lp)
            grads.append(dh.astype(h.dtype))
        return mx.concatenate(logps), mx.concatenate(grads, axis=0)

    fused = mx.custom_function(forward)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets = primals
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        return g.astype(h.dtype)[:, None] * outputs[1], mx.zeros_like(targets)

    return fused


def _chunked_logp(head: Callable, h: mx.array, targets: mx.array, chunk_tokens: int) -> mx.array:
    """Per-row log p(targets) [N] without gradients, one chunk of logits at a time."""
    out = []
    for s in range(0, h.shape[0], chunk_tokens):
        hc = h[s : s + chunk_tokens] if not out else mx.depends(h[s : s + chunk_tokens], [out[-1]])
        out.append(-_token_ce(head(hc), targets[s : s + chunk_tokens]))
    return mx.concatenate(out)


class SequenceLogps:
    """Summed target log-probs of each row of a batch: ``[B]``, with the model's output layer
    applied in chunks at the target positions when ``split`` is given (else from full logits)."""

    def __init__(self, split: Optional[HeadSplit], chunk_tokens: Optional[int]):
        self.split, self.chunk = split, chunk_tokens
        self.fused = _fused_head_logp(split.head, chunk_tokens) if split is not None else None

    def __call__(self, model, inputs, targets, mask, attn=None, positions=None, grad: bool = True) -> mx.array:
        mask = mask.astype(mx.float32)
        if self.split is None:
            logits = model_logits(model, inputs, attn)
            return (-_token_ce(logits, targets) * mask).sum(axis=-1)
        B, L = inputs.shape
        h = self.split.body(inputs, _cache(model, attn))
        h = h.reshape(-1, h.shape[-1])
        if positions is None:
            positions = target_positions(np.asarray(mask))
        valid = positions >= 0
        idx = mx.where(valid, positions, 0)
        hg, tg = h[idx], targets.reshape(-1)[idx]
        weight = mask.reshape(-1)[idx] * valid
        lp = self.fused(hg, tg)[0] if grad else _chunked_logp(self.split.head, hg, tg, self.chunk)
        owner = (idx // L)[:, None] == mx.arange(B)[None, :]  # [N, B]: which row each position is in
        return (mx.where(owner, (lp * weight)[:, None], 0.0)).sum(axis=0)


def preference_loss(model: nn.Module, obj: Objective, chunk_tokens: Optional[int], *, training: bool = True) -> Loss:
    """The :class:`~mlx_lora.training.losses.Loss` of ``obj`` for ``model``: chunked output layer when
    :func:`~mlx_lora.training.losses.make_loss` would use it (same checks), else full logits."""
    base = make_loss(model, chunk_tokens, training=training)
    seq = SequenceLogps(split_head(model) if base.chunk_tokens is not None else None, base.chunk_tokens)

    def objective(model, inputs, targets, mask, attn=None, positions=None, grad=True, ref=None):
        policy = seq(model, inputs, targets, mask, attn, positions, grad=grad)
        counts = mask.astype(mx.float32).sum(axis=-1)
        if obj.needs_reference and ref is None:
            with adapters_off(model):
                ref = mx.stop_gradient(seq(model, inputs, targets, mask, attn, positions, grad=False))
        P = inputs.shape[0] // 2
        pairs = lambda a: a.reshape(P, 2)
        c, r = pairs(policy)[:, 0], pairs(policy)[:, 1]
        nc, nr = pairs(counts)[:, 0], pairs(counts)[:, 1]
        rc = rr = None
        if ref is not None:
            rc, rr = pairs(ref)[:, 0], pairs(ref)[:, 1]
        losses, stats = pair_losses(obj, c, r, nc, nr, rc, rr)
        return losses.sum(), mx.array(float(P)), stats.sum(axis=0)

    # The trainer passes the target positions when the output layer is chunked, then the
    # precomputed reference log-probs of the rows when there are any (train.dpo_precompute_ref).
    if base.chunk_tokens is not None:

        def train(model, inputs, targets, mask, attn=None, positions=None, ref=None):
            return objective(model, inputs, targets, mask, attn, positions, grad=True, ref=ref)
    else:

        def train(model, inputs, targets, mask, attn=None, ref=None):
            return objective(model, inputs, targets, mask, attn, None, grad=True, ref=ref)

    def evaluate(model, inputs, targets, mask, attn=None):
        return objective(model, inputs, targets, mask, attn, None, grad=False)

    return Loss(train, evaluate, base.chunk_tokens, base.note)


# ----------------------------------------------------------------------------------------------
# precomputed reference log-probs (train.dpo_precompute_ref)

REFERENCE_FILE = "reference_logps.npz"


def reference_logps(model: nn.Module, ds, cfg: Config, *, progress: bool = True, stream=None) -> np.ndarray:
    """The reference model's (adapter off) summed target log-probs of every example of ``ds``,
    float32 [examples], in one pass without gradients (``train.batch_size`` pairs at a time).
    A pass longer than a moment shows its batches unless ``progress`` is false."""

    seq = SequenceLogps(None, None)
    out = np.zeros(len(ds), np.float32)
    training = model.training
    model.eval()
    try:
        plan = BatchPlan(ds, cfg.train.batch_size, cfg.data.max_seq_length, seed=0, shuffle=False)
        with (
            adapters_off(model),
            Ticker(
                plan.steps_per_epoch(), "reference log-probs (adapter off)", stream=stream, enabled=progress
            ) as ticker,
        ):
            for batch in plan.first_epoch():
                inputs, targets, mask = (mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask))
                out[batch.items] = np.array(seq(model, inputs, targets, mask))
                ticker.update()
    finally:
        model.train(training)
    return out


def _reference_key(ds, cfg: Config) -> str:
    """What the reference log-probs depend on: every example's tokens and targets, and the base
    (its path and compute dtype; ``--resume`` refuses a base whose fingerprint changed)."""

    h = hashlib.sha256(f"{cfg.model.path}\0{cfg.model.dtype}\0{len(ds)}".encode())
    for tokens, mask in ds.examples:
        h.update(np.asarray(tokens, np.int32).tobytes())
        h.update(np.asarray(mask, bool).tobytes())
    return h.hexdigest()


def cached_reference_logps(
    model: nn.Module, ds, cfg: Config, folder, write: bool = True, *, progress: bool = True, stream=None
) -> np.ndarray:
    """:func:`reference_logps` of ``ds``, read from ``folder``/reference_logps.npz when it was
    written for the same data and base, else computed and (``write``) saved there atomically."""

    path, key = Path(folder) / REFERENCE_FILE, _reference_key(ds, cfg)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key and z["logps"].shape == (len(ds),) and np.isfinite(z["logps"]).all():
                    return z["logps"].astype(np.float32)
        except Exception:  # an unreadable cache is computed again, never an error
            pass
    logps = reference_logps(model, ds, cfg, progress=progress, stream=stream)
    if write:
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), logps=logps)
        record(path.parent, path.name)  # into the run folder's marker
    return logps


def check_data(cfg: Config, *datasets) -> None:
    """Refuse data that does not fit ``train.method``: preference pairs need dpo or orpo, and
    those need preference pairs (``prompt``, ``chosen``, ``rejected`` rows)."""
    method = cfg.train.method
    for ds in datasets:
        if ds is None:
            continue
        paired = ds.per_item == 2
        if method == "sft" and paired:
            raise DataError(
                "preference rows (prompt, chosen, rejected) train with train.method: dpo or orpo, not sft",
                ds.stats.path,
                field="train.method",
            )
        if method != "sft" and not paired:
            raise DataError(
                f"train.method {method} needs preference rows (prompt, chosen, rejected); this file "
                f"is in {ds.stats.format} format",
                ds.stats.path,
                field="train.method",
            )
