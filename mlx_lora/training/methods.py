"""Training methods behind one small interface; the trainer's loop knows none of them by name.

A method (``train.method``) says

- ``load_datasets(cfg, tokenizer, seed, splits)``: its data (token examples, preference pairs,
  or GRPO's prompts with their rows);
- ``check_data(cfg, *datasets)``: refuse data of another method;
- ``loss(model, cfg)``: the :class:`~mlx_lora.training.losses.Loss` the compiled step runs;
- ``start(trainer)``: any state of its own before the first step (DPO's cached reference log-probs);
- ``prepare(trainer, batch)``: the batch a step trains on, from the batch of data it is given
  (identity, or GRPO's sampling phase);
- ``extras(batch, rows)``: extra per-row arrays the loss takes after its usual arguments;
- ``host_stats()``: numbers of the step computed on the host, summed across ranks with the loss's
  statistics;
- ``metrics(sums, n, prefix)``: (its metrics, the step's target tokens) from the summed statistics;
- ``evaluate(trainer, dataset, max_batches, metrics)``: (validation loss, count), or None for the
  loss on the validation rows.

``allows_packing`` says whether its rows may be packed.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_lora.config import Config
from mlx_lora.data.dataset import DataSplits
from mlx_lora.data.mixture import load_datasets
from mlx_lora.training import preference
from mlx_lora.training.grpo import GRPOMethod
from mlx_lora.training.losses import Loss, make_loss
from mlx_lora.training.preference import Objective, check_data, preference_loss
from mlx_lora.training.preference import metrics as preference_metrics


class Supervised:
    """``sft``: token-weighted cross-entropy on the targets; also the base of the others."""

    allows_packing = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.name = cfg.train.method

    def load_datasets(self, cfg: Config, tokenizer, *, seed: int, splits=("train", "valid", "test")) -> DataSplits:
        return load_datasets(cfg.data, tokenizer, seed=seed, splits=splits)

    def check_data(self, cfg: Config, *datasets) -> None:
        check_data(cfg, *datasets)

    def loss(self, model, cfg: Config) -> Loss:
        return make_loss(model, cfg.train.loss_chunk_tokens)

    def start(self, trainer) -> None:
        pass

    def prepare(self, trainer, batch):
        return batch

    def extras(self, batch, rows) -> tuple:
        return ()

    def host_stats(self) -> list:
        return []

    def metrics(self, sums: list, n: float, prefix: str = "") -> tuple[dict, float]:
        return {}, n

    def evaluate(self, trainer, dataset, max_batches: Optional[int], metrics: Optional[dict]):
        """None: the trainer evaluates the loss on ``dataset`` (:func:`mlx_lora.training.trainer.evaluate`)."""
        return None


class Preference(Supervised):
    """``dpo`` (sigmoid, IPO) and ``orpo``: pair losses of :mod:`mlx_lora.training.preference`."""

    allows_packing = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ref: Optional[np.ndarray] = None  # precomputed reference log-probs (train.dpo_precompute_ref)

    def loss(self, model, cfg: Config) -> Loss:
        return preference_loss(model, Objective.from_config(cfg.train), cfg.train.loss_chunk_tokens)

    def start(self, trainer) -> None:
        if self.cfg.train.dpo_precompute_ref and self.ref is None:  # one pass, cached in the run folder
            shown = {
                "progress": getattr(trainer, "progress", True) and trainer.rank == 0,
                "stream": getattr(trainer, "progress_stream", None),
            }
            self.ref = (
                preference.reference_logps(trainer.model, trainer.train_set, self.cfg, **shown)
                if trainer.run is None
                else preference.cached_reference_logps(
                    trainer.model, trainer.train_set, self.cfg, trainer.run.path, write=trainer.rank == 0, **shown
                )
            )

    def extras(self, batch, rows) -> tuple:
        return () if self.ref is None else (mx.array(self.ref[batch.items[rows]]),)

    def metrics(self, sums: list, n: float, prefix: str = "") -> tuple[dict, float]:
        # n counts pairs; throughput counts their target tokens (the last statistic)
        return preference_metrics(sums, n, self.cfg.train.method, prefix=prefix), sums[-1]


METHODS = {"sft": Supervised, "dpo": Preference, "orpo": Preference, "grpo": GRPOMethod}


def for_config(cfg: Config):
    """The method object of ``cfg.train.method``."""
    return METHODS[cfg.train.method](cfg)
