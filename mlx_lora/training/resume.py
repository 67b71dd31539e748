"""What ``train --resume`` may change, checked before the run folder is touched.

A resumed run continues the adapter, optimizer state and data position of its newest
checkpoint. Some settings may change on the way (how long to train, the learning rate, how
often to evaluate and save, how a step is computed); the rest would make the checkpoint
meaningless (another adapter shape or base model), the data position meaningless (other
examples, another split or order) or the run no longer one run (another seed). Only the keys in
:data:`ALLOWED` may change; every other key, including any added to the config later, is
refused by default.

``train.batch_size`` and ``train.grad_accum`` are a special case: they may change as long as an
optimizer step still reads the same number of examples (``batch_size x grad_accum x ranks``,
recorded in each checkpoint), which keeps the resumed run step for step equal to an
uninterrupted one; halving ``batch_size`` and doubling ``grad_accum`` is the usual cure for
running out of memory. Another number of examples per step is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.config import Config, from_dict, load_yaml, to_dict
from mlx_lora.model.integrity import FINGERPRINT_KEY, recorded_fingerprint
from mlx_lora.plumbing.errors import CheckpointError, ConfigError
from mlx_lora.training.checkpoints import REPLACED_STEP_DIR, RunDir, TrainState

# key -> why it may change. Everything else is fixed for the life of a run.
ALLOWED: dict[str, str] = {
    # how long
    "train.iters": "length",
    "train.epochs": "length",
    # the step size: the schedule is rebuilt for the new total and continues at the current step
    "train.lr": "learning rate",
    "train.schedule": "learning rate",
    "train.warmup_steps": "learning rate",
    "train.min_lr_ratio": "learning rate",
    "train.weight_decay": "learning rate",
    "train.max_grad_norm": "learning rate",
    # bookkeeping
    "train.eval_every": "cadence",
    "train.eval_batches": "cadence",
    "train.save_every": "cadence",
    "train.keep_checkpoints": "cadence",
    "train.log_every": "cadence",
    "train.early_stopping_patience": "cadence",
    "train.nan_policy": "failure handling",
    "train.report_to": "cadence",
    # how a step is computed, not what it computes
    "train.grad_checkpoint": "memory",
    "train.checkpoint_attention": "memory",
    "train.loss_chunk_tokens": "memory",
    "train.length_groups": "memory",
    "train.compile": "memory",
    "data.cache": "memory",
    "model.trust_remote_code": "memory",
    "model.dequantize_on_cpu": "memory",  # the dequantized weights are the quantized ones' values
    "train.shapes": "memory",
    "train.wired_limit_gb": "memory",
    "train.cache_limit_gb": "memory",
    "train.clear_cache_after_eval": "memory",  # how batches are laid out and memory held, not the step
    # where the run folder is (it may have been moved or be reached through another path)
    "out": "location",
}
BATCH_KEYS = ("train.batch_size", "train.grad_accum")
"""May change when ``batch_size x grad_accum x ranks`` stays what the checkpoint records."""
_PATH_KEYS = ("model.path", "data.path", "data.chat_template")


class ResumeRefused(CheckpointError):
    """``--resume`` was asked to change what a run cannot change."""


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} ({_show(self.old)} -> {_show(self.new)})"


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, list) and isinstance(new, list) and key != "data.sources":  # sources: order decides the sample
        return sorted(map(str, old)) == sorted(map(str, new))  # the same modules or layers, listed otherwise
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        try:
            return os.path.samefile(os.path.expanduser(old), os.path.expanduser(new))
        except OSError:
            return False
    return False


def config_changes(old: Config, new: Config) -> list[Change]:
    """Every key whose value differs between ``old`` and ``new``, in config order."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    keys = list(a) + [k for k in b if k not in a]
    return [Change(k, a.get(k), b.get(k)) for k in keys if not _same(k, a.get(k), b.get(k))]


def refused_changes(old: Config, new: Config, old_global_batch: int, new_global_batch: int) -> list[Change]:
    """The changes a resume may not make (empty when it may go ahead)."""
    refused = [c for c in config_changes(old, new) if c.key not in ALLOWED and c.key not in BATCH_KEYS]
    if old_global_batch != new_global_batch:
        refused.append(
            Change(
                "examples per step (train.batch_size x train.grad_accum x ranks)", old_global_batch, new_global_batch
            )
        )
    return refused


def refusal(run_path, refused: list[Change], fix: str) -> ResumeRefused:
    return ResumeRefused(f"{run_path}: --resume cannot change {', '.join(map(str, refused))}; {fix}")


FIX = (
    "these are fixed for the life of a run (adapter shape, base model, data, seed, examples per step); "
    "resume without changing them, or start a new run with another --out or --overwrite"
)


def read_stored_config(run: RunDir) -> tuple[Config, bytes]:
    """The run's ``config.yaml`` as a Config, and its bytes (to notice a change later)."""
    path = run.config_file
    try:
        raw = path.read_bytes()
        return from_dict(load_yaml(path), source=str(path)), raw
    except ConfigError as e:
        raise CheckpointError(f"{path}: the run's config cannot be read back ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _checkpoint_adapter_config(ckpt: Path) -> dict:
    path = ckpt / "adapter_config.json"
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return conf


def _check_metrics_file(path: Path) -> None:
    """A resumed run rewrites and appends to metrics.jsonl: make sure it can, before anything else."""
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder, not the run's metrics file; move it out of the run folder to resume"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a regular file; move it out of the run folder to resume")
    try:
        with open(path, "rb") as f:
            f.read(1)
        with open(path, "ab"):  # opening to append changes nothing
            pass
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read and append to the run's metrics file ({e.strerror or e})") from None


@dataclass
class ResumePlan:
    """What :func:`plan_resume` found: the checkpoint to continue and what it was checked against."""

    run: RunDir
    ckpt: Path
    state: TrainState
    stored: Config
    stored_bytes: bytes
    adapter_config: dict

    def check_base(self, fingerprint: str, model_path: str) -> None:
        """Refuse a base model whose fingerprint differs from the one the checkpoint records."""

        recorded = recorded_fingerprint(self.adapter_config)
        if recorded is not None and recorded != fingerprint:
            raise refusal(
                self.run.path,
                [Change(FINGERPRINT_KEY, recorded[:16], fingerprint[:16])],
                f"{model_path} is not the base model {self.ckpt} was trained on; resume with that "
                f"model, or start a new run with another --out or --overwrite",
            )

    def check_total(self, total_steps: int, cfg: Config) -> None:
        """The checkpoint's step must not lie beyond the run's end."""
        step = self.state.step
        if step <= total_steps:
            return
        length = [c for c in config_changes(self.stored, cfg) if c.key in ("train.iters", "train.epochs")]
        if length:
            raise ResumeRefused(
                f"{self.run.path}: {length[0].key} {_show(length[0].new)} ends the run at step "
                f"{total_steps}, but {self.ckpt} is already at step {step}; ask for at least "
                f"{step} steps"
            )
        raise CheckpointError(f"{self.ckpt / 'state.json'}: key 'step' is {step}, beyond the run's {total_steps} steps")

    def check_unchanged(self) -> None:
        """Under the run lock: nothing wrote the run folder since the plan was made."""
        try:
            same = (
                self.run.config_file.read_bytes() == self.stored_bytes
                and self.run.latest_checkpoint() == self.ckpt
                and self.run.read_state(self.ckpt) == self.state
            )
        except (OSError, CheckpointError):
            same = False
        if not same:
            raise CheckpointError(
                f"{self.run.path}: another mlx-lora train wrote this run while this one was "
                f"starting; run the command again to resume from its newest checkpoint"
            )

    def begin(self) -> None:
        """Under the run lock, before the first write: check that nothing changed meanwhile, then
        clear what a killed run left half-written (putting back a checkpoint it had renamed aside)."""
        self.check_unchanged()
        self.run.remove_partial_writes()
        m = REPLACED_STEP_DIR.match(self.ckpt.name)
        if m:
            self.ckpt = self.ckpt.with_name(m.group(1))


def plan_resume(run: RunDir, cfg: Config, world_size: int) -> ResumePlan:
    """Check, reading only, that ``cfg`` may continue the run in ``run``: raises
    :class:`ResumeRefused` naming every key it may not change (with old -> new values), or
    :class:`CheckpointError` for a run that cannot be resumed at all."""
    stored, raw = read_stored_config(run)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise CheckpointError(f"{run.path}: no complete checkpoint to resume from; start over with --overwrite")
    state = run.read_state(ckpt)
    adapter_config = _checkpoint_adapter_config(ckpt)
    s, t = stored.train, cfg.train
    # Checkpoints record the examples per step; this fallback is exact for runs that kept one batch size.
    old_global = int(state.extra.get("global_batch", s.batch_size * s.grad_accum * state.world_size))
    refused = refused_changes(stored, cfg, old_global, t.batch_size * t.grad_accum * world_size)
    # The checkpoint's own adapter settings, in case config.yaml was edited by hand.
    listed = {c.key for c in refused}
    for key, name in (
        ("lora.r", "r"),
        ("lora.alpha", "lora_alpha"),
        ("lora.use_dora", "use_dora"),
        ("lora.use_rslora", "use_rslora"),
        ("lora.dropout", "lora_dropout"),
    ):
        new = getattr(cfg.lora, key.split(".")[1])
        if key not in listed and name in adapter_config and adapter_config[name] != new:
            refused.append(Change(key, adapter_config[name], new))
    if refused:
        raise refusal(run.path, refused, FIX)
    _check_metrics_file(run.metrics_file)
    return ResumePlan(run, ckpt, state, stored, raw, adapter_config)
