"""What a run folder fixes for the commands that use its adapter (generate, chat, eval, serve).

A training run records its base model (``adapter_config.json``: ``base_model_name_or_path``) and
its whole configuration (``config.yaml``): so ``mlx-lora chat runs/NAME/run`` needs no
``--model``, and evaluation reads the run's sequence length, chat template and masking
(``data.max_seq_length``, ``data.chat_template``, ``data.train_on``). A flag given on the command
line always wins; the run fills in only what was not given. A checkpoint folder
(``checkpoints/step-N``, ``checkpoints/best``) is read with its run's ``config.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from mlx_lora.plumbing.errors import MlxLoraError

ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunInputs:
    """The facts a run (or adapter) folder records for inference; None where it records nothing."""

    adapter: str
    base_model: Optional[str] = None
    max_seq_length: Optional[int] = None
    chat_template: Optional[str] = None
    train_on: Optional[str] = None
    config_path: Optional[Path] = None


def is_adapter_folder(path) -> bool:
    """A folder holding an adapter (``adapter_config.json``) and no model of its own (``config.json``)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def find_config(folder: Path) -> Optional[Path]:
    """The ``config.yaml`` of the run that ``folder`` (the run, or one of its checkpoints) belongs to."""
    if (folder / CONFIG_FILE).is_file():
        return folder / CONFIG_FILE
    if folder.parent.name == "checkpoints" and (folder.parent.parent / CONFIG_FILE).is_file():
        return folder.parent.parent / CONFIG_FILE
    return None


def read_run(adapter: str) -> RunInputs:
    """The base model and data settings recorded by the adapter or run folder ``adapter``."""
    folder = Path(str(adapter)).expanduser()
    if folder.is_file():
        folder = folder.parent
    base = None
    conf_path = folder / ADAPTER_CONFIG
    if conf_path.is_file():
        try:
            base = json.loads(conf_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            base = None  # the adapter loader names what is wrong with the file when it reads it
    cfg_path = find_config(folder)
    data: dict = {}
    if cfg_path is not None:
        try:
            raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise MlxLoraError(
                f"{cfg_path}: cannot read the run's configuration ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        if not isinstance(raw, dict):
            raise MlxLoraError(f"{cfg_path}: the run's configuration is not a mapping of sections")
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        if not base and isinstance(model.get("path"), str):
            base = model["path"]
    length = data.get("max_seq_length")
    return RunInputs(
        adapter=str(adapter),
        base_model=base if isinstance(base, str) and base.strip() else None,
        max_seq_length=length if isinstance(length, int) and not isinstance(length, bool) else None,
        chat_template=data.get("chat_template") if isinstance(data.get("chat_template"), str) else None,
        train_on=data.get("train_on") if isinstance(data.get("train_on"), str) else None,
        config_path=cfg_path,
    )


def resolve(
    model: Optional[str], adapter: Optional[str], run: Optional[str] = None
) -> tuple[str, Optional[str], Optional[RunInputs]]:
    """(model, adapter, what the run records) for a command given any of: ``run`` (a run folder
    as the command's argument), ``--adapter``, ``--model``. ``--model`` may be left out when the
    adapter records its base; a run folder given as ``--model`` is taken as the adapter."""
    if run is not None:
        if adapter is not None and adapter != run:
            raise MlxLoraError(f"give the run folder once: {run} as the argument, or --adapter {adapter}, not both")
        adapter = run
    if model is not None and adapter is None and is_adapter_folder(model):
        model, adapter = None, model  # `--model runs/x/run`: a run folder where the model goes
    inputs = read_run(adapter) if adapter is not None else None
    if model is None:
        if inputs is None:
            raise MlxLoraError(
                "no model given: pass --model (a folder, hub id or .gguf), or a run folder "
                "such as runs/quickstart/run, which records its base model"
            )
        if inputs.base_model is None:
            raise MlxLoraError(
                f"{adapter}: the adapter does not record its base model "
                f"(adapter_config.json has no base_model_name_or_path); pass --model"
            )
        model = inputs.base_model
    return model, adapter, inputs


def serve_name(run: str) -> str:
    """The model name a run folder is served as: its folder name, or its parent's for ``.../run``
    and checkpoint folders (``runs/support/run`` -> ``support``)."""
    p = Path(str(run)).expanduser().resolve()
    parts = [x for x in p.parts if x not in ("/",)]
    skip = {"run", "checkpoints", "best", "adapter"}
    for name in reversed(parts):
        if name not in skip and not name.startswith("step-"):
            return name
    return "adapter"
