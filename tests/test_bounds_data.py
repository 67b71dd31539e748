"""Bounds on data and adapter input, checked before any work starts, through the real command line.

Every case in :data:`CASES` is input that, unchecked, ends in a traceback, a segfault, a hang or a
memory blow-up deep inside tokenizing, templating or allocating: a lone surrogate in any string of
a row, a field of the wrong type, a chat template that loops without end, an ``adapter_config.json``
with a rank, alpha, dropout or flag of the wrong type or range, target modules that match nothing,
a rank larger than the layers. Each must end with exit status 2 and one short ``error:`` line naming
the file, the line or key, and the field, with no traceback, and nothing on disk changed (inputs,
model, cache and a finished run, by hash).

Input a policy covers is not an error: a huge row is cut before tokenizing (the work is bounded by
data.max_seq_length, measured as characters handed to the tokenizer) and still counted as truncated
or skipped, with the tokens and loss mask of the whole row; a corrupt token cache is rebuilt with a
warning.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from cli_harness import assert_refused, cli_env, run_main
from cli_harness import rows as _rows
from cli_harness import write as _write

from mlx_lora.data import examples as D
from mlx_lora.plumbing.ownership import write_marker
from mlx_lora.testing import make_tiny_dataset

USER = {"role": "user", "content": "What is the code word?"}
ANSWER = {"role": "assistant", "content": "zebra-17"}
ROW = {"messages": [USER, ANSWER]}
SUR = "\ud800"  # a lone surrogate: json.dumps writes it as the escape "\ud800"
TRAIN = ("--quiet", "--iters", "1", "--batch-size", "2", "--set", "data.valid_fraction=0")
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@dataclass
class World:
    root: Path
    model: Path
    good: Path
    previous_run: Path  # a finished run; its folder is also a PEFT adapter for `model`
    cache: Path


_env = pytest.fixture(scope="module")(cli_env)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    from mlx_lora.commands.cli import main

    root = tmp_path_factory.mktemp("bounds_data")
    model = tiny_model_dir("llama")
    good = make_tiny_dataset(root / "good.jsonl", "chat", n=8)
    previous = root / "previous-run"
    main(["train", "--model", str(model), "--data", str(good), "--out", str(previous), *TRAIN])
    return World(root, model, good, previous, _env)


def train(w: World, ws: Path, data=None, *extra, model=None) -> list[str]:
    return [
        "train",
        "--model",
        str(model or w.model),
        "--data",
        str(data or w.good),
        "--out",
        str(ws / "out"),
        *TRAIN,
        *extra,
    ]


def generate(w: World, adapter: Path) -> list[str]:
    return ["generate", "--model", str(w.model), "--adapter", str(adapter), "--prompt", "Hi", "--max-tokens", "2"]


Case = Callable[[World, Path], tuple]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def data_case(name: str, row, fragments: list[str], line: int = 2):
    """A file of a good row then ``row`` (on ``line`` 2); the message names file:line and ``fragments``."""

    def fn(w, ws):
        d = _write(ws / "d.jsonl", _rows(*([ROW] * (line - 1)), row))
        return train(w, ws, d), [f"{d}:{line}", *fragments]

    fn.__name__ = name
    return case(fn)


# -- data: lone surrogates, in any string a format reads ----------------------------------------

NOT_UNICODE = "not valid Unicode (lone surrogate)"
data_case(
    "surrogate_in_chat_content",
    {"messages": [USER, {"role": "assistant", "content": "a" + SUR}]},
    ["field 'messages[1].content'", NOT_UNICODE],
)
data_case(
    "surrogate_in_role",
    {"messages": [{"role": "user" + SUR, "content": "x"}, ANSWER]},
    ["field 'messages[0].role'", NOT_UNICODE],
)
data_case(
    "surrogate_in_a_message_key",
    {"messages": [{"role": "user", "content": "x", SUR: 1}, ANSWER]},
    ["field 'messages[0].\\ud800'", "lone surrogate in a key"],
)
data_case(
    "surrogate_in_tool_definition",
    {"messages": [USER, ANSWER], "tools": [{"type": "function", "function": {"name": "f", "description": SUR}}]},
    ["field 'tools[0].function.description'", NOT_UNICODE],
)
data_case(
    "surrogate_escaped_in_a_tools_json_string",
    {"messages": [USER, ANSWER], "tools": json.dumps([{"name": SUR}])},
    ["field 'tools[0].name'", NOT_UNICODE],
)
data_case(
    "surrogate_in_sharegpt_value",
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": SUR + "!"}]},
    ["field 'conversations[1].value'", NOT_UNICODE],
    line=1,
)
data_case("surrogate_in_prompt", {"prompt": "low \udfff", "completion": "b"}, ["field 'prompt'", NOT_UNICODE], line=1)
data_case("surrogate_in_completion", {"prompt": "a", "completion": SUR}, ["field 'completion'", NOT_UNICODE], line=1)
data_case(
    "surrogate_in_alpaca_input",
    {"instruction": "a", "input": SUR, "output": "b"},
    ["field 'input'", NOT_UNICODE],
    line=1,
)
data_case("surrogate_in_text", {"text": "ok " * 50 + SUR}, ["field 'text'", NOT_UNICODE], line=1)


# -- data: wrong types and values ---------------------------------------------------------------

data_case(
    "message_that_is_not_an_object",
    {"messages": [USER, "zebra-17"]},
    ["field 'messages[1]'", "expected an object", "got a string"],
)
data_case(
    "number_as_content",
    {"messages": [USER, {"role": "assistant", "content": 17}]},
    ["field 'messages[1].content'", "expected a string, got int"],
)
data_case(
    "number_as_role",
    {"messages": [{"role": 1, "content": "x"}, ANSWER]},
    ["field 'messages[0].role'", "unknown role 1"],
)
data_case(
    "number_as_message_name",
    {"messages": [USER, {**ANSWER, "name": 5}]},
    ["field 'messages[1].name'", "expected a string, got int"],
)
data_case(
    "tools_of_the_wrong_type",
    {"messages": [USER, ANSWER], "tools": 5},
    ["field 'tools'", "expected a list of tools, got int"],
)
data_case(
    "tool_that_is_not_an_object",
    {"messages": [USER, ANSWER], "tools": ["search"]},
    ["field 'tools[0]'", "expected a tool object"],
)
data_case(
    "tool_calls_not_a_list",
    {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": "f()"}]},
    ["field 'messages[1].tool_calls'", "expected a list of tool calls"],
)
data_case(
    "tools_json_string_nested_too_deeply",
    {"messages": [USER, ANSWER], "tools": "[" * 100_000 + "]" * 100_000},
    ["field 'tools'", "expected a list of tools"],
)
data_case(
    "empty_role", {"messages": [{"role": "", "content": "x"}, ANSWER]}, ["field 'messages[0].role'", "unknown role ''"]
)
data_case(
    "huge_role_is_shown_short",
    {"messages": [{"role": "r" * 100_000, "content": "x"}, ANSWER]},
    ["field 'messages[0].role'", "unknown role 'rrrr"],
)


@case
def number_with_too_many_digits(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW) + '{"prompt": "a", "completion": "b", "id": ' + "7" * 5000 + "}\n")
    return train(w, ws, d), [f"{d}:2", "invalid JSON", "too many digits"]


@case
def overlong_huge_row_with_policy_error(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW, {"messages": [USER, {"role": "assistant", "content": " zebra" * 400_000}]}))
    return (
        train(w, ws, d, "--max-seq-length", "24", "--set", "data.overlong=error"),
        [f"{d}:2", "longer than data.max_seq_length=24"],
    )


# -- data: templates that never finish ----------------------------------------------------------


@case
def chat_template_with_huge_loops(w, ws):
    t = _write(ws / "loop.jinja", LOOP + "{% for m in messages %}{{ m.content }}{% endfor %}")
    return (
        train(w, ws, None, "--set", f"data.chat_template={t}"),
        [f"{w.good}:1", "field 'messages'", str(t), "step budget"],
    )


@case
def chat_template_that_doubles_a_string(w, ws):
    t = _write(
        ws / "grow.jinja",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    )
    return train(w, ws, None, "--set", f"data.chat_template={t}"), [f"{w.good}:1", str(t), "over the limit"]


@case
def chat_template_that_repeats_a_string(w, ws):
    t = _write(ws / "repeat.jinja", "{{ messages[0].content * 10**12 }}")
    return train(w, ws, None, "--set", f"data.chat_template={t}"), [f"{w.good}:1", str(t), "size limit"]


@case
def tokenizer_template_with_huge_loops(w, ws):
    m = ws / "model"
    shutil.copytree(w.model, m)
    conf = json.loads((m / "tokenizer_config.json").read_text())
    conf["chat_template"] = LOOP + conf["chat_template"]
    (m / "tokenizer_config.json").write_text(json.dumps(conf))
    return train(w, ws, None, model=m), [str(m / "tokenizer_config.json"), "field 'chat_template'", "step budget"]


# -- adapters: adapter_config.json ----------------------------------------------------------------


def adapter_case(name: str, change: dict, fragments: list[str]):
    """The finished run's adapter with ``change`` made to its adapter_config.json, loaded by generate."""

    def fn(w, ws):
        a = ws / "adapter"
        a.mkdir()
        shutil.copy2(w.previous_run / "adapter_model.safetensors", a)
        conf = json.loads((w.previous_run / "adapter_config.json").read_text())
        conf.update(change)
        c = _write(a / "adapter_config.json", json.dumps(conf))
        return generate(w, a), [str(c), *fragments]

    fn.__name__ = name
    return case(fn)


adapter_case("adapter_rank_zero", {"r": 0}, ["key 'r'", ">= 1", "got 0"])
adapter_case("adapter_rank_negative", {"r": -4}, ["key 'r'", "got -4"])
adapter_case("adapter_rank_not_an_integer", {"r": 8.5}, ["key 'r'", "expected an integer", "8.5"])
adapter_case("adapter_rank_a_string", {"r": "8"}, ["key 'r'", "expected an integer", '"8"'])
adapter_case("adapter_rank_null", {"r": None}, ["key 'r'", "missing"])
adapter_case(
    "adapter_rank_larger_than_the_layers", {"r": 100_000_000}, ["key 'r'", "100000000", "(64 in, 32 out)", "at most 32"]
)
adapter_case("adapter_alpha_a_string", {"lora_alpha": "abc"}, ["key 'lora_alpha'", "expected a number", '"abc"'])
adapter_case("adapter_alpha_zero_is_not_read_as_8", {"lora_alpha": 0}, ["key 'lora_alpha'", "> 0", "got 0"])
adapter_case("adapter_alpha_infinite", {"lora_alpha": float("inf")}, ["key 'lora_alpha'", "got inf"])
adapter_case("adapter_dropout_one", {"lora_dropout": 1.0}, ["key 'lora_dropout'", "[0, 1)", "1.0"])
adapter_case("adapter_dropout_negative", {"lora_dropout": -0.1}, ["key 'lora_dropout'", "[0, 1)", "-0.1"])
adapter_case("adapter_use_dora_a_string", {"use_dora": "false"}, ["key 'use_dora'", "true or false", '"false"'])
adapter_case("adapter_use_rslora_a_string", {"use_rslora": "true"}, ["key 'use_rslora'", "true or false"])
adapter_case("adapter_use_rslora_a_number", {"use_rslora": 1}, ["key 'use_rslora'", "true or false", "got 1"])
adapter_case(
    "adapter_target_modules_match_nothing",
    {"target_modules": ["qkv_proj", "dense"]},
    ["key 'target_modules'", "'qkv_proj'", "match no linear layer", "it has:", "q_proj", "down_proj"],
)
adapter_case(
    "adapter_target_modules_regex_matches_nothing",
    {"target_modules": r".*\.attention\.wq"},
    ["key 'target_modules'", "match no linear layer", "q_proj"],
)
adapter_case("adapter_target_modules_empty", {"target_modules": []}, ["key 'target_modules'", "empty list"])
adapter_case("adapter_target_modules_a_number", {"target_modules": 7}, ["key 'target_modules'", "got 7"])
adapter_case(
    "adapter_target_modules_bad_regex", {"target_modules": "(("}, ["key 'target_modules'", "regular expression"]
)
adapter_case(
    "adapter_layers_out_of_range", {"layers_to_transform": [9]}, ["key 'layers_to_transform'", "[9]", "2 blocks"]
)
adapter_case("adapter_layers_a_string", {"layers_to_transform": "0"}, ["key 'layers_to_transform'", '"0"'])
adapter_case("adapter_other_peft_type", {"peft_type": "LOHA"}, ["key 'peft_type'", "LORA only"])
adapter_case("adapter_per_layer_ranks", {"rank_pattern": {"q_proj": 4}}, ["key 'rank_pattern'", "not supported"])
adapter_case("adapter_mlx_lora_section_not_an_object", {"mlx_lora": [1]}, ["key 'mlx_lora'", "expected an object"])


@case
def adapter_config_not_an_object(w, ws):
    a = ws / "adapter"
    a.mkdir()
    shutil.copy2(w.previous_run / "adapter_model.safetensors", a)
    c = _write(a / "adapter_config.json", "[8, 16]")
    return generate(w, a), [str(c), "expected a JSON object"]


@case
def mlx_lm_adapter_rank_a_string(w, ws):
    a = ws / "adapter"
    c = _write(
        a / "adapter_config.json",
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": "8", "scale": 20.0}}),
    )
    _write(a / "adapters.safetensors", b"not read: the config is checked first")
    return generate(w, a), [str(c), "key 'lora_parameters.rank'", '"8"']


@case
def mlx_lm_adapter_too_many_layers(w, ws):
    a = ws / "adapter"
    c = _write(a / "adapter_config.json", json.dumps({"num_layers": 40, "lora_parameters": {"rank": 8}}))
    _write(a / "adapters.safetensors", b"not read: the config is checked first")
    return generate(w, a), [str(c), "key 'num_layers'", "[1, 2]", "got 40"]


# -- training: the rank against the model's layers ------------------------------------------------


@case
def train_rank_larger_than_the_smallest_layer(w, ws):
    return (
        train(w, ws, None, "--set", "lora.r=33"),
        ["lora.r=33", "model.layers.0.self_attn.k_proj", "(64 in, 32 out)", "at most 32"],
    )


@case
def train_target_modules_match_nothing(w, ws):
    return (
        train(w, ws, None, "--set", "lora.target_modules=[qkv_proj]"),
        ["lora.target_modules", "'qkv_proj'", "matched no linear layer", "q_proj"],
    )


@case
def train_rank_huge(w, ws):
    # Refused by config's absolute bound or by the layers, whichever comes first: never allocated.
    return train(w, ws, None, "--set", "lora.r=100000000"), ["lora.r", "100000000"]


# ----------------------------------------------------------------------------------------------
# the tests


def _run_case(name: str, w: World, tmp_path: Path, capsys, prior_run: bool) -> str:
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, fragments = CASES[name](w, ws)
    if prior_run:
        shutil.copytree(w.previous_run, ws / "out")
        write_marker(ws / "out", "run", "train")  # a copy's marker names the original: mark it the tool's
        argv = argv + ["--overwrite"]
    line = assert_refused(capsys, argv, fragments, (ws, w.model, w.good, w.previous_run, w.cache), code=2)
    assert len(line.splitlines()) == 1, line
    assert len(line) < 1000, line[:2000]  # names the value, never prints a huge one back
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    _run_case(name, world, tmp_path, capsys, prior_run=False)


# The training cases again, with a finished run in the output folder and --overwrite: it survives.
OVERWRITE_CASES = [
    n
    for n in CASES
    if n.startswith(
        ("surrogate_in_chat", "tools_json", "number_with", "overlong_huge", "chat_template_with", "train_rank")
    )
]


@pytest.mark.parametrize("name", OVERWRITE_CASES)
def test_bad_input_leaves_an_existing_run_untouched(name, world, tmp_path, capsys):
    _run_case(name, world, tmp_path, capsys, prior_run=True)


def test_the_table_covers_what_it_claims():
    required = {
        "surrogate_in_chat_content",
        "surrogate_in_role",
        "surrogate_in_tool_definition",
        "surrogate_in_prompt",
        "surrogate_in_text",
        "message_that_is_not_an_object",
        "tools_of_the_wrong_type",
        "chat_template_with_huge_loops",
        "adapter_rank_zero",
        "adapter_rank_not_an_integer",
        "adapter_alpha_a_string",
        "adapter_alpha_zero_is_not_read_as_8",
        "adapter_dropout_one",
        "adapter_use_dora_a_string",
        "adapter_target_modules_match_nothing",
        "train_rank_huge",
    }
    assert required <= set(CASES)
    assert len(CASES) >= 55 and len(OVERWRITE_CASES) >= 6


# ----------------------------------------------------------------------------------------------
# huge rows: cut before tokenizing, still counted as today


@pytest.fixture
def chars_tokenized(monkeypatch) -> list[int]:
    """Characters handed to the tokenizer, one entry per call."""
    calls: list[int] = []
    real = D._Encoder.encode_many

    def counting(self, texts):
        calls.append(sum(len(t) for t in texts))
        return real(self, texts)

    monkeypatch.setattr(D._Encoder, "encode_many", counting)
    return calls


HUGE = " ".join(["zebra"] * 400_000)  # 2.4 MB: tokenized whole, this took seconds and hundreds of MB
SHORT = {"chat": ROW, "completions": {"prompt": "Tell me.", "completion": "zebra-17"}, "text": {"text": "zebra-17"}}
LONG = {
    "chat": {"messages": [USER, {"role": "assistant", "content": HUGE}]},
    # 20,000 target turns: the two prefixes of every one add up to nearly 30 GB of text to tokenize
    "chat-many-turns": {"messages": [{"role": "user", "content": "Hi"}, ANSWER] * 20_000},
    "completions": {"prompt": "Tell me.", "completion": HUGE},
    "text": {"text": HUGE},
}


@pytest.mark.parametrize("name", list(LONG))
@pytest.mark.parametrize("policy, words", [("truncate", "1 truncated to 24 tokens"), ("skip", "1 skipped")])
def test_huge_row_is_cut_before_tokenizing_and_still_counted(
    name, policy, words, world, tmp_path, capsys, chars_tokenized
):
    fmt = name.split("-")[0]
    d = _write(tmp_path / "d.jsonl", _rows(SHORT[fmt], SHORT[fmt], LONG[name]))
    code, _, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(world.model),
            "--data",
            str(d),
            "--out",
            str(tmp_path / "out"),
            "--max-seq-length",
            "24",
            "--set",
            f"data.overlong={policy}",
            "--iters",
            "1",
            "--set",
            "data.valid_fraction=0",
            "--set",
            "data.cache=false",
        ],
    )
    assert code == 0, err
    assert words in err, err
    examples = 3 if policy == "truncate" else 2
    assert f"{examples} examples ({fmt})" in err, err
    # The row is over a megabyte; a few budgets of 16 characters per token of max_seq_length are tokenized.
    budget = D._CHARS_PER_TOKEN * (24 + D._CUT_MARGIN)
    assert sum(chars_tokenized) < 4 * budget, chars_tokenized


def _long_rows() -> dict[str, list[dict]]:
    """Rows of every format that are cut at max_seq_length 24 and 200, with targets before,
    across and after the cut, several turns, and long runs without a space."""
    words = " ".join(f"word{i % 37} zebra-{i % 91}" for i in range(3000))
    blob = "x" * 5000 + " " + words
    return {
        "chat": [
            {"messages": [USER, {"role": "assistant", "content": words}]},
            {"messages": [{"role": "user", "content": words}, ANSWER]},
            {
                "messages": [
                    USER,
                    ANSWER,
                    {"role": "user", "content": words[:900]},
                    {"role": "assistant", "content": blob},
                ]
            },
            {"messages": [{"role": "system", "content": "Be brief."}] + [USER, ANSWER] * 20},
            ROW,
        ],
        "completions": [
            {"prompt": words, "completion": "zebra-17"},
            {"prompt": "Tell me.", "completion": words},
            {"prompt": words[:150], "completion": blob},
            {"prompt": "a", "completion": "b"},
        ],
        "text": [{"text": words}, {"text": blob}, {"text": "zebra-17"}],
    }


@pytest.mark.parametrize("fmt", ["chat", "completions", "text"])
@pytest.mark.parametrize("max_len", [24, 200])
@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_cut_rows_give_the_tokens_and_masks_of_whole_rows(
    fmt, max_len, train_on, world, tmp_path, monkeypatch, chars_tokenized
):
    """The loss mask and the prompt/completion and turn boundaries of a cut row are those of the
    whole row: the same tokens, masks, counts and skipped rows as tokenizing everything."""
    from transformers import AutoTokenizer

    from mlx_lora.config import DataConfig

    rows = _long_rows()[fmt]
    d = _write(tmp_path / "d.jsonl", _rows(*rows))
    tok = AutoTokenizer.from_pretrained(str(world.model))
    cfg = DataConfig(path=str(d), max_seq_length=max_len, train_on=train_on, cache=False)
    try:
        cut = D.load_jsonl_dataset(d, cfg, tok)
    except D.DataError as e:
        assert "nothing to learn" in str(e)  # every target past max_seq_length: whole rows agree below
        cut = e
    cut_chars = sum(chars_tokenized)
    monkeypatch.setattr(D, "_CHARS_PER_TOKEN", 10**9)
    try:
        whole = D.load_jsonl_dataset(d, cfg, tok)
    except D.DataError as e:
        assert str(e) == str(cut)
        return
    assert cut_chars < (sum(chars_tokenized) - cut_chars) / 2  # the cut really cut
    assert cut.stats == whole.stats and np.array_equal(cut.lines, whole.lines)
    assert whole.stats.truncated + whole.stats.skipped > 0
    for (t1, m1), (t2, m2) in zip(cut.examples, whole.examples, strict=True):
        assert np.array_equal(t1, t2) and np.array_equal(m1, m2)


class _ChunkTokenizer:
    """Every 64 characters are one token: far more than _CHARS_PER_TOKEN, so the first cut yields
    too few tokens and must be retried; and a cut inside a chunk changes its last token."""

    bos_token_id, eos_token_id, chat_template = None, 0, None

    def encode(self, text, add_special_tokens=True):
        return [1 + (hash(text[i : i + 64]) % 1000) for i in range(0, len(text), 64)]


@pytest.mark.parametrize(
    "row",
    [
        {"text": "y" * 100_000},
        {"prompt": "p" * 10, "completion": "c" * 100_000},
        {"prompt": "p" * 100_000, "completion": "c"},
    ],
)
def test_rows_of_few_tokens_per_character_are_cut_again_later(row, tmp_path, monkeypatch, chars_tokenized):
    from mlx_lora.config import DataConfig

    short = {"prompt": "a", "completion": "b"} if "prompt" in row else {"text": "ab"}
    d = _write(tmp_path / "d.jsonl", _rows(short, row))
    cfg = DataConfig(path=str(d), max_seq_length=24, cache=False)
    cut = D.load_jsonl_dataset(d, cfg, _ChunkTokenizer())
    assert len(chars_tokenized) >= 2  # the long row was tokenized again, with more characters
    monkeypatch.setattr(D, "_CHARS_PER_TOKEN", 10**9)
    whole = D.load_jsonl_dataset(d, cfg, _ChunkTokenizer())
    assert cut.stats == whole.stats
    for (t1, m1), (t2, m2) in zip(cut.examples, whole.examples, strict=True):
        assert np.array_equal(t1, t2) and np.array_equal(m1, m2)


# ----------------------------------------------------------------------------------------------
# a corrupt token cache is rebuilt


def _corrupt(kind: str, f: Path) -> None:
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return
    with np.load(f) as z:
        a = dict(z)
    if kind == "ids_past_the_vocabulary":
        a["tokens"] = a["tokens"] + 10**6
    elif kind == "negative_ids":
        a["tokens"] = a["tokens"] - 10**6
    elif kind == "ids_that_wrap_when_cast":  # 2**32 + id is id again as int32
        a["tokens"] = a["tokens"].astype(np.int64) + 2**32
    elif kind == "offsets_past_the_tokens":
        a["offsets"] = a["offsets"] * 2
    elif kind == "tokens_of_another_shape":
        a["tokens"] = a["tokens"].reshape(1, -1)
    elif kind == "example_longer_than_max_seq_length":
        a["offsets"] = np.array([0, len(a["tokens"])])
        a["ex_rows"] = a["ex_rows"][:1]
    elif kind == "rows_past_the_end_of_the_file":
        a["lines"] = a["lines"] + 1000
    elif kind == "mask_not_boolean":
        a["mask"] = a["mask"].astype(np.float32)
    with open(f, "wb") as out:
        np.savez(out, **a)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "ids_past_the_vocabulary",
        "negative_ids",
        "ids_that_wrap_when_cast",
        "offsets_past_the_tokens",
        "tokens_of_another_shape",
        "example_longer_than_max_seq_length",
        "rows_past_the_end_of_the_file",
        "mask_not_boolean",
    ],
)
def test_corrupt_token_cache_is_rebuilt_with_a_warning(kind, world, tmp_path, capsys, caplog, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLX_LORA_CACHE", str(cache))
    argv = ["train", "--model", str(world.model), "--data", str(world.good), *TRAIN, "--max-seq-length", "48"]
    code, _, err = run_main(capsys, [*argv, "--out", str(tmp_path / "first")])
    assert code == 0, err
    [f] = (cache / "data").glob("*.npz")
    with np.load(f) as z:
        good = dict(z)
    _corrupt(kind, f)
    caplog.clear()
    code, _, err = run_main(capsys, [*argv, "--out", str(tmp_path / "second")])
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(warnings) == 1 and str(f) in warnings[0] and "rebuilding" in warnings[0], warnings
    assert "\n" not in warnings[0]
    with np.load(f) as z:  # rebuilt: the same arrays as the first build
        assert all(np.array_equal(z[k], good[k]) for k in good)
    caplog.clear()
    code, _, err = run_main(capsys, [*argv, "--out", str(tmp_path / "third")])
    assert code == 0 and not [r for r in caplog.records if "data cache" in r.getMessage()], err


# ----------------------------------------------------------------------------------------------
# what stays allowed


def test_adapter_defaults_and_real_booleans_are_read_as_written(world, tmp_path):
    from mlx_lora.model.adapters import read_adapter

    conf = json.loads((world.previous_run / "adapter_config.json").read_text())
    a = tmp_path / "adapter"
    a.mkdir()
    shutil.copy2(world.previous_run / "adapter_model.safetensors", a)
    for change, expect in (
        ({"lora_alpha": None, "lora_dropout": None, "use_dora": None}, (8.0, 0.0, False)),
        ({"lora_alpha": 0.5, "lora_dropout": 0, "use_rslora": True}, (0.5, 0.0, False)),
        ({"target_modules": "all-linear", "use_dora": False}, (16.0, 0.0, False)),
    ):
        _write(a / "adapter_config.json", json.dumps({**conf, **change}))
        info, _ = read_adapter(a)
        assert (info.lora.alpha, info.lora.dropout, info.lora.use_dora) == expect
        assert info.lora.use_rslora is change.get("use_rslora", False)


def test_template_limits_leave_ordinary_templates_alone(world, tmp_path, capsys):
    """The built-in ChatML template and one with macros, loops over tools and filters train as before."""
    t = _write(
        tmp_path / "tools.jinja",
        "{% macro turn(m) %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endmacro %}"
        "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
        "{% for m in messages %}{{ turn(m) }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    d = _write(
        tmp_path / "d.jsonl", _rows(*[{"messages": [USER, ANSWER], "tools": [{"name": "f", "n": i}]} for i in range(4)])
    )
    for template in ("chatml", str(t)):
        code, _, err = run_main(
            capsys,
            [
                "train",
                "--model",
                str(world.model),
                "--data",
                str(d),
                "--out",
                str(tmp_path / Path(template).stem),
                *TRAIN,
                "--set",
                f"data.chat_template={template}",
            ],
        )
        assert code == 0, err
        assert "4 examples (chat)" in err, err
