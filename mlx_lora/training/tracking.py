"""Experiment tracking (``train.report_to``): the records of ``metrics.jsonl`` sent to TensorBoard
and Weights & Biases as well, step for step, with the same names.

- ``tensorboard``: event files in ``RUN/tensorboard/``, one scalar per record key (``loss``,
  ``lr``, ``tokens_per_s``, ... and ``val_loss``, ``val_ppl``) at the record's step. A resumed
  run appends to the same folder and first writes TensorBoard's "session start" marker at the
  resumed step, so readers drop what the killed run logged past its checkpoint, as
  ``metrics.jsonl`` does.
- ``wandb``: a run in ``RUN/wandb/``, its config the run's config. With ``WANDB_MODE`` unset and
  no API key configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``) it runs
  offline (``wandb sync RUN/wandb/offline-run-*`` uploads it later). A resumed run continues the
  same wandb run id.

Both are optional extras (``pip install 'mlx-lora[tensorboard]'`` / ``'mlx-lora[wandb]'``);
:func:`check_available` refuses a missing one before training starts.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from mlx_lora.plumbing.errors import ConfigError
from mlx_lora.plumbing.io import atomic_write_text
from mlx_lora.plumbing.ownership import record
from mlx_lora.training.callbacks import eval_record, step_record

REPORTERS = ("tensorboard", "wandb")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_FILE = "mlx-lora-run-id"


def check_available(report_to: Optional[Sequence[str]]) -> None:
    """Raise one ConfigError naming the extra to install when a tracker's package is missing."""
    for name in report_to or ():
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            raise ConfigError(
                [f"train.report_to: {name} is not installed; install it with pip install 'mlx-lora[{name}]'"]
            ) from None


def trackers(report_to: Optional[Sequence[str]], run_dir, config: dict, log_every: int) -> list:
    """The callbacks ``report_to`` asks for (the trainer calls them where it calls MetricsFile)."""
    out = []
    for name in dict.fromkeys(report_to or ()):  # each once, in the order given
        if name == "tensorboard":
            out.append(TensorBoard(Path(run_dir) / "tensorboard", log_every))
        elif name == "wandb":
            out.append(WandB(Path(run_dir), config, log_every))
    return out


class _Tracker:
    def __init__(self, log_every: int):
        self.log_every = log_every

    def scalars(self, step: int, values: dict) -> None:
        raise NotImplementedError

    def on_step(self, trainer, m: dict) -> None:
        record = step_record(m, self.log_every)
        if record is not None:
            self.scalars(record["step"], record)

    def on_eval(self, trainer, m: dict) -> None:
        record = eval_record(m)
        self.scalars(record["step"], record)


class TensorBoard(_Tracker):
    """Scalars in TensorBoard event files (written with the ``tensorboard`` package's own writer)."""

    def __init__(self, logdir, log_every: int = 1):
        super().__init__(log_every)
        self.logdir = Path(logdir)
        self._writer = None

    def on_train_start(self, trainer) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir))
        step = trainer.state.step
        if step > 0:  # resumed: records past the checkpoint are void (see the module docstring)
            self._writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
            self._writer.flush()

    def scalars(self, step: int, values: dict) -> None:

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            return
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items() if k != "step"])
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()  # a record costs little; a killed run keeps every one it logged

    def on_checkpoint(self, trainer, path) -> None:
        # Another library writes these files: the run folder's marker takes them as they are now.
        record(self.logdir.parent, self.logdir.name)

    def on_train_end(self, trainer, result) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            record(self.logdir.parent, self.logdir.name)


def wandb_mode() -> Optional[str]:
    """ "offline" unless ``WANDB_MODE`` says otherwise or an API key is configured; None lets
    wandb decide (``WANDB_MODE`` or its online default)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        import netrc

        if netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("://")[-1]):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandB(_Tracker):
    """A Weights & Biases run in ``RUN/wandb/``."""

    def __init__(self, run_dir, config: dict, log_every: int = 1):
        super().__init__(log_every)
        self.run_dir, self.config = Path(run_dir), config
        self._run = None

    def on_train_start(self, trainer) -> None:
        import wandb

        folder = self.run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if trainer.state.step > 0 and id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            mode=wandb_mode(),
            project=os.environ.get("WANDB_PROJECT", "mlx-lora"),
            name=self.run_dir.name,
            config=self.config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def scalars(self, step: int, values: dict) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in values.items() if k != "step"}, step=step)

    def on_checkpoint(self, trainer, path) -> None:
        record(self.run_dir, "wandb")  # wandb writes these files: recorded as they are now

    def on_train_end(self, trainer, result) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
            record(self.run_dir, "wandb")
