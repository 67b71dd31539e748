"""What comes from outside cannot run code, hang the tool, exhaust its memory or slip a broken
adapter past it. Every case drives the real command and compares the files around it by hash.

* Model folders: a tokenizer whose ``tokenizer_config.json`` maps ``AutoTokenizer`` to a
  ``tokenization_evil.py`` (which writes a marker file when imported) never runs, even with "y"
  on standard input, for generate, chat, eval, train and serve; the refusal is one line naming
  the file and the flag. With the flag, it reaches the tokenizer loader (the marker appears).
* Chat templates: big-integer chains, string and list bombs, nested loops, huge ranges and
  recursive macros fail in one line naming the template's file, from a ``.jinja`` file or the
  model's own ``tokenizer_config.json``, on every path that renders one; the deadline also
  holds in a worker thread.
* Prompts: a prompt that leaves no room for the new tokens in the model's context is refused by
  generate and chat, and skipped (and counted) by eval --generate; a huge one is refused before
  it is tokenized.
* Adapters and run folders: NaN weights, ``lora_alpha: 1e308`` and a folder in place of
  ``checkpoints/latest`` are refused by every command that loads them, writing nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from cli_harness import assert_one_error_message, cli_env, diff, run_main, snapshot, write

from mlx_lora.data import templates
from mlx_lora.data.templates import TemplateLimitError, template_from_source
from mlx_lora.inference.evaluation import PromptTooLong, bound_prompt
from mlx_lora.testing import make_tiny_dataset

_env = pytest.fixture(scope="module", autouse=True)(cli_env)

REPO = Path(__file__).resolve().parents[1]


class World:
    """Model folders, data and a trained run shared by the module (cases copy what they change)."""

    root: Path
    model: Path
    evil: Path
    marker: Path
    chat_data: Path
    run: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, _env) -> World:
    w = World()
    w.root = tmp_path_factory.mktemp("boundaries")
    w.model = w.root / "model"
    shutil.copytree(tiny_llama, w.model)
    w.marker = w.root / "MARKER"
    w.evil = evil_model(tiny_llama, w.root / "evil", w.marker)
    w.chat_data = make_tiny_dataset(w.root / "chat.jsonl", "chat", n=8)
    w.run = w.root / "run"
    code = _main(
        [
            "train",
            "--model",
            str(w.model),
            "--data",
            str(w.chat_data),
            "--out",
            str(w.run),
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--quiet",
            "--set",
            "data.valid_fraction=0",
            "--set",
            "train.save_every=1",
        ]
    )
    assert code == 0
    return w


def _main(argv) -> int:
    from mlx_lora.commands.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def evil_model(source: Path, out: Path, marker: Path) -> Path:
    """A copy of ``source`` whose tokenizer is remote code: importing ``tokenization_evil.py``
    writes ``marker``."""
    shutil.copytree(source, out)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf["tokenizer_class"] = "EvilTokenizer"
    conf["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    (out / "tokenization_evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    return out


def subprocess_cli(argv, tmp: Path, stdin: str = "y\ny\ny\ny\n") -> subprocess.CompletedProcess:
    """The real command in its own process, with ``stdin`` piped in (as ``echo y | mlx-lora ...``)."""
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO / "tests"),
    }
    env.pop("MLX_LORA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora", *map(str, argv)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )


def assert_one_line(r: subprocess.CompletedProcess, fragments) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert str(f) in lines[0], f"{f!r} not in {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. No code from a model folder unless asked


def _remote_code_cases(w: World, tmp: Path) -> dict:
    eval_rows = tmp / "eval.jsonl"
    shutil.copy(w.chat_data, eval_rows)
    return {
        "generate": ["generate", "--model", w.evil, "--prompt", "hi", "--max-tokens", "2"],
        "chat": ["chat", "--model", w.evil, "--max-tokens", "2"],
        "eval": ["eval", "--model", w.evil, "--data", eval_rows],
        "eval --generate": [
            "eval",
            "--generate",
            "--model",
            w.evil,
            "--data",
            eval_rows,
            "--max-tokens",
            "2",
            "--out",
            tmp / "out.jsonl",
        ],
        "train": ["train", "--model", w.evil, "--data", w.chat_data, "--out", tmp / "run", "--iters", "1", "--quiet"],
        "serve": ["serve", "--model", w.evil, "--port", "0"],
    }


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "eval --generate", "train", "serve"])
def test_remote_tokenizer_code_never_runs_even_with_yes_on_stdin(world, tmp_path, command):
    argv = _remote_code_cases(world, tmp_path)[command]
    before = snapshot(world.evil, tmp_path)
    r = subprocess_cli(argv, tmp_path)
    assert_one_line(
        r, [world.evil / "tokenizer_config.json", "auto_map", "--trust-remote-code", "model.trust_remote_code"]
    )
    assert not world.marker.exists(), "the model folder's code ran"
    assert "Do you wish to run the custom code" not in r.stdout + r.stderr
    assert diff(before, snapshot(world.evil, tmp_path)) == []


def test_trust_remote_code_reaches_the_tokenizer(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    marker = tmp_path / "MARKER"
    evil = evil_model(world.model, tmp_path / "evil", marker)
    code, out, err = run_main(
        capsys, ["generate", "--model", str(evil), "--prompt", "hi", "--max-tokens", "2", "--trust-remote-code"]
    )
    assert code == 0, err
    assert marker.read_text() == "ran"
    # train: the config key reaches it too (another folder: this process has imported the first one)
    marker = tmp_path / "MARKER2"
    evil = evil_model(world.model, tmp_path / "evil_two", marker)
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(evil),
            "--data",
            str(world.chat_data),
            "--out",
            str(tmp_path / "run"),
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--quiet",
            "--set",
            "data.valid_fraction=0",
            "--set",
            "model.trust_remote_code=true",
        ],
    )
    assert code == 0, err
    assert marker.read_text() == "ran"


def test_model_file_in_config_needs_the_flag(world, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(world.model, folder)
    conf = json.loads((folder / "config.json").read_text())
    conf["model_file"] = "evil_model.py"
    (folder / "config.json").write_text(json.dumps(conf))
    write(folder / "evil_model.py", f"import pathlib\npathlib.Path({str(tmp_path / 'M')!r}).write_text('ran')\n")
    before = snapshot(folder)
    code, out, err = run_main(capsys, ["generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"])
    assert_one_error_message(code, out, err, [folder / "config.json", "model_file", "--trust-remote-code"])
    assert not (tmp_path / "M").exists()
    assert diff(before, snapshot(folder)) == []


def test_no_library_reads_an_answer_from_stdin_while_loading(world, monkeypatch, capsys, tmp_path):
    """In-process as well: a stdin that would answer "y" is not read while the model loads."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    stdin = io.StringIO("y\n" * 10)
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run_main(capsys, ["generate", "--model", str(world.evil), "--prompt", "hi", "--max-tokens", "2"])
    assert_one_error_message(code, out, err, ["auto_map", "--trust-remote-code"])
    assert stdin.tell() == 0 and not world.marker.exists()


# ---------------------------------------------------------------------------------------------
# 2. Chat templates are bounded

BOMBS = {
    "big-int squaring": "{% set x = 2 ** 4000 %}" + "{% set x = x * x %}" * 20 + "{{ x }}",
    "big-int in a loop": "{% set ns = namespace(x=2) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
    "{% endfor %}{{ ns.x }}",
    "power chain": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x ** 2 %}{% endfor %}",
    "float power": "{{ 2.5 ** 100000 }}",
    "string multiplication": "{{ 'x' * 10 ** 9 }}",
    "string doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s * 2 %}{% endfor %}",
    "concat doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "list doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "range(10**12)": "{% for i in range(10 ** 12) %}{{ i }}{% endfor %}",
    "range list": "{{ range(10 ** 7) | list | length }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential macro": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
    "{{ f(0) }}",
    "recursive loop": "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "big join": "{{ (['x' * 1000000] * 100) | join('') }}",
    "center": "{{ 'x' | center(10 ** 10) }}",
    "format width": "{{ '%999999999d' % 1 }}",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_template_bombs_hit_a_limit(name):
    template = template_from_source(BOMBS[name], "/models/x/evil.jinja")
    with pytest.raises(TemplateLimitError):
        template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_the_deadline_holds_in_a_worker_thread(monkeypatch):
    """The server renders in worker threads, where no signal can interrupt: the deadline is
    checked at every step. With a zero deadline any loop ends at its first step."""
    monkeypatch.setattr(templates, "DEADLINE_S", 0.0)
    monkeypatch.setattr(templates, "DEADLINE_S_PER_MCHAR", 0.0)
    template = template_from_source("{% for i in range(1000) %}{{ i }}{% endfor %}", "t.jinja")
    got: list = []

    def work():
        try:
            template.render([{"role": "user", "content": "hi"}])
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive()
    assert isinstance(got[0], TemplateLimitError) and "deadline" in str(got[0])


def test_normal_templates_still_render_as_transformers_does(world):
    """The tokenizer's own template (rendered by the bounded sandbox now) gives transformers' text."""
    from transformers import AutoTokenizer

    from mlx_lora.data.templates import apply_chat_template

    tok = AutoTokenizer.from_pretrained(world.model)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    for gen in (False, True):
        assert apply_chat_template(tok, msgs, add_generation_prompt=gen) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen
        )


def bomb_model(world: World, tmp: Path, source: str) -> Path:
    folder = tmp / "bomb_model"
    shutil.copytree(world.model, folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    conf["chat_template"] = source
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    return folder


BOMB = BOMBS["big-int squaring"]
# Renders normally until a message says "boom": passes the check made as the model loads.
LATE_BOMB = (
    "{% for m in messages %}{% if m.content == 'boom' %}{{ 'x' * 10 ** 10 }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("command", ["generate --chat", "chat", "serve", "eval --generate", "eval", "train"])
def test_a_models_own_template_bomb_fails_in_one_line_naming_its_file(world, tmp_path, capsys, command, monkeypatch):
    model = bomb_model(world, tmp_path, BOMB)
    data = tmp_path / "chat.jsonl"
    shutil.copy(world.chat_data, data)
    argv = {
        "generate --chat": ["generate", "--model", model, "--prompt", "hi", "--chat", "--max-tokens", "2"],
        "chat": ["chat", "--model", model, "--max-tokens", "2"],
        "serve": ["serve", "--model", model, "--port", "0"],
        "eval --generate": ["eval", "--generate", "--model", model, "--data", data, "--max-tokens", "2"],
        "eval": ["eval", "--model", model, "--data", data],
        "train": ["train", "--model", model, "--data", data, "--out", tmp_path / "run", "--iters", "1", "--quiet"],
    }[command]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, [str(a) for a in argv])
    assert_one_error_message(code, out, err, [model / "tokenizer_config.json", "chat template"])
    assert diff(before, snapshot(tmp_path)) == []


def test_a_jinja_file_bomb_fails_training_in_one_line(world, tmp_path, capsys):
    jinja = write(tmp_path / "evil.jinja", BOMBS["nested loops"])
    before = snapshot(tmp_path)
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(world.model),
            "--data",
            str(world.chat_data),
            "--out",
            str(tmp_path / "run"),
            "--iters",
            "1",
            "--quiet",
            "--set",
            f"data.chat_template={jinja}",
        ],
    )
    assert_one_error_message(code, out, err, [jinja, "step budget"])
    assert diff(before, snapshot(tmp_path)) == []


def test_a_template_that_explodes_on_one_row_names_the_file_and_row(world, tmp_path, capsys):
    model = bomb_model(world, tmp_path, LATE_BOMB)
    data = write(
        tmp_path / "rows.jsonl",
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "ok"}]},
            ]
        ),
    )
    code, out, err = run_main(
        capsys, ["eval", "--generate", "--model", str(model), "--data", str(data), "--max-tokens", "2"]
    )
    assert_one_error_message(code, out, err, [model / "tokenizer_config.json", f"{data}:2", "size limit"])


def test_chat_survives_a_template_that_explodes_on_one_turn(world, tmp_path, capsys, monkeypatch):
    model = bomb_model(world, tmp_path, LATE_BOMB)
    monkeypatch.setattr(sys, "stdin", io.StringIO("boom\nhello\n"))
    code, out, err = run_main(capsys, ["chat", "--model", str(model), "--max-tokens", "2"])
    assert code == 0, err
    assert "size limit" in out and str(model / "tokenizer_config.json") in out


def test_export_template_derivation_is_bounded(world, tmp_path):
    from transformers import AutoTokenizer

    from mlx_lora.converters.packaging import derive_chat_format

    tok = AutoTokenizer.from_pretrained(bomb_model(world, tmp_path, BOMB))
    assert derive_chat_format(tok, add_bos=False) is None  # "cannot render", in a fraction of a second


# ---------------------------------------------------------------------------------------------
# 3. Prompts are bounded by the model's context


class _NoEncode:
    def get_vocab(self):
        return {"a": 0, "bb": 1}

    def encode(self, text):
        raise AssertionError("a huge text was tokenized")


def test_a_huge_prompt_is_refused_before_tokenizing():
    with pytest.raises(PromptTooLong, match="characters"):
        bound_prompt(_NoEncode(), "x" * 10_000_000, context=4096, max_tokens=16)
    with pytest.raises(PromptTooLong, match="no room"):
        bound_prompt(_NoEncode(), "x", context=16, max_tokens=16)


def test_generate_refuses_a_prompt_past_the_context(world, capsys):
    huge = "word " * 2_000_000
    code, out, err = run_main(
        capsys, ["generate", "--model", str(world.model), "--raw", "--prompt", huge, "--max-tokens", "4"]
    )
    assert_one_error_message(code, out, err, ["--prompt", "characters", "context is 4096 tokens"])
    code, out, err = run_main(
        capsys,
        ["generate", "--model", str(world.model), "--raw", "--prompt", "hello world " * 20, "--max-tokens", "4090"],
    )
    assert_one_error_message(code, out, err, ["--prompt", "tokens", "4096", "4090"])
    code, out, err = run_main(
        capsys,
        [
            "generate",
            "--model",
            str(world.model),
            "--prompt",
            "hi",
            "--chat",
            "--system",
            "word " * 5000,
            "--max-tokens",
            "4",
        ],
    )
    assert_one_error_message(code, out, err, ["the conversation", "tokens", "context is 4096"])


def test_chat_refuses_a_turn_past_the_context_and_goes_on(world, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 100_000 + "\nhello\n"))
    code, out, err = run_main(capsys, ["chat", "--model", str(world.model), "--max-tokens", "2"])
    assert code == 0, err
    assert "[not sent: the conversation has" in out and out.count("\n") >= 2


def test_eval_generate_skips_and_counts_rows_past_the_context(world, tmp_path, capsys):
    rows = [
        {"prompt": "short one", "completion": "x"},
        {"prompt": "word " * 1_000_000, "completion": "x"},  # refused before tokenizing
        {"prompt": "word " * 5000, "completion": "x"},  # tokenized: past the context
        {"prompt": "another", "completion": "y"},
    ]
    data = write(tmp_path / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_main(
        capsys,
        [
            "eval",
            "--generate",
            "--model",
            str(world.model),
            "--data",
            str(data),
            "--max-tokens",
            "4",
            "--out",
            str(out_file),
            "--json",
        ],
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rows"] == 2 and summary["skipped"] == 2 and summary["skipped_lines"] == [2, 3]
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert [bool(r.get("skipped")) for r in records] == [False, True, True, False]
    assert "context" in records[1]["skipped"] and "base_output" in records[0]


# ---------------------------------------------------------------------------------------------
# 4. Adapters and run folders are checked where they are used


def broken_adapter(world: World, tmp: Path, how: str) -> Path:
    folder = tmp / f"adapter-{how}"
    shutil.copytree(world.run, folder)
    if how == "nan":
        weights = folder / "adapter_model.safetensors"
        state = dict(mx.load(str(weights)))
        k = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
        state[k] = mx.full(state[k].shape, float("nan"))
        mx.save_safetensors(str(weights), state)
    elif how == "alpha":
        conf = json.loads((folder / "adapter_config.json").read_text())
        conf["lora_alpha"] = 1e308
        (folder / "adapter_config.json").write_text(json.dumps(conf))
    elif how == "alpha-untrained":  # B = 0 (as at step 0): the update is 0, but the scale overflows float32
        conf = json.loads((folder / "adapter_config.json").read_text())
        conf["lora_alpha"] = 1e308
        (folder / "adapter_config.json").write_text(json.dumps(conf))
        weights = folder / "adapter_model.safetensors"
        state = {k: (mx.zeros_like(v) if k.endswith("lora_B.weight") else v) for k, v in mx.load(str(weights)).items()}
        mx.save_safetensors(str(weights), state)
    elif how == "latest-folder":
        (folder / "checkpoints" / "latest").unlink()
        (folder / "checkpoints" / "latest").mkdir()
    return folder


ADAPTER_FAULTS = {
    "nan": ["NaN"],
    "alpha": ["lora_alpha", "scale 1.25e+307"],
    "alpha-untrained": ["lora_alpha", "scale 1.25e+307"],
    "latest-folder": ["checkpoints/latest is a folder"],
}


def _adapter_argv(command: str, w: World, adapter: Path, tmp: Path) -> list:
    return {
        "generate": ["generate", "--model", w.model, "--adapter", adapter, "--prompt", "hi", "--max-tokens", "2"],
        "eval": ["eval", "--model", w.model, "--adapter", adapter, "--data", w.chat_data],
        "eval --generate": [
            "eval",
            "--generate",
            "--model",
            w.model,
            "--adapter",
            adapter,
            "--data",
            w.chat_data,
            "--max-tokens",
            "2",
            "--out",
            tmp / "out.jsonl",
        ],
        "chat": ["chat", "--model", w.model, "--adapter", adapter, "--max-tokens", "2"],
        "serve": ["serve", "--model", w.model, "--adapter", f"a={adapter}", "--port", "0"],
        "fuse": ["fuse", "--model", w.model, "--adapter", adapter, "--out", tmp / "fused"],
        "export adapter": [
            "export",
            "adapter",
            "--model",
            w.model,
            "--adapter",
            adapter,
            "--format",
            "peft",
            "--out",
            tmp / "peft",
        ],
    }[command]


@pytest.mark.parametrize("how", sorted(ADAPTER_FAULTS))
@pytest.mark.parametrize("command", ["generate", "eval", "eval --generate", "chat", "serve", "fuse", "export adapter"])
def test_a_broken_adapter_is_refused_by_every_command(world, tmp_path, capsys, monkeypatch, command, how):
    adapter = broken_adapter(world, tmp_path, how)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    before = snapshot(tmp_path, world.model, world.run)
    code, out, err = run_main(capsys, [str(a) for a in _adapter_argv(command, world, adapter, tmp_path)])
    assert_one_error_message(code, out, err, [adapter, *ADAPTER_FAULTS[how]])
    assert diff(before, snapshot(tmp_path, world.model, world.run)) == []


@pytest.mark.parametrize("how", ["nan", "latest-folder"])
def test_resume_refuses_a_broken_run_before_writing(world, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    if how == "nan":  # the checkpoint it would resume from
        ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        weights = ckpt / "adapter_model.safetensors"
        state = dict(mx.load(str(weights)))
        k = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
        state[k] = mx.full(state[k].shape, float("inf"))
        mx.save_safetensors(str(weights), state)
    else:
        (run / "checkpoints" / "latest").unlink()
        (run / "checkpoints" / "latest").mkdir()
    before = snapshot(run)
    code, out, err = run_main(capsys, ["train", "--resume", str(run), "--iters", "4", "--quiet"])
    assert_one_error_message(code, out, err, [run / "checkpoints", "NaN" if how == "nan" else "latest"])
    assert diff(before, snapshot(run)) == []


def test_a_healthy_adapter_still_loads_everywhere(world, capsys):
    code, out, err = run_main(
        capsys,
        ["generate", "--model", str(world.model), "--adapter", str(world.run), "--prompt", "hi", "--max-tokens", "2"],
    )
    assert code == 0, err


def test_serve_answers_a_template_bomb_with_a_400_and_keeps_serving(world, tmp_path):
    """The server renders in worker threads: a request whose messages set off the model's own
    template gets a 400 naming the template's file, and the next request is answered."""
    import time
    import urllib.error
    import urllib.request

    import uvicorn

    from mlx_lora.commands import serve

    model = bomb_model(world, tmp_path, LATE_BOMB)
    engine = serve.build_server(str(model), {}, max_tokens=4)
    sock = serve.bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(serve.create_app(engine), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 120
        while not srv.started and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.started
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"

        def post(content: str):
            body = json.dumps(
                {"model": model.name, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
            ).encode()
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, body = post("boom")
        assert status == 400, body
        assert str(model / "tokenizer_config.json") in json.dumps(body) and "size limit" in json.dumps(body)
        status, body = post("hello")
        assert status == 200, body
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
        engine.close()
        sock.close()
