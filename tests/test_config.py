"""The typed config: defaults, YAML + CLI options + --set precedence, and validation that reports
every problem at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mlx_lora import config
from mlx_lora.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig, build, validate
from mlx_lora.plumbing.errors import ConfigError

REQUIRED = ["model.path=m", "data.path=d.jsonl"]


def write_yaml(tmp_path: Path, data, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


def test_defaults_are_the_documented_ones():
    cfg = build(overrides=REQUIRED)
    assert cfg == Config(model=ModelConfig(path="m"), data=DataConfig(path="d.jsonl"))
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16.0, 0.0)
    assert cfg.lora.scale == 16.0 / 8
    assert cfg.lora.target_modules is None and cfg.lora.layers_to_transform is None
    assert cfg.model.dtype == "auto" and cfg.data.format == "auto"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.optimizer) == (1e-4, 4, "adamw")
    assert cfg.out == "runs/run"


def test_scale_formula():
    assert LoraConfig(r=16, alpha=32).scale == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scale == 32 / 4


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().lora.r = 4  # type: ignore[misc]


def test_yaml_then_cli_options_then_set(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model": {"path": "from-yaml"},
            "data": {"path": "d.jsonl", "packing": True},
            "lora": {"r": 4, "alpha": 8},
            "train": {"lr": 0.001, "iters": 50},
            "out": "yaml-out",
        },
    )
    cfg = build(path, ["lora.r=16", "train.iters=7"], extra={"lora": {"r": 32, "alpha": 64}, "out": "cli-out"})
    assert cfg.lora.r == 16  # --set beats the CLI option and the file
    assert cfg.lora.alpha == 64  # CLI option beats the file
    assert cfg.train.iters == 7 and cfg.train.lr == 0.001  # untouched file value survives
    assert cfg.data.packing is True and cfg.model.path == "from-yaml" and cfg.out == "cli-out"
    assert cfg.train.batch_size == TrainConfig().batch_size  # default where nobody set it


@pytest.mark.parametrize(
    "item, section, key, value",
    [
        ("lora.r=16", "lora", "r", 16),
        ("train.lr=1e-4", "train", "lr", 1e-4),  # YAML 1.1 reads 1e-4 as a string; still a float here
        ("train.lr=2.5e-5", "train", "lr", 2.5e-5),
        ("train.max_grad_norm=null", "train", "max_grad_norm", None),
        ("train.eval_batches=none", "train", "eval_batches", None),
        ("lora.target_modules=[q_proj, v_proj]", "lora", "target_modules", ["q_proj", "v_proj"]),
        ("lora.target_modules=q_proj,v_proj", "lora", "target_modules", ["q_proj", "v_proj"]),
        ("lora.layers_to_transform=[-1, -2]", "lora", "layers_to_transform", [-1, -2]),
        ("lora.use_dora=true", "lora", "use_dora", True),
        ("data.packing=no", "data", "packing", False),
        ("train.iters=1e3", "train", "iters", 1000),
        ("train.epochs=2", "train", "epochs", 2.0),
        ("data.chat_template=chatml", "data", "chat_template", "chatml"),
    ],
)
def test_set_values_are_parsed_and_typed(item, section, key, value):
    cfg = build(overrides=REQUIRED + [item])
    got = getattr(getattr(cfg, section), key)
    assert got == value and type(got) is type(value)


def test_unknown_keys_are_named_with_suggestions(tmp_path):
    path = write_yaml(tmp_path, {"trian": {"lr": 1}, "lora": {"aplha": 4}, "model": {"path": "m"}})
    with pytest.raises(ConfigError) as e:
        build(path, ["train.batchsize=2"])
    p = problems_of(e)
    assert len(p) == 3
    assert "unknown key 'trian' (did you mean 'train'?)" in p
    assert "unknown key 'lora.aplha' (did you mean 'alpha'?)" in p
    assert "unknown key 'train.batchsize' (did you mean 'batch_size'?)" in p
    assert path in str(e.value)


def test_wrong_types_are_all_reported():
    with pytest.raises(ConfigError) as e:
        build(
            overrides=REQUIRED
            + [
                "lora.r=abc",
                "train.lr=[1]",
                "lora.use_dora=maybe",
                "data.packing=2",
                "lora.r=8.5",
                "lora.layers_to_transform=x",
                "model=5",
            ]
        )
    p = problems_of(e)
    # lora.r appears once: the later --set wins, and 8.5 is not an integer.
    assert len(p) == 6, p
    for key in ("lora.r", "train.lr", "lora.use_dora", "data.packing", "lora.layers_to_transform", "'model'"):
        assert any(key in line for line in p), key


@pytest.mark.parametrize("raw", ["8.5", "'8.5'", "1e400", "true"])
def test_integer_fields_reject_non_integers(raw):
    with pytest.raises(ConfigError, match="lora.r: expected int"):
        build(overrides=REQUIRED + [f"lora.r={raw}"])


def test_every_range_check_is_reported_at_once():
    bad = Config(
        model=ModelConfig(path=None, dtype="float8"),
        lora=LoraConfig(r=0, alpha=0, dropout=1.0, target_modules=["re:(unclosed"]),
        data=DataConfig(
            path=None, format="csv", valid_fraction=1.0, max_seq_length=1, train_on="none", overlong="wrap"
        ),
        train=TrainConfig(
            iters=0,
            epochs=0,
            batch_size=0,
            grad_accum=0,
            lr=0,
            optimizer="lion",
            schedule="step",
            warmup_steps=-1,
            min_lr_ratio=1.5,
            max_grad_norm=0,
            eval_every=0,
            eval_batches=0,
            save_every=0,
            keep_checkpoints=0,
            early_stopping_patience=0,
            log_every=0,
            nan_policy="ignore",
        ),
    )
    with pytest.raises(ConfigError) as e:
        validate(bad)
    p = problems_of(e)
    keys = [
        "model.dtype",
        "data.format",
        "data.train_on",
        "data.overlong",
        "train.optimizer",
        "train.schedule",
        "train.nan_policy",
        "model.path",
        "data.path",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
        "data.valid_fraction",
        "data.max_seq_length",
        "train.iters",
        "train.epochs",
        "train.batch_size",
        "train.grad_accum",
        "train.eval_every",
        "train.save_every",
        "train.log_every",
        "train.keep_checkpoints",
        "train.lr",
        "train.warmup_steps",
        "train.min_lr_ratio",
        "train.max_grad_norm",
        "train.eval_batches",
        "train.early_stopping_patience",
    ]
    assert len(p) == len(keys), p
    assert sorted(line.split(":")[0] for line in p) == sorted(keys)
    assert f"({len(keys)} problems)" in str(e.value)


def test_choice_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        build(overrides=REQUIRED + ["train.schedule=cosin"])


def test_empty_target_list_is_rejected():
    with pytest.raises(ConfigError, match="lora.target_modules: empty list"):
        validate(Config(model=ModelConfig(path="m"), data=DataConfig(path="d"), lora=LoraConfig(target_modules=[])))


def test_data_path_optional_when_not_training():
    cfg = Config(model=ModelConfig(path="m"))
    assert validate(cfg, need_data=False) is cfg
    with pytest.raises(ConfigError, match="data.path: required"):
        validate(cfg)


def test_round_trip_through_yaml(tmp_path):
    cfg = Config(
        model=ModelConfig(path="org/model", dtype="float32", revision="main"),
        lora=LoraConfig(
            r=16,
            alpha=8.5,
            dropout=0.05,
            target_modules=["q_proj", "re:.*mlp.*"],
            layers_to_transform=[-1, 0],
            use_dora=True,
            use_rslora=True,
        ),
        data=DataConfig(path="data/", format="chat", max_seq_length=512, packing=True, chat_template="chatml"),
        train=TrainConfig(
            iters=10,
            epochs=1.5,
            lr=2.5e-5,
            max_grad_norm=None,
            eval_batches=None,
            early_stopping_patience=3,
            compile=False,
            seed=7,
        ),
        out="runs/x",
    )
    path = write_yaml(tmp_path, config.to_yaml(cfg))
    assert build(path) == cfg


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  path: m\nlora: [r: 4\n")
    with pytest.raises(ConfigError) as e:
        build(path)
    assert path in str(e.value) and "line" in str(e.value)
    with pytest.raises(ConfigError, match="config file not found"):
        build(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        build(write_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="'lora' must be a mapping"):
        build(write_yaml(tmp_path, "lora: 4\n", "scalar.yaml"))


def test_set_without_equals_sign():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        build(overrides=["lora.r"])


def test_out_must_be_a_path(tmp_path):
    with pytest.raises(ConfigError, match="out"):
        build(write_yaml(tmp_path, "out: null\nmodel: {path: m}\ndata: {path: d}\n"))
