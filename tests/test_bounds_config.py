"""Bounds on input before any work starts: config values, a model's config.json, command options.

Every case is one out-of-range, non-finite, mistyped or pathological input, run through the real
command line in-process. Each must end with exit status 2, one ``error:`` line naming the key,
file or option at fault, no traceback, and nothing created or changed on disk (no run folder, no
config.yaml; inputs unchanged by hash). The config cases are generated from
:data:`mlx_lora.config.BOUNDS`, so every numeric key is tried with NaN, infinities, a float too
large to be an integer, and values past each end of its range.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Union, get_args, get_origin, get_type_hints

import pytest
from cli_harness import assert_refused, cli_env, run_main, write

from mlx_lora.config import BOUNDS, SECTIONS, SHOW_CHARS, Bound, build, show
from mlx_lora.plumbing.errors import ConfigError, MlxLoraError
from mlx_lora.testing import make_tiny_dataset

_env = pytest.fixture(scope="module", autouse=True)(cli_env)


@dataclass
class World:
    model: Path  # tiny llama (hidden 64, 2 layers, vocab 512)
    good: Path  # valid chat JSONL


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    root = tmp_path_factory.mktemp("bounds")
    return World(tiny_model_dir("llama"), make_tiny_dataset(root / "good.jsonl", "chat", n=8))


def train(w: World, ws: Path, *extra, model: Optional[Path] = None) -> list[str]:
    return [
        "train",
        "--model",
        str(model or w.model),
        "--data",
        str(w.good),
        "--out",
        str(ws / "out"),
        "--quiet",
        "--iters",
        "1",
        "--batch-size",
        "2",
        *extra,
    ]


def generate(w: World, *extra, model: Optional[Path] = None) -> list[str]:
    return ["generate", "--model", str(model or w.model), "--prompt", "Hi", "--max-tokens", "2", *extra]


def evaluate(w: World, *extra, model: Optional[Path] = None) -> list[str]:
    return ["eval", "--model", str(model or w.model), "--data", str(w.good), *extra]


# ----------------------------------------------------------------------------------------------
# the cases: (world, an empty folder of its own) -> (argv, fragments the message must contain)

Case = Callable[[World, Path], tuple]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _bad_values(bound: Bound) -> list[str]:
    """YAML texts of values ``bound`` refuses: past each end, non-finite, not a number of its type."""
    below = [bound.lo] if bound.lo_open else [bound.lo - 1]
    above = [bound.hi] if bound.hi_open else [bound.hi * 10 + 1]
    values = [_num(v) for v in below + above] + [".nan", ".inf", "-.inf", "[1]", "abc"]
    if bound.kind is int:
        values += ["1e30", "1" + "0" * 30, "2.5"]
    return values


def _config_case(key: str, raw: str) -> Case:
    def run(w, ws):
        return train(w, ws, "--set", f"{key}={raw}"), [key, "got"]

    return run


for _key, _bound in BOUNDS.items():
    for _raw in _bad_values(_bound):
        CASES[f"config {_key}={_raw}"] = _config_case(_key, _raw)


# -- config values, the examples as users write them --------------------------------------------


@case
def lr_nan_in_yaml(w, ws):
    c = write(ws / "c.yaml", f"model: {{path: {w.model}}}\ntrain:\n  lr: .nan\n")
    return train(w, ws, "--config", str(c)), [str(c), "train.lr", "finite", "nan"]


@case
def epochs_nan_option(w, ws):
    return train(w, ws, "--set", "train.iters=null", "--epochs", "nan"), ["train.epochs", "finite", "nan"]


@case
def epochs_inf_in_yaml(w, ws):
    c = write(ws / "c.yaml", "train:\n  iters: null\n  epochs: .inf\n")
    return train(w, ws, "--config", str(c)), [str(c), "train.epochs", "inf"]


@case
def max_seq_length_1e30_in_yaml(w, ws):
    c = write(ws / "c.yaml", "data:\n  max_seq_length: 1e30\n")
    return train(w, ws, "--config", str(c)), [str(c), "data.max_seq_length", "1e+30"]


@case
def max_seq_length_1e30_float_in_yaml(w, ws):
    c = write(ws / "c.yaml", "data:\n  max_seq_length: 1.0e+30\n")
    return train(w, ws, "--config", str(c)), [str(c), "data.max_seq_length", "expected an int"]


@case
def rank_1e8_option(w, ws):
    return train(w, ws, "--rank", "100000000"), ["lora.r", "<= 16384", "100000000"]


@case
def rank_1e7_in_yaml(w, ws):
    c = write(ws / "c.yaml", "lora:\n  r: 1e7\n")
    return train(w, ws, "--config", str(c)), [str(c), "lora.r", "<= 16384"]


@case
def alpha_inf_option(w, ws):
    return train(w, ws, "--alpha", "inf"), ["lora.alpha", "finite", "inf"]


@case
def negative_seed_option(w, ws):
    return train(w, ws, "--seed", "-1"), ["train.seed", ">= 0", "-1"]


@case
def layer_index_1e30(w, ws):
    return train(w, ws, "--set", "lora.layers_to_transform=[0, 1e30]"), ["lora.layers_to_transform", "1e+30"]


@case
def layer_index_huge_int(w, ws):
    return (
        train(w, ws, "--set", "lora.layers_to_transform=[0, 100000000000]"),
        ["lora.layers_to_transform", "100000000000"],
    )


@case
def several_problems_at_once(w, ws):
    return (
        train(w, ws, "--set", "train.lr=.nan", "--set", "lora.r=1e8", "--set", "train.weight_decay=-1"),
        ["3 problems", "train.lr", "lora.r", "train.weight_decay"],
    )


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


@case
def billion_laughs_in_yaml(w, ws):
    c = write(
        ws / "c.yaml",
        'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
        + LAUGHS
        + "lora:\n  target_modules: *l9\n",
    )
    return train(w, ws, "--config", str(c)), [str(c), "aliases", "10,000"]


@case
def billion_laughs_in_set(w, ws):
    value = (
        "[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], *d]"
    )
    return train(w, ws, "--set", f"lora.target_modules={value}"), ["lora.target_modules", "aliases"]


@case
def alias_that_contains_itself(w, ws):
    c = write(ws / "c.yaml", "lora:\n  target_modules: &t [q_proj, *t]\n")
    return train(w, ws, "--config", str(c)), [str(c), "alias", "contains it"]


@case
def yaml_nested_too_deeply(w, ws):
    c = write(ws / "c.yaml", "lora:\n  target_modules: " + "[" * 5000 + "]" * 5000 + "\n")
    return train(w, ws, "--config", str(c)), [str(c), "nested too deeply"]


@case
def integer_of_5000_digits_in_yaml(w, ws):
    c = write(ws / "c.yaml", "train:\n  iters: 1" + "0" * 5000 + "\n")
    return train(w, ws, "--config", str(c)), [str(c)]


@case
def long_value_is_clipped(w, ws):
    return train(w, ws, "--set", "train.schedule=" + "x" * 100_000), ["train.schedule", "..."]


@case
def long_unknown_key_is_clipped(w, ws):
    return train(w, ws, "--set", "lora." + "k" * 100_000 + "=1"), ["unknown key 'lora.kkk", "..."]


@case
def long_list_is_clipped(w, ws):
    return train(w, ws, "--set", "train.lr=[" + ",".join(["1"] * 5000) + "]"), ["train.lr", "..."]


# -- a model's config.json ----------------------------------------------------------------------


def _model_with(w: World, ws: Path, change: Callable[[dict], object]) -> Path:
    """A copy of the tiny model whose config.json is ``change(config)`` (or config changed in place)."""
    m = ws / "model"
    shutil.copytree(w.model, m)
    conf = json.loads((m / "config.json").read_text())
    new = change(conf)
    (m / "config.json").write_text(json.dumps(conf if new is None else new))
    return m


def _model_case(key: str, value, fragments: list[str], command=generate) -> Case:
    def run(w, ws):
        m = _model_with(w, ws, lambda c: c.update({key: value}))
        return command(w, model=m), [str(m / "config.json"), *fragments]

    return run


MODEL_CASES = {
    "ten_million_layers": ("num_hidden_layers", 10_000_000, ["num_hidden_layers", "10000000"]),
    "layers_within_bounds_but_not_the_files": (
        "num_hidden_layers",
        4000,
        ["num_hidden_layers=4000", "does not match the weights"],
    ),
    "intermediate_size_not_the_files": (
        "intermediate_size",
        1_000_000,
        ["intermediate_size=1000000", "does not match"],
    ),
    "vocab_size_huge": ("vocab_size", 10**12, ["vocab_size"]),
    "hidden_size_zero": ("hidden_size", 0, ["hidden_size", ">= 1"]),
    "hidden_size_negative": ("hidden_size", -64, ["hidden_size", ">= 1"]),
    "hidden_size_a_string": ("hidden_size", "64", ["hidden_size", "expected int"]),
    "hidden_size_a_float": ("hidden_size", 64.0, ["hidden_size", "expected int"]),
    "layers_a_bool": ("num_hidden_layers", True, ["num_hidden_layers", "expected int"]),
    "heads_nan": ("num_attention_heads", float("nan"), ["num_attention_heads", "nan"]),
    "kv_heads_a_list": ("num_key_value_heads", [2], ["num_key_value_heads"]),
    "model_type_a_list": ("model_type", ["llama"], ["model_type", "['llama']"]),
    "model_type_a_number": ("model_type", 7, ["model_type"]),
    "eos_token_id_a_string": ("eos_token_id", "x", ["eos_token_id"]),
    "eos_token_id_negative": ("eos_token_id", [2, -1], ["eos_token_id"]),
    "quantization_not_an_object": ("quantization", 4, ["quantization"]),
    "quantization_bits_missing": ("quantization", {"group_size": 64}, ["quantization.bits"]),
    "tie_word_embeddings_a_string": ("tie_word_embeddings", "yes", ["tie_word_embeddings"]),
    "text_config_a_list": ("text_config", [1], ["text_config"]),
    "text_config_layers_huge": ("text_config", {"num_hidden_layers": 10**9}, ["text_config.num_hidden_layers"]),
    "a million experts": ("num_local_experts", 10**6, ["num_local_experts"]),
}
for _name, (_key, _value, _fragments) in MODEL_CASES.items():
    CASES[f"model {_name}"] = _model_case(_key, _value, _fragments)
# the model copy lies in the case's folder, whose out/ train must not create
CASES["model ten_million_layers (train)"] = _model_case(
    "num_hidden_layers", 10_000_000, ["num_hidden_layers"], command=lambda w, model: train(w, model.parent, model=model)
)
CASES["model ten_million_layers (eval)"] = _model_case(
    "num_hidden_layers", 10_000_000, ["num_hidden_layers"], command=evaluate
)


@case
def config_json_not_an_object(w, ws):
    m = _model_with(w, ws, lambda c: [c])
    return generate(w, model=m), [str(m / "config.json"), "JSON object"]


@case
def config_json_nested_too_deeply(w, ws):
    m = ws / "model"
    shutil.copytree(w.model, m)
    (m / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return generate(w, model=m), [str(m / "config.json"), "nested too deeply"]


# -- command options ----------------------------------------------------------------------------


OPTION_CASES = {
    "eval --batch-size 0": (evaluate, ["--batch-size", "0"], ["--batch-size", ">= 1", "0"]),
    "eval --batch-size -3": (evaluate, ["--batch-size", "-3"], ["--batch-size"]),
    "eval --batch-size huge": (evaluate, ["--batch-size", "1000000000"], ["--batch-size", "<= 65536"]),
    "eval --max-batches 0": (evaluate, ["--max-batches", "0"], ["--max-batches", ">= 1"]),
    "eval --max-batches -1": (evaluate, ["--max-batches", "-1"], ["--max-batches"]),
    "eval --max-seq-length 0": (evaluate, ["--max-seq-length", "0"], ["--max-seq-length", ">= 2"]),
    "eval --max-seq-length -1": (evaluate, ["--max-seq-length", "-1"], ["--max-seq-length", "-1"]),
    "eval --max-seq-length huge": (evaluate, ["--max-seq-length", str(10**18)], ["--max-seq-length", "<="]),
    "eval several at once": (evaluate, ["--batch-size", "0", "--max-batches", "0"], ["--batch-size", "--max-batches"]),
    "eval --chat-template empty": (evaluate, ["--chat-template", ""], ["--chat-template"]),
    "generate --prompt empty": (generate, ["--prompt", ""], ["--prompt", "empty"]),
    "generate --max-tokens -1": (generate, ["--max-tokens", "-1"], ["--max-tokens", ">= 1", "-1"]),
    "generate --max-tokens 0": (generate, ["--max-tokens", "0"], ["--max-tokens"]),
    "generate --max-tokens huge": (generate, ["--max-tokens", str(10**12)], ["--max-tokens", "<="]),
    "generate --temperature -1": (generate, ["--temperature", "-1"], ["--temperature", ">= 0", "-1"]),
    "generate --temperature nan": (generate, ["--temperature", "nan"], ["--temperature", "finite"]),
    "generate --temperature inf": (generate, ["--temperature", "inf"], ["--temperature", "finite"]),
    "generate --top-p 5": (generate, ["--top-p", "5"], ["--top-p", "(0, 1]", "5"]),
    "generate --top-p 0": (generate, ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    "generate --top-p -0.5": (generate, ["--top-p", "-0.5"], ["--top-p", "(0, 1]"]),
    "generate --top-p nan": (generate, ["--top-p", "nan"], ["--top-p", "finite"]),
    "generate --seed -1": (generate, ["--seed", "-1"], ["--seed", ">= 0"]),
    "generate --seed huge": (generate, ["--seed", str(2**64)], ["--seed", "<="]),
}


# train's options become config keys, and the message names the key
for _option, _key in (
    ("--iters", "train.iters"),
    ("--epochs", "train.epochs"),
    ("--batch-size", "train.batch_size"),
    ("--lr", "train.lr"),
    ("--rank", "lora.r"),
    ("--alpha", "lora.alpha"),
    ("--max-seq-length", "data.max_seq_length"),
    ("--seed", "train.seed"),
):
    OPTION_CASES[f"train {_option} -1"] = (train, [_option, "-1"], [_key, "-1"])


def _option_case(command, extra, fragments) -> Case:
    def run(w, ws):
        return (train(w, ws, *extra) if command is train else command(w, *extra)), fragments

    return run


for _name, (_command, _extra, _fragments) in OPTION_CASES.items():
    CASES[_name] = _option_case(_command, _extra, _fragments)


# ----------------------------------------------------------------------------------------------
# the tests


def _run_case(argv, fragments, watched, capsys) -> str:
    message = assert_refused(capsys, argv, fragments, watched, code=2)
    assert len(message) < 600, f"{len(message)} characters: {message[:600]}"
    return message


@pytest.mark.parametrize("name", list(CASES))
def test_out_of_bounds_input_is_one_error_line(name, world, tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, fragments = CASES[name](world, ws)
    _run_case(argv, fragments, (ws, world.model, world.good), capsys)
    assert not (ws / "out").exists()


def test_prompt_from_empty_standard_input(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    _run_case(generate(world, "--prompt", "-"), ["--prompt", "empty"], (tmp_path, world.model), capsys)


def test_model_too_large_for_memory(world, tmp_path, capsys, monkeypatch):
    """Sizes that match the files but not the machine: refused before mlx-lm builds anything."""
    import mlx_lora.plumbing.backend

    monkeypatch.setattr(mlx_lora.plumbing.backend, "total_memory_bytes", lambda: 100_000)
    _run_case(
        generate(world),
        [str(world.model / "config.json"), "num_hidden_layers=2", "memory"],
        (tmp_path, world.model),
        capsys,
    )


def test_every_numeric_key_has_bounds():
    """A numeric key added to the config without an entry in BOUNDS would escape every check."""
    numeric = set()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            tp = get_type_hints(cls)[f.name]
            if get_origin(tp) is Union:
                tp = [a for a in get_args(tp) if a is not type(None)][0]
            if tp in (int, float):
                numeric.add(f"{section}.{f.name}")
                assert BOUNDS[f"{section}.{f.name}"].kind is tp, f.name
    assert numeric == set(BOUNDS)


def test_the_library_refuses_bad_options_before_loading(world):
    """The Python API is protected too, and names the option as the command line spells it."""
    from mlx_lora.commands import api

    missing = "no/such/model"  # the checks come first: the model is never looked for
    for kwargs, fragment in (
        ({"top_p": 5}, "--top-p must be in (0, 1], got 5"),
        ({"max_tokens": -1}, "--max-tokens"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"seed": -1}, "--seed"),
        ({"dtype": "float8"}, "dtype"),
    ):
        with pytest.raises(MlxLoraError, match=None) as e:
            api.generate(missing, "Hi", **kwargs)
        assert fragment in str(e.value)
    with pytest.raises(MlxLoraError, match="--prompt"):
        api.generate(missing, "")
    for kwargs, fragment in (
        ({"batch_size": 0}, "--batch-size"),
        ({"max_batches": 0}, "--max-batches"),
        ({"max_seq_length": 1}, "--max-seq-length"),
        ({"train_on": "none"}, "--train-on"),
    ):
        with pytest.raises(MlxLoraError) as e:
            api.evaluate(missing, str(world.good), **kwargs)
        assert fragment in str(e.value)
    with pytest.raises(MlxLoraError, match="dtype"):
        api.load_for_inference(str(world.model), dtype="float8")


def test_validate_checks_types_and_finiteness_of_a_config_built_in_python():
    from mlx_lora.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig, validate

    cfg = Config(
        model=ModelConfig(path="m"),
        data=DataConfig(path="d", max_seq_length=10**30),
        lora=LoraConfig(r="8", alpha=float("inf")),
        train=TrainConfig(epochs=float("nan"), seed=-5),
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    keys = sorted(p.split(":")[0] for p in e.value.problems)
    assert keys == ["data.max_seq_length", "lora.alpha", "lora.r", "train.epochs", "train.seed"], e.value.problems


# ----------------------------------------------------------------------------------------------
# what stays allowed


@pytest.mark.parametrize(
    "item",
    [
        "lora.r=16384",
        "lora.alpha=1e-3",
        "lora.dropout=0",
        "data.valid_fraction=0",
        "data.max_seq_length=1048576",
        "data.max_seq_length=2",
        "train.iters=1e3",
        "train.epochs=10000",
        "train.epochs=0.5",
        "train.seed=4294967295",
        "train.max_grad_norm=null",
        "train.lr=10",
        "train.min_lr_ratio=1",
        "train.weight_decay=0",
        "lora.layers_to_transform=[-1, 0]",
        "train.loss_chunk_tokens=null",
    ],
)
def test_edge_values_inside_the_bounds_are_accepted(item):
    build(overrides=["model.path=m", "data.path=d", item])


def test_small_yaml_aliases_still_work(tmp_path):
    c = write(
        tmp_path / "c.yaml",
        "model: {path: &p shared/name}\ndata: {path: *p}\nlora: {target_modules: &t [q_proj, v_proj]}\n",
    )
    cfg = build(str(c))
    assert cfg.data.path == "shared/name" and cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_show_keeps_any_value_to_one_short_line():
    import yaml

    # 2**40 leaves once expanded, shared in memory
    huge = yaml.safe_load("a0: &a0 [1, 2]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 40)))
    for value in ("x" * 10_000, "a\nb\tc" * 1000, 10**5000, -(10**300), huge, list(range(10_000)), float("nan")):
        shown = show(value)
        assert len(shown) <= SHOW_CHARS and "\n" not in shown, shown


def test_greedy_and_full_top_p_generate(world, capsys):
    code, out, err = run_main(capsys, generate(world, "--temperature", "0", "--top-p", "1"))
    assert code == 0 and out.strip(), err
    again = run_main(capsys, generate(world, "--temperature", "0", "--top-p", "1"))
    assert again[1] == out  # greedy is deterministic


def test_sampling_at_the_edges_of_the_ranges(world, capsys):
    code, out, err = run_main(
        capsys,
        generate(world, "--temperature", "100", "--top-p", "0.01", "--seed", str(2**32 - 1), "--max-tokens", "1"),
    )
    assert code == 0 and out.strip(), err


def test_eval_with_the_smallest_allowed_options(world, capsys):
    code, out, err = run_main(capsys, evaluate(world, "--batch-size", "1", "--max-batches", "1", "--json"))
    assert code == 0, err
    r = json.loads(out)
    assert r["tokens"] > 0 and r["loss"] == r["loss"]  # a real number, not nan


def test_train_at_the_largest_seed_writes_its_run(world, tmp_path, capsys):
    code, _, err = run_main(capsys, train(world, tmp_path, "--seed", str(2**32 - 1), "--set", "data.valid_fraction=0"))
    assert code == 0, err
    assert (tmp_path / "out" / "config.yaml").is_file()
