"""Preference losses against TRL's own loss code (torch + trl), on the same log-probs.

DPO, IPO and the label-smoothed (conservative) sigmoid run through ``DPOTrainer._compute_loss`` with
a stand-in model that returns given per-token log-probs and precomputed reference log-probs; ORPO
through ``ORPOTrainer.odds_ratio_loss``. Run by hand: ``pytest -m reference tests/test_preference_reference.py``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora.training.preference import Objective, pair_losses

pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

P, L = 5, 9


def _case(seed: int = 0):
    """Per-token log-probs of P pairs (rows: chosen, rejected), their completion masks, and the
    reference model's summed log-probs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2 * P, L + 1), np.float32)
    for i in range(2 * P):
        start = int(rng.integers(2, 5))
        end = int(rng.integers(start + 1, L + 1))
        mask[i, start : end + 1] = 1
    token_logps = -rng.gamma(2.0, 0.6, (2 * P, L)).astype(np.float32) * mask[:, 1:]
    ref = (token_logps.sum(1) + rng.normal(0, 1.5, 2 * P)).astype(np.float32)
    return token_logps, mask, ref


def _trl_dpo(case, loss_type: str, beta: float, label_smoothing: float = 0.0):
    from trl import DPOTrainer

    token_logps, mask, ref = case
    n = len(ref)
    # TRL's batch holds every chosen row, then every rejected one (ours interleaves them)
    token_logps, mask = (np.concatenate([x[0::2], x[1::2]]) for x in (token_logps, mask))

    def model(**kwargs):
        t = torch.tensor(token_logps)
        return SimpleNamespace(
            log_probs=t,
            entropy=torch.zeros_like(t),
            mean_logits=torch.zeros_like(t),
            is_top1=torch.zeros_like(t, dtype=torch.bool),
        )

    ident = lambda t: t
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones((n, L + 1), dtype=torch.long),
        "attention_mask": torch.ones((n, L + 1), dtype=torch.long),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
        "ref_chosen_logps": torch.tensor(ref[0::2]),
        "ref_rejected_logps": torch.tensor(ref[1::2]),
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    m = stub._metrics["eval"]
    return float(loss), {
        k: m[k][-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    }


def _ours(case, obj: Objective):
    token_logps, mask, ref = case
    seq, counts = token_logps.sum(1), mask[:, 1:].sum(1)
    a = lambda x: mx.array(np.ascontiguousarray(x))
    losses, stats = pair_losses(
        obj, a(seq[0::2]), a(seq[1::2]), a(counts[0::2]), a(counts[1::2]), a(ref[0::2]), a(ref[1::2])
    )
    s = np.array(stats).mean(0)
    return float(np.array(losses).mean()), {
        "rewards/chosen": s[1],
        "rewards/rejected": s[2],
        "rewards/accuracies": s[0],
        "rewards/margins": s[1] - s[2],
    }


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_and_ipo_match_trl(loss_type, beta):
    want_loss, want = _trl_dpo(_case(), loss_type, beta)
    got_loss, got = _ours(_case(), Objective("dpo", loss_type, beta=beta))
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_label_smoothed_dpo_matches_trl_on_each_pair():
    # TRL 1.x applies label smoothing in its "aot" loss, which sorts the batch's log ratios; on one
    # pair at a time the sort is the identity and it is conservative DPO.
    token_logps, mask, ref = _case()
    for i in range(P):
        one = token_logps[2 * i : 2 * i + 2], mask[2 * i : 2 * i + 2], ref[2 * i : 2 * i + 2]
        want_loss, _ = _trl_dpo(one, "aot", 0.3, label_smoothing=0.2)
        got_loss, _ = _ours(one, Objective("dpo", "sigmoid", beta=0.3, label_smoothing=0.2))
        assert got_loss == pytest.approx(want_loss, rel=1e-5), i


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    token_logps, mask, _ = _case()
    seq, counts = token_logps.sum(1), mask[:, 1:].sum(1)
    avg = seq / counts
    lam = 0.25
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_c, trl_r, _, _ = ORPOTrainer.odds_ratio_loss(stub, torch.tensor(avg[0::2]), torch.tensor(avg[1::2]))
    a = lambda x: mx.array(np.ascontiguousarray(x))
    losses, stats = pair_losses(
        Objective("orpo", orpo_lambda=lam), a(seq[0::2]), a(seq[1::2]), a(counts[0::2]), a(counts[1::2])
    )
    # TRL's loss = NLL of the chosen tokens - mean(odds-ratio term); per pair: -mean logp(chosen) - term
    np.testing.assert_allclose(np.array(losses), -avg[0::2] - trl_losses.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.array(stats)[:, 1], trl_c.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.array(stats)[:, 2], trl_r.numpy(), rtol=1e-5)
