"""The scores of ``eval --generate`` on hand-made cases, ROUGE-L against the ``rouge-score``
package (reference), and pass@1's sandbox: passing, failing, timing-out, crashing and
network-using code."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from mlx_lora.inference import metrics as M
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.sandbox import containment, network_isolation, run_python


def test_exact_and_contains_normalize_case_and_whitespace():
    assert M.exact("  Shipping/Urgent\n", "shipping/urgent") == 1.0
    assert M.exact("tech   normal", "Tech normal") == 1.0
    assert M.exact("ＡＢＣ", "abc") == 1.0  # NFKC: full-width letters are the letters
    assert M.exact("shipping/urgent\nbecause", "shipping/urgent") == 0.0
    assert M.exact("shipping", "shipping/urgent") == 0.0
    assert M.contains("The answer is Shipping/Urgent, I think", "shipping/urgent") == 1.0
    assert M.contains("shipping", "shipping/urgent") == 0.0


def test_json_parses_fenced_output_and_compares_values():
    ref = {"name": "Ada", "tags": ["x", 1]}
    assert M.json_scores('{"tags": ["x", 1.0], "name": "Ada"}', ref) == {"json_valid": 1.0, "json_equal": 1.0}
    assert M.json_scores('Here:\n```json\n{"name": "Ada", "tags": ["x", 1]}\n```\n', ref)["json_equal"] == 1.0
    assert M.json_scores('{"name": "Ada"}', ref) == {"json_valid": 1.0, "json_equal": 0.0}
    assert M.json_scores("{'name': 'Ada'}", ref) == {"json_valid": 0.0, "json_equal": 0.0}
    assert M.json_scores('{"a": [1, 2', ref)["json_valid"] == 0.0


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat" (5 words):
    # precision 5/6, recall 5/6.
    assert M.rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # 2 of 4 output words, 2 of 2 reference words: P 1/2, R 1 -> F1 2/3
    assert M.rouge_l("a b c d", "b d") == pytest.approx(2 / 3)
    assert M.rouge_l("", "x") == 0.0 and M.rouge_l("x y", "z") == 0.0
    assert M.rouge_l("Ünïcode wörds count", "ünïcode wörds") == pytest.approx(0.8)
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook case (CLRS)


@pytest.mark.reference
def test_rouge_l_equals_the_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = "the a cat dog sat ran on under mat log quickly 42 x-ray it's".split()
    for _ in range(300):
        out = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25)))
        expected = scorer.score(ref, out)["rougeL"].fmeasure
        assert M.rouge_l(out, ref) == pytest.approx(expected, abs=1e-12), (out, ref)


def test_parse_metrics_takes_repeats_and_comma_lists():
    assert M.parse_metrics(["exact,rouge-l", "EXACT", " json "]) == ["exact", "rouge-l", "json"]
    with pytest.raises(MlxLoraError, match="unknown metric 'bleu'.*exact, contains, json, rouge-l, pass@1"):
        M.parse_metrics(["exact,bleu"])


def test_default_metric_follows_the_data():
    assert M.default_metric(["def f(x): ..."], [True])[0] == "pass@1"
    assert M.default_metric(['{"a": 1}', "[1, 2]"], [False, False])[0] == "json"
    assert M.default_metric(["billing/low", "tech/normal"], [False, False])[0] == "exact"
    long = "The committee met on Tuesday and agreed to fund the new library for three more years."
    assert M.default_metric([long, long], [False, False])[0] == "rouge-l"
    assert M.default_metric(["42", '{"a": 1}'], [True, False])[0] == "exact"  # tests on some rows only


def test_code_of_takes_the_first_fenced_block():
    assert M.code_of("Sure:\n```python\ndef f(x):\n    return 2 * x\n```\nDone.") == "def f(x):\n    return 2 * x\n"
    assert M.code_of("def f(x): return x") == "def f(x): return x"


# ---------------------------------------------------------------------------------------------
# pass@1


def test_pass_at_1_passes_fails_and_times_out():
    tests = "assert f(2) == 4\nassert f(-1) == -2"
    assert M.pass_at_1("```python\ndef f(x):\n    return 2 * x\n```", tests, 10) == (1.0, "passed")
    assert M.pass_at_1("def f(x):\n    return x + 2", tests, 10) == (0.0, "failed")
    assert M.pass_at_1("this is not python", tests, 10) == (0.0, "failed")
    assert M.pass_at_1("def f(x):\n    while True:\n        pass", tests, 1.5) == (0.0, "timeout")


def test_a_crash_or_a_child_left_running_is_a_fail_that_does_not_hang():
    assert M.pass_at_1("import os\nos.kill(os.getpid(), 9)", "", 10) == (0.0, "crashed")
    # A child holding the output open past the timeout: the whole group is killed.
    code = (
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "import time\ntime.sleep(600)"
    )
    t0 = time.perf_counter()
    assert M.pass_at_1(code, "", 1.0)[1] == "timeout"
    # Generous: only a call that waited for the 600 s child (the stuck case) is this slow.
    assert time.perf_counter() - t0 < 300


def test_code_runs_in_a_fresh_folder_with_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_python(
        "import os, json, resource\nprint(json.dumps([os.getcwd(), sorted(os.environ), os.listdir('.'), "
        "resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0]]))",
        timeout_s=5,
    )
    assert r.passed, r.output
    import json

    cwd, env, files, memory, cpu = json.loads(r.output)
    assert memory == 2 << 30 and cpu == 7
    assert "SECRET_TOKEN" not in env and "PYTHONPATH" not in env and "LD_PRELOAD" not in env
    if containment().contained:  # its own tmpfs, gone with its mount namespace (tests/test_sandbox.py)
        # Nothing of the host's /tmp shows, but the folders that lead to a Python installation kept
        # under /tmp (a checkout there), which is bound read-only at its own path.
        import sys
        from pathlib import PurePosixPath

        leads = {
            PurePosixPath(p).parts[2]
            for p in (sys.prefix, sys.base_prefix, sys.executable)
            if PurePosixPath(p).is_relative_to("/tmp") and len(PurePosixPath(p).parts) > 2
        }
        assert cwd == "/tmp" and set(files) == {"main.py"} | leads, files
    else:
        assert files == ["main.py", "output.txt"] and "mlx-lora-sandbox-" in cwd
        from pathlib import Path

        assert not Path(cwd).exists()  # removed afterwards


def test_code_cannot_reach_the_network():
    hits = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(server.accept())
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        tests = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.sendall(b'leak')"
        assert M.pass_at_1("", tests, 10) == (0.0, "failed")
        # The socket module's own class, reached around the prelude: only the namespace stops it.
        raw = (
            f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(3)\n"
            f"s.connect(('127.0.0.1', {port}))"
        )
        result = run_python(raw, timeout_s=10)
        if network_isolation() is not None or containment().contained:
            assert not result.passed, result.output
    finally:
        stop.set()
        t.join(120)  # the accept loop sees stop within its 0.2 s socket timeout
        server.close()
    if network_isolation() is not None or containment().contained:
        assert hits == []
