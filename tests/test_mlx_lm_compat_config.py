"""Coming from mlx-lm: its config files and flag spellings run the same job here, and what we
write loads back in mlx-lm.

Expectations come from mlx-lm itself: the layers it wraps are those of
``mlx_lm.tuner.utils.linear_to_lora_layers`` applied to the same model, the logits of an
exported adapter are those of ``mlx_lm.load(base, adapter_path=...)``; the key meanings are those
of mlx-lm's ``lora.py`` (``CONFIG_DEFAULTS``, ``train_model``, ``build_schedule``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from cli_harness import run_main

import mlx_lora.commands.api
from mlx_lora import config as config_mod
from mlx_lora.config import LoraConfig, build
from mlx_lora.mlx_lm_config import is_mlx_lm_config, translate
from mlx_lora.model.adapters import apply_lora, fuse_model, load_adapter, read_adapter, save_adapter
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing.errors import ConfigError
from mlx_lora.testing import make_tiny_dataset

# mlx-lm's examples/lora_config.yaml (ml-explore/mlx-lm), verbatim but for the model and data paths.
EXAMPLE = """\
# The path to the local model directory or Hugging Face repo.
model: "MODEL"

# Whether or not to train (boolean)
train: true

# The fine-tuning method: "lora", "dora", or "full".
fine_tune_type: lora

# Wether to use normal training or GRPO
training_mode: "normal"

# The Optimizer with its possible inputs
optimizer: adamw
# optimizer_config:
#   adamw:
#     betas: [0.9, 0.98]
#     eps: 1e-6
#     weight_decay: 0.05
#     bias_correction: true

# Directory with {train, valid, test}.jsonl files
data: "DATA"

# The PRNG seed
seed: 0

# Number of layers to fine-tune
num_layers: 16

# Minibatch size.
batch_size: 4

# Iterations to train for.
iters: 1000

# Number of validation batches, -1 uses the entire validation set.
val_batches: 25

# Adam learning rate.
learning_rate: 1e-5

# Number of training steps between loss reporting.
steps_per_report: 10

# Number of training steps between validations.
steps_per_eval: 200

# Load path to resume training with the given adapter weights.
resume_adapter_file: null

# Save/load path for the trained adapter weights.
adapter_path: "adapters"

# Save the model every N iterations.
save_every: 100

# Evaluate on the test set after training
test: false

# Number of test set batches, -1 uses the entire test set.
test_batches: 100

# Maximum sequence length.
max_seq_length: 2048

# Use gradient checkpointing to reduce memory use.
grad_checkpoint: false

# LoRA parameters can only be specified in a config file
lora_parameters:
  # The layer keys to apply LoRA to.
  # These will be applied for the last lora_layers
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0

# Schedule can only be specified in a config file, uncomment to use.
#lr_schedule:
#  name: cosine_decay
#  warmup: 100 # 0 for no warmup
#  warmup_init: 1e-7 # 0 if not specified
#  arguments: [1e-5, 1000, 1e-7] # passed to scheduler
"""

TOKENS = mx.array([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64]])


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_dataset(folder / "train.jsonl", "chat", n=8)
    make_tiny_dataset(folder / "valid.jsonl", "chat", n=4, seed=1)
    return folder


def _mlx_lm_wrapped(model_dir: Path, num_layers: int, params: dict, dora: bool = False) -> dict[str, nn.Module]:
    """Module path -> layer of what mlx-lm's own linear_to_lora_layers wraps in this model."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(model_dir)
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    return {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear, DoRALinear))}


def _cfg(text: str, tmp_path: Path, **fill) -> Path:
    for k, v in fill.items():
        text = text.replace(k, str(v))
    path = tmp_path / "mlx_lm.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------
# the example config, end to end


def test_mlx_lm_example_config_trains_unchanged_with_the_layers_mlx_lm_gives(
    capsys, tmp_path, tiny_model_dir, monkeypatch
):
    model_dir = tiny_model_dir("llama", num_layers=18)  # 16 of 18 blocks: "the last N" is tested
    cfg = _cfg(EXAMPLE, tmp_path, MODEL=model_dir, DATA=_data(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # adapter_path: "adapters" is relative, as in mlx-lm
    code, out, err = run_main(capsys, ["train", "-c", str(cfg), "--iters", "2"])
    assert code == 0, err
    # the equivalent config, printed once, and the one line on the prompt mask
    assert err.count("an mlx-lm config; the same job in mlx-lora's keys:") == 1
    assert err.count("note: mask_prompt is false") == 1
    run = tmp_path / "adapters"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["iters"] == 2 and written["data"]["train_on"] == "all"

    info, state = read_adapter(run)
    theirs = _mlx_lm_wrapped(
        model_dir, 16, {"keys": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 8, "scale": 20.0, "dropout": 0.0}
    )
    assert set(info.targets) == set(theirs)
    assert len(theirs) == 32 and not any(".layers.0." in p or ".layers.1." in p for p in theirs)
    assert info.lora.r == 8 and info.lora.scale == pytest.approx(20.0)
    for path, layer in theirs.items():
        assert tuple(state[f"base_model.model.{path}.lora_A.weight"].shape) == tuple(layer.lora_a.T.shape)
        assert layer.scale == pytest.approx(info.lora.scale)

    # and the run folder loads back in mlx-lm, with our fused model's logits
    from mlx_lm import load as mlx_lm_load

    loaded, _ = mlx_lm_load(str(model_dir), adapter_path=str(run))
    ours, _, _ = load_model(str(model_dir), with_tokenizer=False)
    load_adapter(ours, run)
    fuse_model(ours)
    np.testing.assert_allclose(np.array(loaded(TOKENS)), np.array(ours(TOKENS)), atol=2e-5, rtol=1e-5)


SELECTIONS = {
    "llama": [(-1, None), (1, ["mlp.down_proj"]), (2, ["self_attn.o_proj", "mlp.up_proj"]), (3, None)],
    "qwen3_moe": [(-1, None), (1, ["mlp.switch_mlp.down_proj"]), (2, ["self_attn.k_proj", "mlp.gate"]), (2, None)],
}


@pytest.mark.parametrize("arch,num_layers,keys", [(a, n, k) for a, sel in SELECTIONS.items() for n, k in sel])
def test_translated_selection_wraps_what_mlx_lm_wraps(tmp_path, tiny_model_dir, arch, num_layers, keys):
    """num_layers (the last N blocks; -1 all) and keys (absent: every linear and expert layer,
    MoE routers included) select the same module paths, rank and scale as mlx-lm."""
    model_dir = tiny_model_dir(arch, num_layers=3)
    params = {"rank": 4, "scale": 3.5, "dropout": 0.0, **({"keys": keys} if keys else {})}
    t = translate({"model": str(model_dir), "data": str(tmp_path), "num_layers": num_layers, "lora_parameters": params})
    lora = config_mod.from_dict(t.config).lora
    model, _, _ = load_model(str(model_dir), with_tokenizer=False)
    ours = apply_lora(model, lora)
    theirs = _mlx_lm_wrapped(model_dir, num_layers, dict(params))
    assert set(ours) == set(theirs)
    assert lora.r == 4 and lora.scale == pytest.approx(3.5)


# ------------------------------------------------------------------------------------------
# key by key


def _translated(extra: dict) -> dict:
    return translate({"model": "m", "data": "/", **extra}).config


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize(
    "given,key,value",
    [
        ({}, "train.optimizer", "adam"),  # mlx-lm's default optimizer
        ({}, "train.lr", 1e-5),
        ({}, "train.iters", 1000),
        ({}, "train.schedule", "constant"),  # no lr_schedule: a constant rate
        ({}, "train.max_grad_norm", None),  # mlx-lm never clips
        ({}, "lora.layers_to_transform", list(range(-16, 0))),
        ({}, "lora.alpha", 160.0),  # scale 20 * rank 8
        ({}, "lora.target_modules", ["all-linear"]),
        ({}, "data.train_on", "all"),
        ({}, "out", "adapters"),
        ({}, "train.eval_every", 200),
        ({}, "train.eval_batches", 25),
        ({"num_layers": -1}, "lora.layers_to_transform", None),
        ({"num_layers": 3}, "lora.layers_to_transform", [-3, -2, -1]),
        (
            {"lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.1, "keys": ["mlp.gate_proj"]}},
            "lora.alpha",
            32.0,
        ),
        ({"lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.1}}, "lora.r", 16),
        ({"lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.1}}, "lora.dropout", 0.1),
        (
            {"lora_parameters": {"rank": 4, "scale": 1.0, "keys": ["self_attn.q_proj"]}},
            "lora.target_modules",
            ["self_attn.q_proj"],
        ),
        ({"fine_tune_type": "dora"}, "lora.use_dora", True),
        ({"fine_tune_type": "lora"}, "lora.use_dora", False),
        ({"optimizer": "adamw"}, "train.weight_decay", 0.01),  # mlx's AdamW default
        ({"optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.05}}}, "train.weight_decay", 0.05),
        ({"optimizer": "AdamW"}, "train.optimizer", "adamw"),
        ({"learning_rate": 3e-4}, "train.lr", 3e-4),
        ({"mask_prompt": True}, "data.train_on", "last"),
        ({"grad_checkpoint": True}, "train.grad_checkpoint", True),
        ({"iters": 7}, "train.iters", 7),
        ({"batch_size": 2}, "train.batch_size", 2),
        ({"val_batches": -1}, "train.eval_batches", None),
        ({"val_batches": 3}, "train.eval_batches", 3),
        ({"steps_per_report": 5}, "train.log_every", 5),
        ({"steps_per_eval": 50}, "train.eval_every", 50),
        ({"save_every": 20}, "train.save_every", 20),
        ({"grad_accumulation_steps": 4}, "train.grad_accum", 4),
        ({"grad_accumulation_steps": 4, "iters": 1002}, "train.iters", 250),  # mlx-lm counts micro-batches
        ({"grad_accumulation_steps": 4, "steps_per_eval": 200}, "train.eval_every", 50),
        ({"grad_accumulation_steps": 4, "save_every": 100}, "train.save_every", 25),
        ({"grad_accumulation_steps": 4, "steps_per_report": 10}, "train.log_every", 2),
        ({"adapter_path": "runs/x"}, "out", "runs/x"),
        ({"seed": 42}, "train.seed", 42),
        ({"max_seq_length": 512}, "data.max_seq_length", 512),
        ({"trust_remote_code": True}, "model.trust_remote_code", True),
        ({"report_to": "wandb"}, "train.report_to", ["wandb"]),
        (
            {"prompt_feature": "question", "completion_feature": "answer"},
            "data.columns",
            {"prompt": "question", "completion": "answer"},
        ),
        (
            {"lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 990, 1e-6]}},
            "train.schedule",
            "cosine",
        ),
        ({"lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 990, 1e-6]}}, "train.lr", 1e-4),
        (
            {"lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 990, 1e-6]}},
            "train.warmup_steps",
            10,
        ),
        (
            {"lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 990, 1e-6]}},
            "train.min_lr_ratio",
            pytest.approx(0.01),
        ),
        ({"lr_schedule": {"name": "linear_schedule", "arguments": [1e-4, 0.0, 1000]}}, "train.schedule", "linear"),
        (
            {
                "hf_dataset": {
                    "path": "org/name",
                    "train_split": "train",
                    "prompt_feature": "q",
                    "completion_feature": "a",
                }
            },
            "data.path",
            "hf:org/name@train",
        ),
        (
            {
                "hf_dataset": {
                    "path": "org/name",
                    "train_split": "train",
                    "prompt_feature": "q",
                    "completion_feature": "a",
                }
            },
            "data.columns",
            {"prompt": "q", "completion": "a"},
        ),
    ],
)
def test_each_key_maps_to_what_mlx_lm_does_with_it(given, key, value):
    assert _get(_translated(given), key) == value


def test_notes_say_what_differs():
    t = translate(
        {
            "model": "m",
            "data": "/",
            "learning_rate": 3e-4,
            "iters": 500,
            "lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 200]},
        }
    )
    assert any("learning_rate is not used" in n for n in t.notes)
    assert any("decays over 200 steps in mlx-lm" in n and "490 steps" in n for n in t.notes)
    assert not any(
        "decays" in n
        for n in translate(
            {
                "model": "m",
                "data": "/",
                "iters": 100,
                "lr_schedule": {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 90]},
            }
        ).notes
    )


def test_odd_values_are_refused_not_crashed_on():
    for given in (
        {"optimizer": ["adam"]},
        {"lora_parameters": [1, 2]},
        {"num_layers": "many"},
        {"hf_dataset": [{"path": "a/b"}, {"path": "c/d"}]},
        {"lr_schedule": "cosine"},
        {"optimizer_config": 3},
        {"mask_prompt": "yes"},
        {"report_to": 5},
    ):
        with pytest.raises(ConfigError):
            _translated(given)


def test_a_hub_id_as_data_becomes_an_hf_source():
    assert (
        translate({"model": "m", "data": "mlx-community/wikisql"}).config["data"]["path"] == "hf:mlx-community/wikisql"
    )


def test_translated_config_validates_and_keeps_mlx_lm_numbers(tmp_path):
    cfg = _cfg(EXAMPLE, tmp_path, MODEL="some/model", DATA=tmp_path)
    c = build(str(cfg))
    assert (c.lora.r, c.lora.scale, c.train.lr, c.train.optimizer) == (8, 20.0, 1e-5, "adamw")


@pytest.mark.parametrize(
    "given,fragment",
    [
        ({"fine_tune_type": "full"}, "fine_tune_type: full"),
        ({"training_mode": "grpo"}, "training_mode"),
        ({"group_size": 4}, "group_size"),
        ({"optimizer": "muon"}, "optimizer: muon"),
        ({"optimizer": "sgd"}, "momentum"),
        ({"optimizer_config": {"adam": {"betas": [0.9, 0.98]}}}, "optimizer_config.adam.betas"),
        ({"lr_schedule": {"name": "exponential_decay", "arguments": [1e-4, 0.99]}}, "lr_schedule.name"),
        (
            {"lr_schedule": {"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-7, "arguments": [1e-5, 100]}},
            "lr_schedule.warmup_init",
        ),
        ({"train": False}, "train: false"),
        ({"test": True}, "test: true"),
        ({"resume_adapter_file": "a.safetensors"}, "resume_adapter_file"),
        ({"lora_parameters": {"rank": 8, "alpha": 16}}, "lora_parameters.alpha"),
        ({"report_to": "swanlab"}, "report_to"),
        ({"hf_dataset": {"path": "org/name", "train_split": "train[:80%]"}}, "hf_dataset.train_split"),
        ({"learning_rat": 1e-4}, "learning_rat"),
    ],
)
def test_keys_it_cannot_honour_are_refused_one_line_each(given, fragment):
    with pytest.raises(ConfigError) as e:
        _translated(given)
    assert len(e.value.problems) == 1 and fragment in e.value.problems[0], e.value.problems


def test_every_refused_key_is_listed_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: /\nfine_tune_type: full\ntraining_mode: grpo\noptimizer: muon\n")
    with pytest.raises(ConfigError) as e:
        build(str(path))
    assert [p.split(":")[0] for p in e.value.problems] == ["line 3", "line 4", "line 5"]
    assert "an mlx-lm config" in str(e.value)


@pytest.mark.parametrize(
    "doc,mlx_lm",
    [
        ({"model": {"path": "x"}, "lora": {"r": 4}}, False),
        ({"model": "x"}, True),
        ({"lora_parameters": {"rank": 4}}, True),
        ({"train": True}, True),
        ({"train": {"iters": 3}}, False),
    ],
)
def test_detection(doc, mlx_lm):
    assert is_mlx_lm_config(doc) is mlx_lm


# ------------------------------------------------------------------------------------------
# flags


def _captured_train(monkeypatch) -> list:
    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(mlx_lora.commands.api, "train", fake_train)
    return seen


@pytest.mark.parametrize(
    "flags,key,value",
    [
        (["--adapter-path", "runs/a"], "out", "runs/a"),
        (["--learning-rate", "3e-4"], "train.lr", 3e-4),
        (["--num-layers", "4"], "lora.layers_to_transform", [-4, -3, -2, -1]),
        (["--num-layers", "-1"], "lora.layers_to_transform", None),
        (["--fine-tune-type", "dora"], "lora.use_dora", True),
        (["--fine-tune-type", "lora"], "lora.use_dora", False),
        (["--mask-prompt"], "data.train_on", "last"),
        (["--iters", "9"], "train.iters", 9),
        (["--batch-size", "3"], "train.batch_size", 3),
        (["--steps-per-eval", "11"], "train.eval_every", 11),
        (["--save-every", "12"], "train.save_every", 12),
        (["--val-batches", "-1"], "train.eval_batches", None),
        (["--steps-per-report", "2"], "train.log_every", 2),
        (["--grad-accumulation-steps", "2"], "train.grad_accum", 2),
    ],
)
def test_mlx_lm_flag_spellings_on_train(capsys, monkeypatch, flags, key, value):
    seen = _captured_train(monkeypatch)
    run_main(capsys, ["train", "--model", "m", "--data", "/", *flags])
    assert _get(config_mod.to_dict(seen[0]), key) == value


def test_flags_override_an_mlx_lm_config(capsys, monkeypatch, tmp_path):
    seen = _captured_train(monkeypatch)
    cfg = _cfg(EXAMPLE, tmp_path, MODEL="m", DATA=tmp_path)
    run_main(capsys, ["train", "--config", str(cfg), "--num-layers", "-1", "--learning-rate", "2e-4"])
    assert seen[0].lora.layers_to_transform is None and seen[0].train.lr == 2e-4


def test_fine_tune_type_full_is_refused_in_one_line(capsys):
    code, _, err = run_main(capsys, ["train", "--model", "m", "--data", "/", "--fine-tune-type", "full"])
    assert code == 2 and err.count("\n") == 1 and "--fine-tune-type full" in err


# ------------------------------------------------------------------------------------------
# back to mlx-lm


def _random_adapter(model_dir: Path, lora: LoraConfig, seed: int = 0):
    model, _, _ = load_model(str(model_dir), with_tokenizer=False)
    apply_lora(model, lora)
    rng = np.random.default_rng(seed)
    from mlx_lora.model.adapters import adapter_layers

    for _, m in adapter_layers(model):
        m.lora_b = mx.array(rng.standard_normal(m.lora_b.shape).astype(np.float32) * 0.05)
        if hasattr(m, "magnitude"):
            m.magnitude = m.magnitude * mx.array(1 + 0.1 * rng.standard_normal(m.magnitude.shape).astype(np.float32))
    return model


@pytest.mark.parametrize(
    "arch,lora",
    [
        ("llama", LoraConfig(r=4, alpha=8)),
        ("llama", LoraConfig(r=4, alpha=8, layers_to_transform=[0], target_modules=["q_proj", "down_proj"])),
        ("llama", LoraConfig(r=4, alpha=8, use_dora=True)),
        ("llama", LoraConfig(r=4, alpha=8, use_rslora=True)),
        ("qwen2", LoraConfig(r=2, alpha=5)),
        ("qwen3_moe", LoraConfig(r=2, alpha=4)),
    ],
)
def test_run_folder_and_export_load_in_mlx_lm_with_our_fused_logits(tmp_path, tiny_model_dir, arch, lora):
    from mlx_lm import load as mlx_lm_load

    from mlx_lora.converters.adapter_export import export_mlx_lm

    model_dir = tiny_model_dir(arch)
    model = _random_adapter(model_dir, lora)
    save_adapter(model, tmp_path / "run", lora, str(model_dir))
    fuse_model(model)
    fused = np.array(model(TOKENS))
    base, _ = load_model(str(model_dir), with_tokenizer=False)[:2]
    assert np.abs(fused - np.array(base(TOKENS))).max() > 1e-3, "the test adapter must change the output"

    export_mlx_lm(tmp_path / "run", tmp_path / "exported", model=str(model_dir), verify=True, log=lambda m: None)
    for folder in (tmp_path / "run", tmp_path / "exported"):
        theirs, _ = mlx_lm_load(str(model_dir), adapter_path=str(folder))
        np.testing.assert_allclose(np.array(theirs(TOKENS)), fused, atol=2e-5, rtol=1e-5)
    # the run folder still reads as PEFT, and the export as an mlx-lm adapter, here too
    again, _, _ = load_model(str(model_dir), with_tokenizer=False)
    assert load_adapter(again, tmp_path / "run").source_format == "peft"
    exported, _, _ = load_model(str(model_dir), with_tokenizer=False)
    assert load_adapter(exported, tmp_path / "exported").source_format == "mlx-lm"
    np.testing.assert_allclose(np.array(exported(TOKENS)), fused, atol=2e-5, rtol=1e-5)


def test_mlx_lm_generate_takes_a_run_folder(tmp_path, tiny_model_dir):
    """``mlx_lm.generate --adapter-path RUN`` runs as it is (its own command line)."""
    import subprocess
    import sys

    model_dir = tiny_model_dir("llama")
    lora = LoraConfig(r=4, alpha=8)
    save_adapter(_random_adapter(model_dir, lora), tmp_path / "run", lora, str(model_dir))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(model_dir),
            "--adapter-path",
            str(tmp_path / "run"),
            "--prompt",
            "hello",
            "--max-tokens",
            "3",
            "--ignore-chat-template",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Generation:" in res.stdout


def test_fuse_and_generate_take_mlx_lm_spellings(capsys, tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    lora = LoraConfig(r=4, alpha=8)
    model = _random_adapter(model_dir, lora)
    save_adapter(model, tmp_path / "run", lora, str(model_dir))
    code, _, err = run_main(
        capsys,
        [
            "fuse",
            "--model",
            str(model_dir),
            "--adapter-path",
            str(tmp_path / "run"),
            "--save-path",
            str(tmp_path / "fused"),
        ],
    )
    assert code == 0, err
    fuse_model(model)
    fused, _, _ = load_model(str(tmp_path / "fused"), with_tokenizer=False)
    np.testing.assert_allclose(np.array(fused(TOKENS)), np.array(model(TOKENS)), atol=1e-5)
    code, out, err = run_main(
        capsys,
        [
            "generate",
            "--model",
            str(model_dir),
            "--adapter-path",
            str(tmp_path / "run"),
            "--prompt",
            "hello",
            "--max-tokens",
            "3",
            "--temp",
            "0",
        ],
    )
    assert code == 0, err
    code2, out2, _ = run_main(
        capsys,
        [
            "generate",
            "--model",
            str(model_dir),
            "--adapter",
            str(tmp_path / "run"),
            "--prompt",
            "hello",
            "--max-tokens",
            "3",
        ],
    )
    assert out == out2


def test_export_adapter_format_mlx_lm_on_the_command_line(capsys, tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    lora = LoraConfig(r=4, alpha=8, target_modules=["v_proj"])
    save_adapter(_random_adapter(model_dir, lora), tmp_path / "run", lora, str(model_dir))
    code, out, err = run_main(
        capsys,
        [
            "export",
            "adapter",
            "--adapter",
            str(tmp_path / "run"),
            "--format",
            "mlx-lm",
            "--out",
            str(tmp_path / "ml"),
            "--verify",
        ],
    )
    assert code == 0, err
    conf = json.loads((tmp_path / "ml" / "adapter_config.json").read_text())
    assert conf["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.v_proj"]}
    assert conf["num_layers"] == 2 and conf["fine_tune_type"] == "lora"


# ------------------------------------------------------------------------------------------
# hints


@pytest.mark.parametrize(
    "doc,fragment",
    [
        ({"lora": {"r": 8, "scale": 20.0}}, "for scale 20 with r 8, set lora.alpha: 160"),
        ({"lora": {"r": 4, "scale": 0.5}}, "for scale 0.5 with r 4, set lora.alpha: 2"),
        ({"lora": {"scale": 2}}, "set lora.alpha: 16"),  # r takes its default, 8
        ({"scale": 2}, "set lora.alpha to scale * r"),
    ],
)
def test_the_scale_hint_carries_the_factor_r(doc, fragment):
    with pytest.raises(ConfigError) as e:
        config_mod.from_dict(doc)
    assert fragment in str(e.value) and "mlx-lm's scale is alpha / r" in str(e.value)


@pytest.mark.parametrize("command", [["train", "--model", "M"], ["eval", "--model", "M"]])
def test_data_that_looks_like_a_hub_id_says_to_write_hf(capsys, tmp_path, tiny_model_dir, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("M", str(tiny_model_dir("llama"))) for a in command] + ["--data", "mlx-community/wikisql"]
    if command[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    code, _, err = run_main(capsys, argv)
    assert code != 0 and err.count("\n") == 1, err
    assert "mlx-community/wikisql" in err and "write hf:mlx-community/wikisql" in err


def test_a_missing_local_path_gets_no_hub_hint(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(tiny_model_dir("llama")),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert code != 0 and "no such file or folder" in err and "hf:" not in err


def test_the_printed_equivalent_is_a_config_of_ours_for_the_same_job(tmp_path):
    text = EXAMPLE.replace("MODEL", "org/model").replace("DATA", str(tmp_path)) + (
        "lr_schedule:\n  name: cosine_decay\n  warmup: 100\n  arguments: [1e-5, 1000, 1e-7]\n"
    )  # its schedule too
    src = tmp_path / "mlx_lm.yaml"
    src.write_text(text)
    printed = []
    cfg = build(str(src), on_translate=printed.append)
    assert len(printed) == 1
    lines = printed[0].splitlines()
    body = [ln for ln in lines[1:] if not ln.startswith("note: ")]
    assert any("lr_schedule decays over 1000 steps" in ln for ln in lines)  # iters 1000 - warmup 100 differ
    ours = tmp_path / "ours.yaml"
    ours.write_text("\n".join(body))
    assert build(str(ours)) == cfg
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.lr) == ("cosine", 100, 1e-5)
    assert cfg.train.min_lr_ratio == pytest.approx(1e-7 / 1e-5)


def test_more_layers_than_the_model_has_is_one_line_naming_num_layers(tmp_path, tiny_model_dir):
    from mlx_lora.plumbing.errors import AdapterError

    cfg = config_mod.from_dict(translate({"model": "m", "data": "/", "num_layers": 16}).config)
    model, _, _ = load_model(str(tiny_model_dir("llama")), with_tokenizer=False)
    with pytest.raises(AdapterError) as e:
        apply_lora(model, cfg.lora)
    assert "the last 16 blocks" in str(e.value) and "num_layers 16" in str(e.value) and "has 2 blocks" in str(e.value)


def test_mlx_lm_fuse_takes_a_run_folder(tmp_path, tiny_model_dir):
    """``mlx_lm.fuse --adapter-path RUN`` gives the model our fuse gives."""
    import subprocess
    import sys

    model_dir = tiny_model_dir("qwen2")
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    model = _random_adapter(model_dir, lora)
    save_adapter(model, tmp_path / "run", lora, str(model_dir))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(model_dir),
            "--adapter-path",
            str(tmp_path / "run"),
            "--save-path",
            str(tmp_path / "fused"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    fuse_model(model)
    theirs, _, _ = load_model(str(tmp_path / "fused"), with_tokenizer=False)
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(model(TOKENS)), atol=2e-5, rtol=1e-5)
