"""Bad inputs, table-driven, through the real command line.

Every case in :data:`CASES` is one mistake a user can make (a broken data row, a config typo, a
damaged model file, an adapter for another model, an unusable output folder). Each must end the
same way: a non-zero exit code, one ``error:`` line on stderr that names the file, line or key at
fault, no traceback (unless ``--debug``), and nothing created or changed on disk: the output
folder, the inputs and the model are snapshotted (paths, modes, sizes, mtimes and SHA-256)
before and after.

The cases run in-process through :func:`mlx_lora.commands.cli.main` (a subprocess pays seconds of imports
per call); :func:`test_real_command_line` runs a few of them as ``python -m mlx_lora`` to prove the
same end to end, including ``--debug``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from cli_harness import assert_one_error_message, assert_refused, cli_env, diff, run_main, snapshot
from cli_harness import make_read_only as _make_read_only
from cli_harness import make_writable as _make_writable
from cli_harness import rows as _rows
from cli_harness import write as _write

from mlx_lora.plumbing.ownership import write_marker
from mlx_lora.testing import make_tiny_dataset

ROW = {
    "messages": [{"role": "user", "content": "What is the code word?"}, {"role": "assistant", "content": "zebra-17"}]
}
TRAIN_ONLY = (
    "--quiet",
    "--iters",
    "2",
    "--batch-size",
    "2",
    "--set",
    "data.valid_fraction=0",
    "--set",
    "train.save_every=1",
)


# ----------------------------------------------------------------------------------------------
# the world the cases run in: a model, data, a finished run, adapters for other bases


@dataclass
class World:
    root: Path
    model: Path  # tiny llama (hidden 64)
    other_seed: Path  # same shapes, other weights
    good: Path  # valid chat JSONL
    previous_run: Path  # a finished 2-step run on `model`
    wide_adapter: Path  # adapter of a llama with hidden 128
    other_adapter: Path  # adapter trained on `other_seed`


_env = pytest.fixture(scope="module", autouse=True)(cli_env)


def _adapter_for(model_dir: Path, out: Path) -> Path:
    """An untrained adapter saved for ``model_dir`` with the fingerprint training records."""
    from mlx_lora.config import LoraConfig
    from mlx_lora.model import adapters
    from mlx_lora.model.integrity import FINGERPRINT_KEY, base_model_fingerprint
    from mlx_lora.model.loading import load_model

    model, _, info = load_model(str(model_dir), with_tokenizer=False)
    adapters.apply_lora(model, LoraConfig(r=4))
    extra = {"model_type": info.model_type, FINGERPRINT_KEY: base_model_fingerprint(model_dir)}
    return adapters.save_adapter(model, out, LoraConfig(r=4), str(model_dir), extra=extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    from mlx_lora.commands.cli import main

    root = tmp_path_factory.mktemp("bad_inputs")
    model = tiny_model_dir("llama")
    good = make_tiny_dataset(root / "good.jsonl", "chat", n=8)
    previous = root / "previous-run"
    main(["train", "--model", str(model), "--data", str(good), "--out", str(previous), *TRAIN_ONLY])
    other = tiny_model_dir("llama", seed=1)
    return World(
        root,
        model,
        other,
        good,
        previous,
        _adapter_for(tiny_model_dir("llama", hidden_size=128), root / "wide-adapter"),
        _adapter_for(other, root / "other-adapter"),
    )


# ----------------------------------------------------------------------------------------------
# snapshots


# ----------------------------------------------------------------------------------------------
# the cases: each takes (world, its own empty folder) and returns (argv, fragments the message must
# contain, paths that must not change besides the case folder)


def train(w: World, ws: Path, data=None, model=None, *extra) -> list[str]:
    return [
        "train",
        "--model",
        str(model or w.model),
        "--data",
        str(data or w.good),
        "--out",
        str(ws / "out"),
        *TRAIN_ONLY,
        *extra,
    ]


def _copy_model(w: World, ws: Path) -> Path:
    dst = ws / "model"
    shutil.copytree(w.model, dst)
    return dst


Case = Callable[[World, Path], tuple]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# -- data -------------------------------------------------------------------------------------


@case
def malformed_json_on_line_3(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW, ROW, '{"messages": [}'))
    return train(w, ws, d), [f"{d}:3", "invalid JSON"]


@case
def row_missing_its_keys(w, ws):
    d = _write(ws / "d.jsonl", _rows({"prompt": "a", "completion": "b"}, {"prompt": "only"}))
    return train(w, ws, d), [f"{d}:2", "'completion'", "missing key"]


@case
def chat_turn_missing_content(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW, {"messages": [{"role": "user"}]}))
    return train(w, ws, d), [f"{d}:2", "messages[0].content", "missing key"]


@case
def mixed_formats_in_one_file(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW, ROW, {"prompt": "a", "completion": "b"}))
    return train(w, ws, d), [f"{d}:3", "completions format", "file is chat"]


@case
def empty_file(w, ws):
    d = _write(ws / "d.jsonl", "")
    return train(w, ws, d), [str(d), "empty file"]


@case
def blank_lines_only(w, ws):
    d = _write(ws / "d.jsonl", "\n  \n\t\n")
    return train(w, ws, d), [str(d), "empty file"]


@case
def non_utf8_bytes(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW).encode() + b'{"text": "caf\xe9"}\n')
    return train(w, ws, d), [f"{d}:2", "not UTF-8"]


@case
def row_not_an_object(w, ws):
    d = _write(ws / "d.jsonl", _rows(ROW, "[1, 2]"))
    return train(w, ws, d), [f"{d}:2", "expected a JSON object"]


@case
def wrong_type_in_a_row(w, ws):
    d = _write(ws / "d.jsonl", _rows({"prompt": "a", "completion": 5}))
    return train(w, ws, d), [f"{d}:1", "'completion'", "expected a string"]


@case
def unknown_role(w, ws):
    d = _write(ws / "d.jsonl", _rows({"messages": [{"role": "robot", "content": "x"}]}))
    return train(w, ws, d), [f"{d}:1", "messages[0].role", "unknown role"]


@case
def chat_row_with_no_assistant_turn(w, ws):
    d = _write(ws / "d.jsonl", _rows({"messages": [{"role": "user", "content": "Hello?"}]}))
    return train(w, ws, d), [f"{d}:1", "'messages'", "no assistant turn", "nothing to learn"]


@case
def row_longer_than_max_seq_length_policy_error(w, ws):
    long = {"prompt": "Tell me.", "completion": " ".join(["zebra"] * 80)}
    d = _write(ws / "d.jsonl", _rows({"prompt": "a", "completion": "b"}, long))
    return (
        train(w, ws, d, None, "--max-seq-length", "24", "--set", "data.overlong=error"),
        [f"{d}:2", "data.max_seq_length=24"],
    )


@case
def every_example_fully_masked(w, ws):
    # long prompts push every completion token past max_seq_length: nothing left to learn from
    rows = [{"prompt": " ".join(["apple"] * 40), "completion": "zebra-17"}] * 3
    d = _write(ws / "d.jsonl", _rows(*rows))
    return train(w, ws, d, None, "--max-seq-length", "16"), [f"{d}:1", "nothing to learn", "max_seq_length"]


@case
def unknown_data_format(w, ws):
    d = _write(ws / "d.jsonl", _rows({"question": "a", "answer": "b"}))
    return train(w, ws, d), [f"{d}:1", "unknown format", "data.format"]


@case
def data_path_does_not_exist(w, ws):
    return train(w, ws, ws / "nope.jsonl"), [str(ws / "nope.jsonl"), "data.path"]


@case
def data_folder_without_train_jsonl(w, ws):
    _write(ws / "data" / "valid.jsonl", _rows(ROW))
    return train(w, ws, ws / "data"), [str(ws / "data"), "no train.jsonl"]


@case
def bad_valid_jsonl_in_data_folder(w, ws):
    _write(ws / "data" / "train.jsonl", _rows(ROW, ROW))
    v = _write(ws / "data" / "valid.jsonl", _rows(ROW, '{"messages": 3}'))
    return train(w, ws, ws / "data"), [f"{v}:2", "'messages'", "expected a list"]


# -- config -----------------------------------------------------------------------------------


@case
def unknown_key_with_did_you_mean(w, ws):
    return train(w, ws, None, None, "--set", "lora.aplha=4"), ["lora.aplha", "did you mean 'alpha'"]


@case
def foreign_key_name_with_did_you_mean(w, ws):
    return train(w, ws, None, None, "--set", "train.learning_rate=1e-3"), ["train.learning_rate", "did you mean 'lr'"]


@case
def key_in_the_wrong_section(w, ws):
    return (
        train(w, ws, None, None, "--set", "train.max_seq_length=64"),
        ["train.max_seq_length", "did you mean 'data.max_seq_length'"],
    )


@case
def unknown_key_in_yaml_file(w, ws):
    c = _write(ws / "c.yaml", f"model:\n  path: {w.model}\ntrain:\n  batchsize: 4\n")
    return (
        ["train", "--config", str(c), "--data", str(w.good), "--out", str(ws / "out"), "--quiet"],
        [str(c), "train.batchsize", "did you mean 'batch_size'"],
    )


@case
def yaml_syntax_error(w, ws):
    c = _write(ws / "c.yaml", "train:\n  iters: 3\n  lr: [1e-4\n")
    return ["train", "--config", str(c), "--out", str(ws / "out")], [str(c), "YAML syntax error", "line"]


@case
def wrong_type_value(w, ws):
    return train(w, ws, None, None, "--set", "lora.r=abc"), ["lora.r", "expected int", "'abc'"]


@case
def out_of_range_value(w, ws):
    return train(w, ws, None, None, "--set", "lora.dropout=1.5"), ["lora.dropout", "[0, 1)", "1.5"]


@case
def zero_steps(w, ws):
    return train(w, ws, None, None, "--iters", "0"), ["train.iters", ">= 1"]


@case
def choice_typo(w, ws):
    return train(w, ws, None, None, "--set", "train.schedule=cosin"), ["train.schedule", "did you mean 'cosine'"]


@case
def section_given_a_value(w, ws):
    return train(w, ws, None, None, "--set", "lora=8"), ["'lora'", "mapping"]


# -- models -----------------------------------------------------------------------------------


@case
def model_path_does_not_exist(w, ws):
    return train(w, ws, None, ws / "no-such-model"), [str(ws / "no-such-model"), "does not exist"]


@case
def folder_that_is_not_a_model(w, ws):
    _write(ws / "notes" / "readme.txt", "hello")
    return train(w, ws, None, ws / "notes"), [str(ws / "notes"), "not a model folder", "config.json"]


@case
def model_folder_without_weights(w, ws):
    m = ws / "model"
    m.mkdir()
    shutil.copy2(w.model / "config.json", m / "config.json")
    return train(w, ws, None, m), [str(m), "no *.safetensors"]


@case
def unsupported_architecture(w, ws):
    m = _copy_model(w, ws)
    conf = json.loads((m / "config.json").read_text())
    conf["model_type"] = "florp"
    (m / "config.json").write_text(json.dumps(conf))
    return train(w, ws, None, m), [str(m / "config.json"), "'florp'", "not supported"]


@case
def corrupt_config_json(w, ws):
    m = _copy_model(w, ws)
    (m / "config.json").write_text('{"model_type": "llama",')
    return train(w, ws, None, m), [str(m / "config.json"), "cannot read"]


@case
def weights_that_do_not_fit_the_config(w, ws):
    m = _copy_model(w, ws)
    conf = json.loads((m / "config.json").read_text())
    conf["intermediate_size"] = conf["intermediate_size"] * 2
    (m / "config.json").write_text(json.dumps(conf))
    return train(w, ws, None, m), [str(m), "do not match", "mlp"]


@case
def truncated_safetensors(w, ws):
    m = _copy_model(w, ws)
    f = m / "model.safetensors"
    os.truncate(f, f.stat().st_size * 2 // 3)
    return train(w, ws, None, m), [str(f), "model.layers.", "truncated"]


@case
def truncated_gguf(w, ws):
    # a valid start (magic, version 3, counts) that ends inside the metadata
    g = _write(ws / "m.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2, 1) + struct.pack("<Q", 40) + b"general.arch")
    return train(w, ws, None, g), [str(g), "truncated"]


@case
def file_named_gguf_that_is_not_one(w, ws):
    g = _write(ws / "m.gguf", b"PK\x03\x04 a zip file, not a model")
    return train(w, ws, None, g), [str(g), "not a GGUF file"]


@case
def model_path_is_a_plain_file(w, ws):
    f = _write(ws / "model.bin", b"\0" * 64)
    return train(w, ws, None, f), [str(f), "is a file"]


# -- adapters ---------------------------------------------------------------------------------


def generate(w: World, adapter, *extra) -> list[str]:
    return [
        "generate",
        "--model",
        str(w.model),
        "--adapter",
        str(adapter),
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        *extra,
    ]


@case
def adapter_for_a_different_base_shape_mismatch(w, ws):
    return generate(w, w.wide_adapter), [
        str(w.wide_adapter),
        "does not fit this model",
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "(4, 128)",
        "(4, 64)",
    ]


@case
def adapter_for_a_different_base_strict_eval(w, ws):
    return (
        ["eval", "--model", str(w.model), "--adapter", str(w.other_adapter), "--data", str(w.good), "--strict"],
        [str(w.other_adapter), "different base model", "--strict"],
    )


@case
def adapter_for_a_different_base_strict_generate(w, ws):
    return generate(w, w.other_adapter, "--strict"), [str(w.other_adapter), "different base model"]


@case
def adapter_folder_that_is_not_an_adapter(w, ws):
    _write(ws / "a" / "notes.txt", "x")
    return generate(w, ws / "a"), [str(ws / "a"), "adapter_config.json", "not an adapter folder"]


@case
def adapter_config_corrupt(w, ws):
    a = ws / "a"
    shutil.copytree(w.other_adapter, a)
    (a / "adapter_config.json").write_text('{"r": 4, ')
    return generate(w, a), [str(a / "adapter_config.json"), "not valid JSON"]


@case
def adapter_weights_truncated(w, ws):
    a = ws / "a"
    shutil.copytree(w.other_adapter, a)
    f = a / "adapter_model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    return generate(w, a), [str(f), "cannot read"]


@case
def eval_data_with_a_bad_line(w, ws):
    d = _write(ws / "test.jsonl", _rows(ROW, "{oops"))
    return ["eval", "--model", str(w.model), "--data", str(d)], [f"{d}:2", "invalid JSON"]


@case
def eval_folder_without_test_or_valid(w, ws):
    (ws / "data").mkdir()
    return ["eval", "--model", str(w.model), "--data", str(ws / "data")], [str(ws / "data"), "no test.jsonl"]


# -- output folders ---------------------------------------------------------------------------


@case
def output_path_is_a_file(w, ws):
    f = _write(ws / "out", "not a folder")
    return train(w, ws), [str(f), "is a file"]


@case
def output_path_read_only(w, ws):
    ro = ws / "locked"
    ro.mkdir()
    _make_read_only(ro)
    args = train(w, ws)
    args[args.index("--out") + 1] = str(ro / "run")
    return args, [str(ro / "run"), "not writable"]


@case
def output_run_folder_read_only_with_overwrite(w, ws):
    run = ws / "out"
    shutil.copytree(w.previous_run, run)
    _make_read_only(run)
    return train(w, ws, None, None, "--overwrite"), [str(run), "not writable"]


@case
def output_holds_a_run_without_overwrite(w, ws):
    shutil.copytree(w.previous_run, ws / "out")
    return train(w, ws), [str(ws / "out"), "holds a run", "--resume"]


@case
def overwrite_on_a_folder_that_is_not_a_run(w, ws):
    _write(ws / "out" / "thesis.tex", "years of work")
    return train(w, ws, None, None, "--overwrite"), [str(ws / "out"), "'thesis.tex'", "not written by"]


@case
def resume_a_folder_with_no_run(w, ws):
    (ws / "out").mkdir()
    return ["train", "--resume", str(ws / "out")], [str(ws / "out"), "no run to resume", "config.yaml"]


@case
def resume_with_every_checkpoint_damaged(w, ws):
    run = ws / "out"
    shutil.copytree(w.previous_run, run)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "state.json").write_text("{")
    return ["train", "--resume", str(run), "--quiet"], [str(run), "no complete checkpoint"]


# ----------------------------------------------------------------------------------------------
# the tests


def _run_case(name: str, w: World, tmp_path: Path, capsys, prior_run: bool) -> str:
    ws = tmp_path / "ws"
    ws.mkdir()
    try:
        argv, fragments = CASES[name](w, ws)
        if (
            prior_run
            and argv[0] == "train"
            and "--out" in argv
            and not (ws / "out").exists()
            and argv[argv.index("--out") + 1] == str(ws / "out")
        ):
            # the most dangerous variant: a finished run in the way, and --overwrite given
            shutil.copytree(w.previous_run, ws / "out")
            write_marker(ws / "out", "run", "train")  # a copy's marker names the original: mark it the tool's
            argv = argv + ["--overwrite"]
        return assert_refused(
            capsys, argv, fragments, (ws, w.model, w.good, w.previous_run, w.other_adapter, w.wide_adapter)
        )
    finally:
        _make_writable(ws)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    _run_case(name, world, tmp_path, capsys, prior_run=False)


# Cases that reach the model and data checks, rerun with a finished run in the output folder and
# --overwrite: the old run must survive every one of them untouched.
OVERWRITE_CASES = [
    n
    for n in CASES
    if n.startswith(
        (
            "malformed",
            "mixed",
            "non_utf8",
            "chat_row",
            "every_example",
            "row_longer",
            "truncated",
            "unsupported",
            "weights_that",
        )
    )
]


@pytest.mark.parametrize("name", OVERWRITE_CASES)
def test_bad_input_leaves_an_existing_run_untouched(name, world, tmp_path, capsys):
    _run_case(name, world, tmp_path, capsys, prior_run=True)


def test_the_suite_covers_what_it_claims():
    """The closing note reports this count; the issue's list must all be here."""
    required = {
        "malformed_json_on_line_3",
        "row_missing_its_keys",
        "mixed_formats_in_one_file",
        "empty_file",
        "non_utf8_bytes",
        "chat_row_with_no_assistant_turn",
        "row_longer_than_max_seq_length_policy_error",
        "every_example_fully_masked",
        "unknown_key_with_did_you_mean",
        "wrong_type_value",
        "out_of_range_value",
        "model_path_does_not_exist",
        "folder_that_is_not_a_model",
        "unsupported_architecture",
        "truncated_safetensors",
        "truncated_gguf",
        "adapter_for_a_different_base_shape_mismatch",
        "output_path_is_a_file",
        "output_path_read_only",
    }
    assert required <= set(CASES)
    assert len(CASES) >= 45 and len(OVERWRITE_CASES) >= 9


# ----------------------------------------------------------------------------------------------
# what bad inputs with a policy do instead of failing, and what a --strict-less load does


def test_overlong_rows_are_reported_when_truncated_or_skipped(world, tmp_path, capsys):
    long = {"prompt": "Tell me.", "completion": " ".join(["zebra"] * 80)}
    short = {"prompt": "Tell me.", "completion": "zebra-17"}
    d = _write(tmp_path / "d.jsonl", _rows(short, short, long))
    for policy, words in (("truncate", "1 truncated to 24 tokens"), ("skip", "1 skipped")):
        out = tmp_path / policy
        code, _, err = run_main(
            capsys,
            [
                "train",
                "--model",
                str(world.model),
                "--data",
                str(d),
                "--out",
                str(out),
                "--max-seq-length",
                "24",
                "--set",
                f"data.overlong={policy}",
                "--iters",
                "1",
                "--set",
                "data.valid_fraction=0",
            ],
        )
        assert code == 0, err
        assert words in err, err


def test_adapter_from_another_base_loads_with_a_warning(world, capsys):
    code, out, err = run_main(capsys, generate(world, world.other_adapter))
    assert code == 0, err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "different base model" in warnings[0] and str(world.other_adapter) in warnings[0]
    # the adapter trained on this very base loads silently, strict or not
    code, _, err = run_main(capsys, generate(world, world.previous_run, "--strict"))
    assert code == 0 and "warning" not in err, err


# ----------------------------------------------------------------------------------------------
# the real command line


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLX_LORA_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "name, debug", [("malformed_json_on_line_3", True), ("adapter_for_a_different_base_shape_mismatch", False)]
)
def test_real_command_line(name, debug, world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, fragments = CASES[name](world, ws)
    before = snapshot(ws, world.model, world.wide_adapter)
    r = _cli(*argv, cwd=tmp_path)
    assert_one_error_message(r.returncode, r.stdout, r.stderr, fragments)
    assert r.returncode == 2
    assert diff(before, snapshot(ws, world.model, world.wide_adapter)) == []
    if not debug:
        return
    # --debug shows where it came from, and still ends with the same one-line message
    r = _cli("--debug", *argv, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert diff(before, snapshot(ws, world.model, world.wide_adapter)) == []
