"""Things that watch training: the progress display, the metrics file, the loss plot.

A callback is any object with some of ``on_train_start(trainer)``, ``on_step(trainer, metrics)``,
``on_eval(trainer, metrics)``, ``on_checkpoint(trainer, path)`` and ``on_train_end(trainer, result)``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, TextIO

from mlx_lora.plumbing import ownership
from mlx_lora.plumbing.io import atomic_path, atomic_write_text
from mlx_lora.plumbing.progress import bar, show_bar

# Preference tuning's metrics (train.method dpo, orpo; see mlx_lora.training.preference), recorded when present.
PREFERENCE_KEYS = (
    "reward_accuracy",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "nll",
)


def _preference_text(m: dict, prefix: str = "") -> str:
    """'  acc 0.75  margin 0.123' for a preference run's metrics, else empty."""
    if prefix + "reward_accuracy" not in m:
        return ""
    return f"  acc {m[prefix + 'reward_accuracy']:.2f}  margin {m[prefix + 'reward_margin']:.3f}"


def _grpo_text(m: dict) -> str:
    """'  reward 0.38 (std 0.29, 25% flat)  kl 0.0012  len 9.5  sample 21.0s update 4.2s' for a GRPO step."""
    if "reward_std" not in m:
        return ""
    kl = f"  kl {m['kl']:.4f}" if "kl" in m else ""
    return (
        f"  reward {m['reward']:.3f} (std {m['reward_std']:.3f}, {100 * m['zero_std_groups']:.0f}% flat){kl}  "
        f"len {m['completion_length']:.1f}  sample {m['sample_s']:.1f}s update {m['update_s']:.1f}s"
    )


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def fmt_rate(x: float) -> str:
    """Tokens/s with the digits that matter: a slow run (a quantized base on the CPU backend, a
    large model) shows 0.3, not 0."""
    if not math.isfinite(x) or x >= 10:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 0.1 else f"{x:.2g}"


class Progress:
    """A live bar (tqdm) on a terminal, plain log lines otherwise (CI, files, pipes); see
    :func:`mlx_lora.plumbing.progress.show_bar` for ``MLX_LORA_PROGRESS``."""

    # What follows the bar: step count, then this step's numbers (tqdm's own rate and ETA would
    # ignore the time evaluations and checkpoints take, which the trainer's ETA includes).
    BAR_FORMAT = "[{bar:24}] {n_fmt}/{total_fmt}{postfix}"

    def __init__(self, stream: Optional[TextIO] = None, log_every: int = 10, tty: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.tty = show_bar(self.stream, tty)
        self.log_every = log_every
        self._bar = None

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)  # above the bar, which is drawn again below
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def on_train_start(self, trainer) -> None:
        """The first step also compiles it (and with DPO runs the reference model): often the
        longest wait of a run, so it is announced rather than left silent."""
        step, total = trainer.state.step, trainer.total_steps
        if step >= total:
            return
        if self.tty:
            self._bar = bar(total, "train", stream=self.stream, initial=step, ascii="-#", bar_format=self.BAR_FORMAT)
            self._bar.set_postfix_str(f"step {step + 1}: compiling and running the first step")
            return
        self._line(f"training: compiling and running step {step + 1} of {total} (the first is the slowest)")

    def on_step(self, trainer, m: dict) -> None:
        step, total = m["step"], m["total_steps"]
        eta = _fmt_time(m.get("eta_s", float("nan")))
        if self.tty:
            if self._bar is None:
                self._bar = bar(
                    total, "train", stream=self.stream, initial=step - 1, ascii="-#", bar_format=self.BAR_FORMAT
                )
            self._bar.set_postfix_str(
                f"loss {m['loss']:.4f}{_preference_text(m)}{_grpo_text(m)} lr {m['lr']:.2e} "
                f"{fmt_rate(m['tokens_per_s'])} tok/s eta {eta} peak {m['peak_memory_gb']:.2f} GB",
                refresh=False,
            )
            self._bar.update(step - self._bar.n)
            return
        if step % self.log_every and step != total:
            return
        self._line(
            f"step {step}/{total}  loss {m['loss']:.4f}{_preference_text(m)}{_grpo_text(m)}  lr {m['lr']:.2e}  "
            f"{fmt_rate(m['tokens_per_s'])} tok/s  eta {eta}  peak {m['peak_memory_gb']:.2f} GB"
        )

    def on_eval(self, trainer, m: dict) -> None:
        best = " (best)" if m.get("is_best") else ""
        if "val_reward_accuracy" in m:  # a preference loss: perplexity means nothing
            self._line(f"step {m['step']}: val loss {m['val_loss']:.4f}{_preference_text(m, 'val_')}{best}")
            return
        if "val_reward" in m:  # GRPO: the mean reward of greedy answers (val loss is its negative)
            self._line(f"step {m['step']}: val reward {m['val_reward']:.4f} (greedy){best}")
            return
        self._line(f"step {m['step']}: val loss {m['val_loss']:.4f}  ppl {m['val_ppl']:.2f}{best}")

    def on_checkpoint(self, trainer, path) -> None:
        if not self.tty:
            self._line(f"saved checkpoint {path}")

    def on_train_end(self, trainer, result) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


GRPO_KEYS = (
    "reward",
    "reward_std",
    "zero_std_groups",
    "completion_length",
    "truncated_completions",
    "kl",
    "clip_ratio",
    "sample_s",
    "update_s",
)
"""A GRPO step's metrics besides ``reward_<name>``, the mean of each reward function (mlx_lora.training.grpo)."""
STEP_KEYS = (
    "step",
    "loss",
    "lr",
    "tokens",
    "trained_tokens",
    "tokens_per_s",
    "peak_memory_gb",
    "elapsed_s",
    "shapes",
    "padding",
    *PREFERENCE_KEYS,
    *GRPO_KEYS,
)


def step_record(m: dict, log_every: int = 1) -> Optional[dict]:
    """The record ``metrics.jsonl`` (and every tracker, see :mod:`mlx_lora.training.tracking`) keeps of a
    step, or None for a step it does not log (every ``log_every``-th, the first and the last)."""
    if m["step"] % log_every == 0 or m["step"] in (1, m["total_steps"]):
        record = {k: m[k] for k in STEP_KEYS if k in m}
        record.update({k: v for k, v in m.items() if k.startswith("reward_") and k not in record})
        return record
    return None


def eval_record(m: dict) -> dict:
    """The record of an evaluation."""
    record = {k: m[k] for k in ("step", "val_loss", "val_ppl", *("val_" + k for k in PREFERENCE_KEYS)) if k in m}
    record.update({k: v for k, v in m.items() if k.startswith("val_reward") and k not in record})
    return record


class MetricsFile:
    """Appends one JSON object per logged step / evaluation to ``metrics.jsonl``."""

    def __init__(self, path, log_every: int = 1):
        self.path = Path(path)
        self.log_every = log_every

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file tells one consistent story."""
        if not self.path.exists():
            return

        keep = []
        # A crash can cut a line short, even inside a multi-byte character.
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                at = record.get("step", 0) if isinstance(record, dict) else None
                if isinstance(at, int) and at <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        atomic_write_text(self.path, "".join(l + "\n" for l in keep))
        ownership.record(self.path.parent, self.path.name)

    def _write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        ownership.record(self.path.parent, self.path.name)  # the run folder's marker follows every line

    def on_step(self, trainer, m: dict) -> None:
        record = step_record(m, self.log_every)
        if record is not None:
            self._write(record)

    def on_eval(self, trainer, m: dict) -> None:
        self._write(eval_record(m))


def plot_losses(metrics_path, out_png) -> Optional[Path]:
    """Loss curves as a PNG when matplotlib is installed (the ``plot`` extra); else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses, vsteps, vlosses = [], [], [], []
    for line in Path(metrics_path).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash is no reason to lose the plot
        if not isinstance(r, dict):
            continue
        if "loss" in r:
            steps.append(r["step"]), losses.append(r["loss"])
        if "val_loss" in r:
            vsteps.append(r["step"]), vlosses.append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train")
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)

    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)
