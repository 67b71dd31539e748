"""``mlx-lora eval --generate``: prompts and references from every training format, batched
generation (greedy equals mlx-lm one prompt at a time; sampling is seeded), ``--compare`` on a
tiny model taught a known answer set (the adapter answers exactly, the base does not), the
per-example file, and bad inputs refused in one line with nothing changed."""

from __future__ import annotations

import json

import pytest
from cli_harness import assert_refused, cli_env, diff, run_main, snapshot, write
from cli_harness import rows as jsonl

import mlx_lora
from mlx_lora.config import build
from mlx_lora.data.templates import alpaca_prompt
from mlx_lora.inference import evaluation
from mlx_lora.testing import make_tiny_dataset

_env = pytest.fixture(scope="module")(cli_env)


@pytest.fixture(scope="module")
def memo_model(tiny_model_dir):
    # init_std 0.2 gives the random lm_head enough range to express a confident answer
    return tiny_model_dir("llama", init_std=0.2)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """8 question -> code word rows (chat), e.g. "What is the code word for the red apple?" -> "zebra-17"."""
    return make_tiny_dataset(tmp_path_factory.mktemp("qa") / "qa.jsonl", "chat", n=8, seed=0)


@pytest.fixture(scope="module")
def taught(memo_model, qa, tmp_path_factory, _env):
    """A LoRA adapter trained until it answers the 8 questions exactly."""
    run = tmp_path_factory.mktemp("runs") / "run"
    sets = {
        "train.iters": 80,
        "train.lr": 3e-3,
        "train.batch_size": 8,
        "lora.r": 16,
        "train.warmup_steps": 10,
        "train.log_every": 10,
        "train.save_every": 1000,
        "train.eval_every": 1000,
    }
    cfg = build(
        extra={"model": {"path": str(memo_model)}, "data": {"path": str(qa), "valid_fraction": 0.0}, "out": str(run)},
        overrides=[f"{k}={v}" for k, v in sets.items()],
    )
    mlx_lora.train(cfg, progress=False)
    return run


# ---------------------------------------------------------------------------------------------
# rows -> prompts and references


def test_prompts_and_references_of_every_format(tiny_llama, tmp_path):
    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.data.templates import resolve_chat_template

    _, tok, _ = load_for_inference(str(tiny_llama))
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    cases = [
        ({"messages": conv}, "6", "messages[4].content"),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            "hello",
            "conversations[1].value",
        ),
        ({"prompt": "Capital of France:", "completion": " Paris"}, " Paris", "completion"),
        ({"instruction": "Translate", "input": "chat", "output": "cat"}, "cat", "output"),
    ]
    template = resolve_chat_template("chatml", tok)
    for row, ref, where in cases:
        path = write(tmp_path / f"{where.split('[')[0]}.jsonl", jsonl(row, row))
        data = evaluation.load_eval_set(path, tok, chat_template="chatml")
        r = data.rows[1]
        assert (r.line, r.reference, r.reference_field) == (2, ref, where)
        if "messages" in row:  # everything before the last assistant turn, and the generation prompt
            assert r.prompt == template.render(conv[:4], add_generation_prompt=True)
            assert r.prompt.endswith("<|im_start|>assistant\n") and "2+2?" in r.prompt and "\n4<" in r.prompt
        elif "conversations" in row:
            assert r.prompt == template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        elif "prompt" in row:
            assert r.prompt == "Capital of France:"
        else:
            assert r.prompt == alpaca_prompt("Translate", "chat")
        ids = tok.encode(r.prompt, add_special_tokens=True)
        assert r.tokens == list(ids)  # what training sees: BOS where the tokenizer adds one
    assert evaluation.load_eval_set(path, tok, limit=1).rows[0].line == 1


# ---------------------------------------------------------------------------------------------
# generation


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny_llama):
    from mlx_lm.generate import stream_generate

    from mlx_lora.commands.api import load_for_inference

    model, tok, _ = load_for_inference(str(tiny_llama))
    texts = ["What is the code word for the red apple?", "Hi", "The quick brown fox jumps over the lazy dog again"]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3  # different lengths exercise the left padding
    eos = evaluation.eos_ids(tok)
    batched = evaluation.generate_tokens(model, prompts, 6, eos, batch_size=8)
    # mlx-lm's own generation, one prompt at a time (greedy is its default sampler)
    alone = [[r.token for r in stream_generate(model, tok, p, max_tokens=6) if r.token not in eos] for p in prompts]
    assert batched == alone
    assert evaluation.generate_tokens(model, prompts, 6, eos, batch_size=2) == alone
    assert evaluation.generate(model, tok, prompts[:1], 6) == [tok.decode(alone[0])]


def test_sampling_is_seeded_and_top_p_narrows_it(tiny_llama):
    from mlx_lora.commands.api import load_for_inference

    model, tok, _ = load_for_inference(str(tiny_llama))
    prompts = [tok.encode(t) for t in ("Hello there", "What is the code word?", "a b c d e f")]
    greedy = evaluation.generate(model, tok, prompts, 8)
    hot = evaluation.generate(model, tok, prompts, 8, temperature=2.0, seed=3)
    assert hot == evaluation.generate(model, tok, prompts, 8, temperature=2.0, seed=3)
    assert hot != greedy  # a random model's flat distribution at temperature 2
    assert hot != evaluation.generate(model, tok, prompts, 8, temperature=2.0, seed=4)
    # top-p that keeps only the most likely token is greedy, whatever the temperature
    assert evaluation.generate(model, tok, prompts, 8, temperature=2.0, top_p=1e-6, seed=3) == greedy


# ---------------------------------------------------------------------------------------------
# --compare on a known answer set


def test_compare_scores_the_adapter_above_the_base(memo_model, qa, taught, tmp_path, capsys, _env):
    out = tmp_path / "outputs.jsonl"
    argv = [
        "eval",
        "--generate",
        "--compare",
        "--model",
        str(memo_model),
        "--adapter",
        str(taught),
        "--data",
        str(qa),
        "--max-tokens",
        "12",
        "--metric",
        "exact,contains",
        "--metric",
        "rouge-l",
        "--batch-size",
        "3",
        "--out",
        str(out),
    ]
    code, stdout, err = run_main(capsys, argv)
    assert code == 0, err
    head, *lines = stdout.splitlines()
    assert head.split() == ["metric", "base", "adapter", "delta"]
    table = {l.split()[0]: l.split()[1:] for l in lines[:3]}
    assert table["exact"] == ["0.0%", "100.0%", "+100.0"], stdout
    assert "generate  greedy, at most 12 new tokens, batches of 3" in err

    records = [json.loads(l) for l in out.read_text().splitlines()]
    rows = [json.loads(l) for l in qa.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 9))
    for rec, row in zip(records, rows):
        answer = row["messages"][-1]["content"]
        assert rec["reference"] == answer and rec["adapter_output"].strip() == answer
        assert row["messages"][0]["content"] in rec["prompt"]
        assert rec["scores"]["adapter"] == {"exact": 1.0, "contains": 1.0, "rouge-l": 1.0}
        assert rec["scores"]["base"]["exact"] == 0.0 and rec["base_output"].strip() != answer

    # --json: the summary; an existing --out file is replaced only with --overwrite
    before = snapshot(out)
    assert_refused(capsys, argv + ["--json"], ["--out file", str(out), "already exists", "--overwrite"], [out])
    code, stdout, err = run_main(capsys, argv + ["--json", "--overwrite", "--limit", "2"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rows"] == 2 and summary["scores"]["adapter"]["exact"] == 1.0
    assert summary["scores"]["base"]["exact"] == 0.0 and summary["delta"]["exact"] == 1.0
    assert diff(before, snapshot(out)) and len(out.read_text().splitlines()) == 2

    # the adapter alone, metric chosen from the data
    code, stdout, err = run_main(
        capsys,
        [
            "eval",
            "--generate",
            "--model",
            str(memo_model),
            "--adapter",
            str(taught),
            "--data",
            str(qa),
            "--max-tokens",
            "12",
        ],
    )
    assert code == 0, err
    assert "metric    exact (chosen from the data: short references" in err
    assert stdout.splitlines()[0].split() == ["metric", "adapter"] and "100.0%" in stdout


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_are_refused_in_one_line(tiny_llama, tmp_path, capsys, _env):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    files = {
        "text": jsonl({"text": "just text"}),
        "badjson": jsonl(good, '{"messages": [', good),
        "noanswer": jsonl(good, {"messages": [{"role": "user", "content": "q"}]}),
        "notests": jsonl(
            {"prompt": "def f", "completion": "x", "tests": "assert f(1)"}, {"prompt": "p", "completion": "c"}
        ),
        "badtests": jsonl({"prompt": "def f", "completion": "x", "tests": ["assert f(1)"]}),
        "notjson": jsonl({"prompt": "p", "completion": '{"a": 1}'}, {"prompt": "p", "completion": "not json"}),
        "good": jsonl(good),
    }
    paths = {k: write(tmp_path / f"{k}.jsonl", v) for k, v in files.items()}
    taken = write(tmp_path / "taken.jsonl", "my notes\n")
    m = ["eval", "--generate", "--model", str(tiny_llama), "--max-tokens", "2"]
    cases = [
        (["--data", paths["text"]], [str(paths["text"]), "text rows have no reference"]),
        (["--data", paths["badjson"]], [f"{paths['badjson']}:2", "invalid JSON"]),
        (["--data", paths["noanswer"]], [f"{paths['noanswer']}:2", "field 'messages'", "no assistant turn"]),
        (["--data", paths["notests"], "--metric", "pass@1"], [f"{paths['notests']}:2", "field 'tests'"]),
        (["--data", paths["badtests"]], [f"{paths['badtests']}:1", "field 'tests'", "got a list"]),
        (["--data", paths["notjson"], "--metric", "json"], [f"{paths['notjson']}:2", "field 'completion'", "not JSON"]),
        (["--data", paths["good"], "--metric", "bleu"], ["unknown metric 'bleu'"]),
        (["--data", paths["good"], "--compare"], ["--compare", "--adapter"]),
        (["--data", paths["good"], "--out", taken], ["--out file", str(taken), "already exists"]),
        (["--data", paths["good"], "--out", taken, "--overwrite"], [str(taken), "not an output of mlx-lora eval"]),
        (["--data", paths["good"], "--top-p", "0"], ["--top-p must be in (0, 1]"]),
        (["--data", paths["good"], "--limit", "0"], ["--limit must be >= 1"]),
        (["--data", str(tmp_path / "missing.jsonl")], [str(tmp_path / "missing.jsonl"), "no such file"]),
    ]
    for extra, fragments in cases:
        assert_refused(capsys, m + [str(a) for a in extra], fragments, [tmp_path])
    # An adapter that cannot be read fails before the base model answers anything
    not_adapter = tmp_path / "not-an-adapter"
    not_adapter.mkdir()
    assert_refused(
        capsys,
        m + ["--data", str(paths["good"]), "--compare", "--adapter", str(not_adapter)],
        [str(not_adapter), "not an adapter folder"],
        [tmp_path],
    )
    # Options of --generate without it
    assert_refused(
        capsys,
        ["eval", "--model", str(tiny_llama), "--data", str(paths["good"]), "--metric", "exact"],
        ["--metric needs --generate"],
        [tmp_path],
    )


def test_pass_at_1_rows_through_eval_generate(tiny_llama, tmp_path, monkeypatch, _env):
    """Code rows scored end to end with canned answers (a random model writes no code): a
    passing, a failing, a hanging and a network-using answer; only the first passes."""
    rows = [{"prompt": f"Write f{i}.", "completion": "...", "tests": f"assert f{i}(2) == 4"} for i in range(4)]
    data = write(tmp_path / "code.jsonl", jsonl(*rows))
    answers = [
        "```python\ndef f0(x):\n    return 2 * x\n```",
        "def f1(x):\n    return x + 3",
        "def f2(x):\n    while True:\n        pass",
        "import urllib.request\ndef f3(x):\n    urllib.request.urlopen('http://example.com', timeout=2)\n    return 4",
    ]
    monkeypatch.setattr(evaluation, "generate", lambda model, tok, prompts, max_tokens, **kw: answers[: len(prompts)])
    out = tmp_path / "code-outputs.jsonl"
    summary = mlx_lora.evaluate_generate(str(tiny_llama), str(data), timeout_s=10.0, out=str(out), log=None)
    assert summary["metrics"] == ["pass@1"] and "tests" in summary["metric_reason"]
    assert summary["scores"] == {"base": {"pass@1": 0.25}}
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["sandbox"]["base"] for r in records] == ["passed", "failed", "timeout", "failed"]
    assert [r["scores"]["base"]["pass@1"] for r in records] == [1.0, 0.0, 0.0, 0.0]
