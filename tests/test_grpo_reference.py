"""GRPO's loss against TRL's own loss code (torch + trl), on the same log-probs and advantages.

``GRPOTrainer._compute_loss`` runs on a stand-in trainer whose policy returns given per-token
log-probs; the inputs carry the sampling policy's and the reference model's log-probs and the
advantages, so the clipping, the k3 KL term and each reduction (grpo, bnpo, dr_grpo) are TRL's.
The same formulas, transcribed, run in the default suite (tests/test_grpo.py). Run by hand:
``pytest -m reference tests/test_grpo_reference.py``.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora.training.grpo import Objective, advantages, token_loss

pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

G, B, T = 3, 6, 7


def _case(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        mask[b, : rng.integers(1, T + 1)] = 1
    logps = -rng.gamma(2.0, 0.5, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.4, (B, T))).astype(np.float32)
    ref = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    rewards = np.array([1, 0, 0, 1, 0.5, 0], np.float32)
    return logps, old, ref, rewards, mask


def _trl_loss(tmp_path, case, loss_type, beta, eps, eps_high, kl_correction):
    from trl import GRPOConfig, GRPOTrainer

    logps, old, ref, rewards, mask = case
    args = GRPOConfig(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        beta=beta,
        epsilon=eps,
        epsilon_high=eps_high if eps_high is not None else eps,
        max_completion_length=T,
        num_generations=G,
        per_device_train_batch_size=B,
        report_to=[],
        use_cpu=True,
        use_bias_correction_kl=kl_correction,
        bf16=False,
    )
    lp = torch.tensor(logps, requires_grad=True)

    class Stub:
        def __getattr__(self, name):  # any setting TRL reads that is not set below: the config's
            return getattr(args, name)

    ident = lambda t: t
    n_outputs = 3 if "aux_loss" in inspect.getsource(GRPOTrainer._compute_loss) else 2
    stub = Stub()
    stub.__dict__.update(
        args=args,
        loss_type=loss_type,
        beta=beta,
        epsilon_low=eps,
        epsilon_high=eps_high if eps_high is not None else eps,
        max_completion_length=T,
        num_iterations=1,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        use_liger_loss=False,
        mask_truncated_completions=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device="cpu",
            gather=ident,
            gather_for_metrics=ident,
            reduce=lambda t, reduction="sum": t,
            sync_gradients=True,
        ),
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
        entropy_coef=0.0,
        # TRL 1.x returns (log-probs, entropies), later ones an auxiliary loss as well
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None)[:n_outputs],
    )
    adv = advantages(rewards, G)
    inputs = {
        "prompt_ids": torch.ones((B, 2), dtype=torch.long),
        "prompt_mask": torch.ones((B, 2), dtype=torch.long),
        "completion_ids": torch.ones((B, T), dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": torch.tensor(mask.sum()),
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return float(loss), grad.numpy()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize(
    "beta, eps, eps_high, kl_correction", [(0.04, 0.2, None, False), (0.04, 0.2, None, True), (0.0, 0.2, 0.28, False)]
)
def test_loss_and_gradient_equal_trls(tmp_path, loss_type, beta, eps, eps_high, kl_correction):
    case = _case()
    want, want_grad = _trl_loss(tmp_path, case, loss_type, beta, eps, eps_high, kl_correction)
    logps, old, ref, rewards, mask = case
    obj = Objective(loss_type, beta, eps, eps_high, max_completion_length=T, kl_bias_correction=kl_correction)
    adv = mx.array(advantages(rewards, G))

    def f(lp):
        num, den, _ = token_loss(obj, lp, mx.array(mask), adv, mx.array(old), mx.array(ref))
        return num / den

    got, grad = mx.value_and_grad(f)(mx.array(logps))
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-4, atol=1e-7)
