"""mlx-lm's ``mlx_lm.lora`` config files, translated into this tool's config keys.

An mlx-lm YAML (``model: path``, ``num_layers``, ``lora_parameters: {keys, rank, scale, dropout}``,
``learning_rate``, ``steps_per_eval``, ``adapter_path``, ...) is recognised by its keys and becomes
the nested dict of :mod:`mlx_lora.config` that runs the same job: mlx-lm's own defaults
(``lora.py`` ``CONFIG_DEFAULTS`` of mlx-lm 0.32) fill what the file leaves out, so a key left out
means what it means to mlx-lm, not what it means here. What cannot run the same way is refused,
one line per key; where the job differs in a detail mlx-lm's keys cannot express, a note says so.

mlx-lm's LoRA update is ``scale * (x A) B``; ours is ``(alpha / r) * x A^T B^T``, so
``alpha = scale * rank`` gives the same update.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from mlx_lora.plumbing.errors import ConfigError

MLX_LM_DEFAULTS = {
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "adapter_path": "adapters",
    "save_every": 100,
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "mask_prompt": False,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
}
"""mlx-lm's values for the keys a config leaves out (its ``lora.CONFIG_DEFAULTS``)."""

# Keys only mlx-lm configs have: one of them (or ``model``/``data`` given as a string, ``train`` as
# a bool) marks a file as mlx-lm's.
MLX_LM_ONLY = {
    "fine_tune_type",
    "training_mode",
    "optimizer",
    "optimizer_config",
    "seed",
    "num_layers",
    "batch_size",
    "iters",
    "val_batches",
    "learning_rate",
    "steps_per_report",
    "steps_per_eval",
    "resume_adapter_file",
    "adapter_path",
    "save_every",
    "test",
    "test_batches",
    "max_seq_length",
    "config",
    "grad_checkpoint",
    "grad_accumulation_steps",
    "clear_cache_threshold",
    "lr_schedule",
    "lora_parameters",
    "mask_prompt",
    "report_to",
    "project_name",
    "trust_remote_code",
    "hf_dataset",
    "prompt_feature",
    "completion_feature",
    "text_feature",
    "chat_feature",
}
GRPO_KEYS = {
    "reference_model_path",
    "group_size",
    "beta",
    "epsilon",
    "max_completion_length",
    "use_chat_template",
    "use_prompt",
    "temperature",
    "reward_weights",
    "reward_functions",
    "reward_functions_file",
    "system_feature",
    "answer_feature",
    "chosen_feature",
    "rejected_feature",
    "preference_score_feature",
}
FEATURES = {
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "text_feature": "text",
    "chat_feature": "messages",
}
"""mlx-lm's column-name keys -> the format field each names (data.columns)."""
SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}
"""mlx.optimizers schedules an ``lr_schedule`` may name -> train.schedule."""
ADAM_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": False}
"""mlx.optimizers.Adam/AdamW defaults, which the trainer uses too."""
ADAMW_WEIGHT_DECAY = 0.01
"""mlx.optimizers.AdamW's default weight decay, which mlx-lm's adamw gets when optimizer_config is silent."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_mlx_lm_config(data: Any) -> bool:
    """Whether a config document is mlx-lm's rather than ours."""
    if not isinstance(data, dict):
        return False
    # One of our sections (a mapping, or lora / out) makes it ours: its stray keys get our hints.
    if "lora" in data or "out" in data or any(isinstance(data.get(k), dict) for k in ("model", "data", "train")):
        return False
    if any(k in MLX_LM_ONLY or k in GRPO_KEYS for k in data):
        return True
    return (
        isinstance(data.get("model"), str) or isinstance(data.get("data"), str) or isinstance(data.get("train"), bool)
    )


def key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key of a YAML mapping; {} when it is not one."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Translation:
    """The nested config dict, the notes on what differs, and what was refused."""

    def __init__(self, lines: dict[str, int]):
        self.config: dict = {}
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.lines = lines

    def set(self, key: str, value: Any) -> None:
        section, _, name = key.partition(".")
        if name:
            self.config.setdefault(section, {})[name] = value
        else:
            self.config[section] = value

    def refuse(self, key: str, message: str) -> None:
        top = key.split(".")[0]
        where = f"line {self.lines[top]}: " if top in self.lines else ""
        self.problems.append(f"{where}{key}: {message}")


def _number(t: Translation, key: str, value: Any, kind: type) -> Optional[Any]:
    """``value`` as an int or float, or None after refusing it (the full range check is validate()'s)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        t.refuse(key, f"expected a number, got {_show(value)}")
        return None
    try:
        number = float(value)
    except ValueError:
        t.refuse(key, f"expected a number, got {_show(value)}")
        return None
    if kind is int:
        if not number.is_integer():
            t.refuse(key, f"expected an integer, got {_show(value)}")
            return None
        return int(number)
    return number


def translate(data: dict, methods: tuple = ("sft",), lines: Optional[dict[str, int]] = None) -> Translation:
    """mlx-lm config ``data`` -> :class:`Translation`; raises ConfigError listing every refused key.

    ``methods`` are the training methods this tool has (train.method's choices)."""
    t = Translation(lines or {})
    d = {**MLX_LM_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    lora_params = (
        {**MLX_LM_DEFAULTS["lora_parameters"], **(d["lora_parameters"] or {})}
        if isinstance(d["lora_parameters"], dict)
        else d["lora_parameters"]
    )

    for key in data:
        if key in GRPO_KEYS:
            t.refuse(
                key,
                "a GRPO / preference key of mlx-lm forks; only supervised (training_mode: normal) "
                "mlx-lm configs translate",
            )
        elif key not in MLX_LM_ONLY and key not in ("model", "data", "train"):
            t.refuse(key, "not an mlx-lm config key")

    if isinstance(d.get("model"), str) and d["model"]:
        t.set("model.path", d["model"])
    elif "model" in data:
        t.refuse("model", f"expected a model folder or Hugging Face repo id, got {_show(data['model'])}")
    if data.get("train") is False or d.get("test") is True:
        which = "train: false" if data.get("train") is False else "test: true"
        t.refuse(
            "train" if which.startswith("train") else "test",
            f"{which}: mlx-lora train only trains; score a data set with mlx-lora eval --model M "
            f"--adapter RUN --data D",
        )
    kind = d["fine_tune_type"]
    if kind == "full":
        t.refuse("fine_tune_type", "full: full fine-tuning is not available (LoRA and DoRA only)")
    elif kind in ("lora", "dora"):
        t.set("lora.use_dora", kind == "dora")
    else:
        t.refuse("fine_tune_type", f"expected lora or dora, got {_show(kind)}")
    mode = d.get("training_mode", "normal")
    if mode not in ("normal", "sft"):
        t.refuse(
            "training_mode",
            f"{_show(mode)}: only normal (supervised) mlx-lm configs translate; mlx-lora's "
            f"train.method takes {', '.join(methods)} with its own keys",
        )

    # LoRA: rank, scale (alpha = scale * rank), dropout, keys, the last num_layers blocks.
    if not isinstance(lora_params, dict):
        t.refuse("lora_parameters", f"expected a mapping of rank, scale, dropout, keys; got {_show(lora_params)}")
    else:
        for k in lora_params:
            if k not in ("rank", "scale", "dropout", "keys"):
                hint = " (mlx-lm's is scale = alpha / rank)" if k == "alpha" else ""
                t.refuse(f"lora_parameters.{k}", f"not a key mlx-lm reads (rank, scale, dropout, keys){hint}")
        rank = _number(t, "lora_parameters.rank", lora_params["rank"], int)
        scale = _number(t, "lora_parameters.scale", lora_params["scale"], float)
        dropout = _number(t, "lora_parameters.dropout", lora_params["dropout"], float)
        if rank is not None:
            t.set("lora.r", rank)
        if rank is not None and scale is not None:
            t.set("lora.alpha", scale * rank)
        if dropout is not None:
            t.set("lora.dropout", dropout)
        keys = lora_params.get("keys")
        if keys is None:
            # mlx-lm adapts every linear and expert layer of the blocks, routers included.
            t.set("lora.target_modules", ["all-linear"])
        elif isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys):
            t.set("lora.target_modules", list(keys))
        else:
            t.refuse(
                "lora_parameters.keys",
                f"expected a non-empty list of module paths such as self_attn.q_proj, got {_show(keys)}",
            )
    n = _number(t, "num_layers", d["num_layers"], int)
    if n is not None:
        # mlx-lm adapts model.layers[-max(num_layers, 0):]: -1 (or 0) means every block.
        t.set("lora.layers_to_transform", None if n <= 0 else list(range(-n, 0)))

    # Optimisation.
    opt = d["optimizer"]
    opt = opt.lower() if isinstance(opt, str) else opt
    opt_conf = d.get("optimizer_config") or {}
    if not isinstance(opt_conf, dict):
        t.refuse("optimizer_config", f"expected a mapping of optimizer name to its arguments, got {_show(opt_conf)}")
        opt_conf = {}
    own = (opt_conf.get(opt) if isinstance(opt, str) else None) or {}
    if opt in ("adam", "adamw"):
        t.set("train.optimizer", opt)
        if not isinstance(own, dict):
            t.refuse(f"optimizer_config.{opt}", f"expected a mapping, got {_show(own)}")
            own = {}
        for k, v in own.items():
            if k == "weight_decay" and opt == "adamw":
                continue
            if k in ADAM_DEFAULTS and (list(v) if isinstance(v, (list, tuple)) else v) == ADAM_DEFAULTS[k]:
                continue
            t.refuse(
                f"optimizer_config.{opt}.{k}",
                f"{_show(v)}: mlx-lora's {opt} uses mlx's defaults (betas "
                f"[0.9, 0.999], eps 1e-8, no bias correction) and cannot take it",
            )
        if opt == "adamw":
            wd = _number(t, "optimizer_config.adamw.weight_decay", own.get("weight_decay", ADAMW_WEIGHT_DECAY), float)
            if wd is not None:
                t.set("train.weight_decay", wd)
    elif opt in ("sgd", "adafactor", "muon"):
        why = {
            "sgd": "mlx-lm's SGD has no momentum unless told, mlx-lora's has 0.9",
            "adafactor": "mlx-lm's Adafactor sets its own step size, mlx-lora's follows the learning rate",
            "muon": "not available",
        }[opt]
        t.refuse("optimizer", f"{opt}: {why}; use adam or adamw")
    else:
        t.refuse("optimizer", f"expected adam or adamw, got {_show(opt)}")
    t.set("train.max_grad_norm", None)  # mlx-lm does not clip gradients
    schedule = d.get("lr_schedule")
    lr = _number(t, "learning_rate", d["learning_rate"], float)
    if schedule is None:
        t.set("train.schedule", "constant")
        if lr is not None:
            t.set("train.lr", lr)
    else:
        _schedule(t, schedule, d, "learning_rate" in data)

    for key, target, kind_ in (
        ("batch_size", "train.batch_size", int),
        ("grad_accumulation_steps", "train.grad_accum", int),
        ("seed", "train.seed", int),
        ("max_seq_length", "data.max_seq_length", int),
    ):
        value = _number(t, key, d[key], kind_)
        if value is not None:
            t.set(target, value)
    # mlx-lm counts these in micro-batches (an update every grad_accumulation_steps of them, a
    # last partial group never applied); mlx-lora counts optimizer steps.
    accum = _number(t, "grad_accumulation_steps", d["grad_accumulation_steps"], int)
    accum = accum if accum and accum > 0 else 1
    counted = []
    for key, target in (
        ("iters", "train.iters"),
        ("steps_per_report", "train.log_every"),
        ("steps_per_eval", "train.eval_every"),
        ("save_every", "train.save_every"),
    ):
        value = _number(t, key, d[key], int)
        if value is None:
            continue
        if accum > 1 and value > 0:
            steps = value // accum if key == "iters" else max(1, round(value / accum))
            if key == "iters" and steps < 1:
                t.refuse("iters", f"{value} micro-batches make no optimizer step with grad_accumulation_steps {accum}")
                continue
            counted.append(f"{key} {value} -> {steps}")
            value = steps
        t.set(target, value)
    if counted:
        t.notes.append(
            f"grad_accumulation_steps {accum}: mlx-lm counts micro-batches, mlx-lora optimizer steps ("
            + ", ".join(counted)
            + ")"
        )
    vb = _number(t, "val_batches", d["val_batches"], int)
    if vb is not None:
        t.set("train.eval_batches", None if vb == -1 else vb)  # -1: the whole validation set
    for key, target in (("grad_checkpoint", "train.grad_checkpoint"), ("trust_remote_code", "model.trust_remote_code")):
        if key in data and data[key] is not None:
            if not isinstance(data[key], bool):
                t.refuse(key, f"expected true or false, got {_show(data[key])}")
            else:
                t.set(target, data[key])
    out = d["adapter_path"]
    if isinstance(out, str) and out.strip():
        t.set("out", out)
    else:
        t.refuse("adapter_path", f"expected a folder path, got {_show(out)}")

    # Data: which tokens carry loss, where rows come from, what their columns are called.
    mask = d["mask_prompt"]
    if not isinstance(mask, bool):
        t.refuse("mask_prompt", f"expected true or false, got {_show(mask)}")
    else:
        # mlx-lm's mask_prompt keeps the loss on the last message (the completion) only.
        t.set("data.train_on", "last" if mask else "all")
        if not mask:
            t.notes.append(
                "mask_prompt is false, so the loss covers every token, prompt included, as in mlx-lm "
                "(mlx-lora's own default trains on the assistant turns only)"
            )
    columns = _columns(t, data, "")
    if d.get("hf_dataset"):
        _hf_dataset(t, d["hf_dataset"], columns)
    else:
        if columns:
            t.set("data.columns", columns)
        _data_path(t, data.get("data"))

    for key, ok in (("resume_adapter_file", None), ("clear_cache_threshold", 0), ("project_name", None)):
        if key in data and data[key] not in (ok, None):
            hint = {
                "resume_adapter_file": "continue a run of mlx-lora with --resume RUN instead",
                "clear_cache_threshold": "set train.cache_limit_gb instead",
                "project_name": "name the wandb project with WANDB_PROJECT instead",
            }[key]
            t.refuse(key, f"not translated; {hint}")
    report = data.get("report_to")
    if report is not None:
        names = [s.strip() for s in report.split(",")] if isinstance(report, str) else report
        if not isinstance(names, list) or any(n not in ("wandb",) for n in names):
            t.refuse("report_to", f"{_show(report)}: only wandb translates (swanlab is not available)")
        else:
            t.set("train.report_to", names)
    if t.problems:
        raise ConfigError(t.problems)
    return t


def _schedule(t: Translation, schedule: Any, d: dict, lr_given: bool) -> None:
    """``lr_schedule: {name, arguments, warmup, warmup_init}`` -> train.schedule, lr, warmup_steps, min_lr_ratio."""
    if not isinstance(schedule, dict) or not isinstance(schedule.get("arguments"), list) or not schedule["arguments"]:
        t.refuse("lr_schedule", f"expected {{name, arguments: [...], warmup}}, got {_show(schedule)}")
        return
    name, args = schedule.get("name"), schedule["arguments"]
    if name not in SCHEDULES:
        t.refuse("lr_schedule.name", f"{_show(name)}: only {', '.join(SCHEDULES)} translate")
        return
    for k in schedule:
        if k not in ("name", "arguments", "warmup", "warmup_init"):
            t.refuse(f"lr_schedule.{k}", "not a key mlx-lm reads (name, arguments, warmup, warmup_init)")
    nums = [_number(t, f"lr_schedule.arguments[{i}]", a, float) for i, a in enumerate(args)]
    if any(v is None for v in nums):
        return
    warmup = _number(t, "lr_schedule.warmup", schedule.get("warmup", 0), int) or 0
    init = _number(t, "lr_schedule.warmup_init", schedule.get("warmup_init", 0.0), float)
    if init:
        t.refuse("lr_schedule.warmup_init", f"{init:g}: mlx-lora's warmup starts from 0")
    # cosine_decay(init, decay_steps, end=0); linear_schedule(init, end, steps)
    expected = 3 if name == "linear_schedule" else None
    if (expected and len(nums) != expected) or (not expected and len(nums) not in (2, 3)):
        t.refuse(
            "lr_schedule.arguments",
            f"{name} takes {'[init, end, steps]' if expected else '[init, steps, end]'}, got {_show(args)}",
        )
        return
    peak = nums[0]
    if name == "cosine_decay":
        steps, end = int(nums[1]), (nums[2] if len(nums) > 2 else 0.0)
    else:
        end, steps = nums[1], int(nums[2])
    t.set("train.schedule", SCHEDULES[name])
    t.set("train.lr", peak)
    t.set("train.warmup_steps", warmup)
    if peak > 0:
        t.set("train.min_lr_ratio", end / peak)
    iters = d.get("iters")
    if isinstance(iters, int) and steps != iters - warmup:
        t.notes.append(
            f"lr_schedule decays over {steps} steps in mlx-lm; mlx-lora decays over iters - warmup = "
            f"{iters - warmup} steps"
        )
    if lr_given and d["learning_rate"] != peak:
        t.notes.append(f"learning_rate is not used: lr_schedule's first argument ({peak:g}) is the peak, as in mlx-lm")


def _columns(t: Translation, source: dict, prefix: str) -> dict:
    cols = {}
    for key, field in FEATURES.items():
        value = source.get(key)
        if value is None or value == field:
            continue
        if not isinstance(value, str) or not value:
            t.refuse(prefix + key, f"expected a column name, got {_show(value)}")
        else:
            cols[field] = value
    return cols


def _data_path(t: Translation, data: Any) -> None:
    """mlx-lm's ``data``: a local folder of {train,valid,test}.jsonl, else a Hugging Face data set id."""
    if data is None:
        return
    if not isinstance(data, str) or not data.strip():
        t.refuse("data", f"expected a folder or a Hugging Face data set id, got {_show(data)}")
    elif not Path(data).expanduser().exists() and HUB_ID.match(data):
        t.set("data.path", "hf:" + data)
    else:
        t.set("data.path", data)


def _hf_dataset(t: Translation, spec: Any, columns: dict) -> None:
    """``hf_dataset: {path, train_split, valid_split, *_feature, config}`` (or a list of them)."""
    entries = spec if isinstance(spec, list) else [spec]
    if len(entries) != 1 or not isinstance(entries[0], dict):
        t.refuse("hf_dataset", "only one data set (a mapping with path) translates; mix several with data.sources")
        return
    e = entries[0]
    path = e.get("path", e.get("name"))
    if not isinstance(path, str) or not path:
        t.refuse("hf_dataset.path", f"expected a Hugging Face data set id, got {_show(path)}")
        return
    for k in e:
        if k not in ("path", "name", "train_split", "valid_split", "test_split", "config", *FEATURES):
            t.refuse(f"hf_dataset.{k}", "not a key mlx-lm reads")
    cols = {**columns, **_columns(t, e, "hf_dataset.")}
    config = e.get("config") or {}
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(config, dict) or any(k != "name" for k in config):
        t.refuse("hf_dataset.config", "only {name: ...} translates (the data set's configuration)")
    spec_id = "hf:" + path + (f":{name}" if name else "")
    split = e.get("train_split")
    if split is None:
        t.notes.append(
            "hf_dataset has no train_split: mlx-lm trains on train[:80%] and validates on train[-10%:]; "
            "mlx-lora trains on the train split and validates on the data set's validation split (or, "
            "without one, on a data.valid_fraction share of train)"
        )
    elif not isinstance(split, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", split):
        t.refuse("hf_dataset.train_split", f"{_show(split)}: only a whole split translates (no [:80%] slices)")
    else:
        spec_id += "@" + split
        if e.get("valid_split") is not None:
            t.notes.append(
                f"hf_dataset.valid_split {e['valid_split']!r} is not used: with @{split} mlx-lora "
                f"validates on a data.valid_fraction share of it"
            )
    t.set("data.path", spec_id)
    if cols:
        t.set("data.columns", cols)
