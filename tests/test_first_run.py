"""A new user's first hour, each entry point driven as a user runs it: which BLAS MLX really uses
(every entry point runs fast or says how), an interrupted pipeline that stops, progress during
long silent stretches, hints that say what happened, and commands that take a run folder alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_harness import fresh_env

from mlx_lora.commands.recipes import demo_data
from mlx_lora.plumbing import backend

REPO = Path(__file__).resolve().parent.parent
OPENBLAS = backend.find_openblas()
CHOSEN = backend.fast_blas()  # what a fresh mlx-lora process preloads here: (kind, library, env) or None
LABEL = backend.BLAS_LABELS


def _python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------
# BLAS: what MLX itself calls, not whatever BLAS file happens to be mapped


def test_blas_is_the_one_mlx_calls_not_numpys_bundled_openblas(tmp_path):
    # numpy first, as a script does: its own OpenBLAS is mapped, yet MLX still calls its reference BLAS.
    code = (
        "import numpy; numpy.ones((4, 4)) @ numpy.ones((4, 4))\n"
        "import mlx.core as mx\nmx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))\n"
        "from mlx_lora.plumbing import backend\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(repr(backend.loaded_blas())); print('openblas' in maps.lower())"
    )
    r = _python(code, fresh_env(), tmp_path)
    assert r.returncode == 0, r.stderr
    shown, numpy_openblas_mapped = r.stdout.splitlines()
    assert "reference BLAS bundled with mlx-cpu" in shown and "OpenBLAS" not in shown, shown
    assert numpy_openblas_mapped == "True"  # the very thing that fooled a file-name match
    if OPENBLAS:
        r = _python(code, fresh_env(LD_PRELOAD=OPENBLAS), tmp_path)
        assert r.returncode == 0, r.stderr
        assert "OpenBLAS" in r.stdout.splitlines()[0] and "reference" not in r.stdout, r.stdout


def test_every_entry_point_runs_fast_or_says_how(tiny_llama, tmp_path):
    env = fresh_env()
    # The CLI and `python -m mlx_lora`: re-executed with the fastest BLAS installed.
    for argv in (
        ["-m", "mlx_lora", "doctor", "--json"],
        ["-c", "from mlx_lora.commands.cli import main; main()", "doctor", "--json"],
    ):
        r = subprocess.run([sys.executable, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        facts = json.loads(r.stdout)
        if CHOSEN:
            assert facts["blas"].startswith(LABEL[CHOSEN[0]]) and "blas_hint" not in facts, facts
        else:
            assert "install" in facts["blas_hint"]
    # A script (a recipe's way): one call before MLX loads, then MLX calls that BLAS.
    script = tmp_path / "job.py"
    script.write_text(
        "from mlx_lora.plumbing.backend import reexec_with_fast_blas\nreexec_with_fast_blas()\n"
        "import sys\nimport mlx.core as mx\nfrom mlx_lora import backend\n"
        "print(backend.loaded_blas()); print(sys.argv[1:])\n"
    )
    r = subprocess.run(
        [sys.executable, str(script), "a b", "--flag"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    blas, args = r.stdout.splitlines()
    assert args == "['a b', '--flag']"  # started again with the same arguments
    assert blas.startswith(LABEL[CHOSEN[0]]) if CHOSEN else "reference" in blas
    # The Python API without that call: one line that says how.
    r = _python(f"import mlx_lora\nmlx_lora.generate({str(tiny_llama)!r}, 'hi', max_tokens=1)", env, tmp_path)
    assert r.returncode == 0, r.stderr
    hints = [line for line in r.stderr.splitlines() if "slow BLAS" in line]
    assert len(hints) == 1, r.stderr
    assert (
        (f"LD_PRELOAD={CHOSEN[1]}" in hints[0] and "reexec_with_fast_blas()" in hints[0])
        if CHOSEN
        else "install" in hints[0]
    )


@pytest.mark.skipif(CHOSEN is None, reason="the fast path needs a system OpenBLAS or MKL on this machine")
def test_the_recipe_script_trains_on_the_fast_blas(tiny_llama, tmp_path):
    out = tmp_path / "pipe"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "train_fuse_export.py"),
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("chat")),
            "--name",
            "tiny-bot",
            "--out",
            str(out),
            "--iters",
            "1",
            "--no-create",
            "--set",
            "train.batch_size=2",
            "--set",
            "data.cache=false",
        ],
        env=fresh_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    blas = [line for line in r.stderr.splitlines() if line.startswith("blas ")]
    assert blas and LABEL[CHOSEN[0]] in blas[0] and "reference" not in r.stderr, r.stderr


def test_the_blas_chosen_mkl_on_intel_else_openblas_and_mlx_lora_blas_overrides(monkeypatch, tmp_path):
    mkl, openblas = tmp_path / "libmkl_rt.so.3", tmp_path / "libopenblas.so.0"
    mkl.write_bytes(b""), openblas.write_bytes(b"")
    monkeypatch.setenv("MLX_LORA_MKL", str(mkl))
    monkeypatch.setenv("MLX_LORA_OPENBLAS", str(openblas))
    monkeypatch.delenv("MLX_LORA_BLAS", raising=False)
    monkeypatch.delenv("MKL_THREADING_LAYER", raising=False)
    monkeypatch.setattr(backend, "_intel_cpu", lambda: True)
    kind, lib, env = backend.fast_blas()
    assert (kind, lib) == ("mkl", str(mkl)) and env["MKL_THREADING_LAYER"] in ("GNU", "INTEL")
    monkeypatch.setenv("MKL_THREADING_LAYER", "SEQUENTIAL")  # the user's own setting is kept
    assert backend.fast_blas()[2] == {"MKL_THREADING_LAYER": "SEQUENTIAL"}
    monkeypatch.setattr(backend, "_intel_cpu", lambda: False)  # MKL is Intel's: elsewhere only when asked
    assert backend.fast_blas()[:2] == ("openblas", str(openblas))
    monkeypatch.setenv("MLX_LORA_BLAS", "mkl")
    assert backend.fast_blas()[:2] == ("mkl", str(mkl))
    monkeypatch.setattr(backend, "_intel_cpu", lambda: True)
    monkeypatch.setenv("MLX_LORA_BLAS", "openblas")
    assert backend.fast_blas()[:2] == ("openblas", str(openblas))
    monkeypatch.setenv("MLX_LORA_BLAS", "off")
    assert backend.fast_blas() is None
    monkeypatch.setenv("MLX_LORA_BLAS", "auto")
    monkeypatch.setenv("MLX_LORA_MKL", str(tmp_path / "gone.so"))  # not installed: OpenBLAS
    assert backend.fast_blas()[:2] == ("openblas", str(openblas))


def test_an_unknown_mlx_lora_blas_is_named_once_and_read_as_auto(monkeypatch, caplog):
    monkeypatch.setenv("MLX_LORA_BLAS", "atlas")
    monkeypatch.setattr(backend, "_warned_blas_choice", False)
    with caplog.at_level("WARNING", logger=backend.__name__):
        assert backend.blas_choice() == "auto" and backend.blas_choice() == "auto"
    warned = [r.getMessage() for r in caplog.records if "MLX_LORA_BLAS" in r.getMessage()]
    assert len(warned) == 1 and "atlas" in warned[0] and "openblas" in warned[0], warned


@pytest.mark.skipif(backend.find_mkl() is None, reason="MKL is not installed here (`pip install mkl`, x86-64 Linux)")
def test_the_cli_runs_on_mkl_or_openblas_as_chosen_and_both_compute_the_same(tmp_path):
    # The same tiny product on each BLAS a user can pick; MLX really calls the one named.
    code = (
        "from mlx_lora.plumbing.backend import reexec_with_fast_blas\nreexec_with_fast_blas()\n"
        "import mlx.core as mx\nfrom mlx_lora.plumbing import backend\n"
        "mx.random.seed(0); a = mx.random.normal((64, 96)); b = mx.random.normal((96, 32))\n"
        "print(backend.loaded_blas()); print((a @ b).sum().item())\n"
    )
    seen = {}
    for choice in ("mkl", "openblas") if OPENBLAS else ("mkl",):
        r = _python(code, fresh_env(MLX_LORA_BLAS=choice), tmp_path)
        assert r.returncode == 0, r.stderr
        shown, total = r.stdout.splitlines()
        assert shown.startswith(LABEL[choice]), shown
        seen[choice] = float(total)
    assert all(abs(v - seen["mkl"]) <= 1e-4 * abs(seen["mkl"]) + 1e-3 for v in seen.values()), seen


# ---------------------------------------------------------------------------------------------
# an interrupted pipeline stops after saving, says so, and exits non-zero


def _ctrl_c_able():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # whatever the test runner inherited


def test_ctrl_c_during_training_stops_the_pipeline_before_fuse_and_export(tiny_llama, tmp_path):
    out = tmp_path / "pipe"
    env = fresh_env(MLX_LORA_NO_BLAS_REEXEC="1")
    if OPENBLAS:
        env["LD_PRELOAD"] = OPENBLAS
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "recipes" / "train_fuse_export.py"),
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("chat")),
            "--name",
            "tiny-bot",
            "--out",
            str(out),
            "--iters",
            "100000",
            "--no-create",
            "--set",
            "train.batch_size=2",
            "--set",
            "data.cache=false",
            "--set",
            "train.log_every=1",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_able,
    )
    try:
        metrics = out / "run" / "metrics.jsonl"
        end = time.monotonic() + 600  # only a stuck run reaches this
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "training never logged a step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "stopped: training was interrupted at step" in err and "--resume" in err, err
    assert "== fuse" not in err and not (out / "fused").exists() and not (out / "ollama").exists()
    assert list((out / "run" / "checkpoints").glob("*/adapter_model.safetensors")), "nothing was saved"


def test_the_api_says_a_run_was_interrupted(tiny_llama, tmp_path):
    import mlx_lora
    from mlx_lora import config

    cfg = config.build(
        None,
        [
            f"model.path={tiny_llama}",
            f"data.path={demo_data('chat')}",
            f"out={tmp_path / 'r'}",
            "train.iters=50",
            "train.batch_size=2",
            "data.cache=false",
            "train.log_every=1",
        ],
    )

    class StopAtStep2:  # Ctrl-C, as the trainer meets it, after the second step
        def on_step(self, trainer, m):
            if m["step"] == 2:
                raise KeyboardInterrupt

    result = mlx_lora.train(cfg, callbacks=[StopAtStep2()], progress=False)
    assert result.interrupted and result.stopped == "interrupted" and result.steps == 2


# ---------------------------------------------------------------------------------------------
# no silent stretch: evaluation, reference log-probs, generation for every row, validation


@pytest.fixture
def shown_at_once(monkeypatch):
    """Progress from the first moment (the default waits ~2 s, which tiny models never take)."""
    monkeypatch.setenv("MLX_LORA_PROGRESS_DELAY", "0")
    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    monkeypatch.delenv("MLX_LORA_PROGRESS", raising=False)


def test_eval_and_eval_generate_show_progress_in_a_pipe(tiny_llama, capsys, shown_at_once):
    from cli_harness import run_main

    code, out, err = run_main(
        capsys, ["eval", "--model", str(tiny_llama), "--data", str(demo_data("chat")), "--batch-size", "4"]
    )
    assert code == 0, err
    lines = [l for l in err.splitlines() if l.startswith("eval: ")]
    assert lines and lines[-1].startswith("eval: 8/8 batches"), err  # 32 rows, 4 a batch
    code, out, err = run_main(
        capsys,
        [
            "eval",
            "--generate",
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("chat")),
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--max-tokens",
            "2",
        ],
    )
    assert code == 0, err
    rows = [l for l in err.splitlines() if l.startswith("base: ")]
    assert rows and rows[-1].startswith("base: 6/6 rows"), err
    assert err.index("base: ") < err.index("base      6 rows in")  # while it works, not after


def test_dpo_shows_its_reference_pass_and_first_step_and_validation(tiny_llama, tmp_path, capsys, shown_at_once):
    from cli_harness import run_main

    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("preference")),
            "--out",
            str(tmp_path / "dpo"),
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--set",
            "train.method=dpo",
            "--set",
            "train.dpo_precompute_ref=true",
            "--set",
            "train.eval_every=2",
            "--set",
            "data.cache=false",
        ],
    )
    assert code == 0, err
    ref = err.index("reference log-probs (adapter off): ")
    first = err.index("training: compiling and running step 1 of 2")
    val = err.index("validation: ")
    assert ref < first < err.index("step 2/2") < val < err.index("step 2: val loss"), err


def test_a_quiet_stretch_and_a_quiet_command_show_nothing(tiny_llama, tmp_path, capsys, monkeypatch):
    from cli_harness import run_main

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    monkeypatch.setenv("MLX_LORA_PROGRESS_DELAY", "3600")  # nothing here lasts an hour
    code, out, err = run_main(capsys, ["eval", "--model", str(tiny_llama), "--data", str(demo_data("chat"))])
    assert code == 0 and "eval: " not in err, err
    monkeypatch.setenv("MLX_LORA_PROGRESS_DELAY", "0")
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("chat")),
            "--out",
            str(tmp_path / "q"),
            "--iters",
            "2",
            "--quiet",
            "--set",
            "train.eval_every=2",
            "--set",
            "data.cache=false",
        ],
    )
    assert code == 0 and "validation: " not in err and "compiling" not in err, err


def test_eval_shows_a_bar_on_a_terminal(tiny_llama, tmp_path):
    code, shown = _run_in_terminal(
        ["eval", "--model", str(tiny_llama), "--data", str(demo_data("chat"))], tmp_path, MLX_LORA_PROGRESS_DELAY="0"
    )
    assert code == 0, shown
    assert "eval:" in shown and "8/8" in shown and "|" in shown, shown  # tqdm's bar, drawn in place
    assert "eval: 8/8 batches (" not in shown  # not the plain lines of a pipe


def test_a_bar_shows_its_end_however_fast_the_last_units_come(monkeypatch):
    # tqdm skips redraws closer together than its mininterval (0.1 s): a stretch whose last units
    # came quickly used to leave its bar at some earlier count, and the terminal test above saw
    # "7/8" or "8/8" depending on the machine's speed.
    import io

    from mlx_lora.plumbing.progress import Ticker

    monkeypatch.setenv("MLX_LORA_PROGRESS_DELAY", "0")
    stream = io.StringIO()
    ticker = Ticker(50, "work", stream=stream, show=True)
    for _ in range(50):
        ticker.update()
    ticker.close()
    assert "50/50" in stream.getvalue(), stream.getvalue()


# ---------------------------------------------------------------------------------------------
# eval of a base model: the chunked loss, no note about trainable parameters


def test_eval_of_a_base_model_uses_the_chunked_loss_quietly(tiny_llama, capsys, monkeypatch):
    import math

    from cli_harness import run_main

    import mlx_lora
    from mlx_lora.config import TrainConfig
    from mlx_lora.training import losses

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    data = str(demo_data("chat"))
    code, out, err = run_main(capsys, ["eval", "--model", str(tiny_llama), "--data", data, "--json"])
    assert code == 0, err
    assert "chunked loss unavailable" not in err and "trainable" not in err, err
    # The chunked loss is the plain one, to float rounding.
    chunked = json.loads(out)["loss"]
    assert TrainConfig().loss_chunk_tokens, "the default config no longer chunks the loss"
    real = losses.make_loss
    monkeypatch.setattr(losses, "make_loss", lambda model, chunk, **kw: real(model, None, **kw))
    plain = mlx_lora.evaluate(str(tiny_llama), data)["loss"]
    assert math.isclose(chunked, plain, rel_tol=1e-4), (chunked, plain)
    code, out, err = run_main(capsys, ["eval", "--model", str(tiny_llama), "--data", str(demo_data("preference"))])
    assert code == 0 and "chunked loss unavailable" not in err, err


# ---------------------------------------------------------------------------------------------
# a warmup as long as the run


@pytest.mark.parametrize(
    "warmup,iters,warned", [(8, 3, True), (25, 10, True), (3, 3, True), (2, 3, False), (0, 3, False)]
)
def test_a_warmup_as_long_as_the_run_is_warned_about(tiny_llama, tmp_path, capsys, monkeypatch, warmup, iters, warned):
    from cli_harness import run_main

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    argv = [
        "train",
        "--model",
        str(tiny_llama),
        "--data",
        str(demo_data("chat")),
        "--out",
        str(tmp_path / "w"),
        "--iters",
        str(iters),
        "--batch-size",
        "2",
        "--set",
        f"train.warmup_steps={warmup}",
        "--set",
        "data.cache=false",
        "--set",
        "data.valid_fraction=0",
    ]
    code, out, err = run_main(capsys, argv + ["--dry-run"])
    assert code == 0, err
    dry = [l for l in (out + err).splitlines() if "warmup_steps" in l]
    code, out, err = run_main(capsys, argv + ["--quiet"])
    assert code == 0, err
    trained = [l for l in err.splitlines() if "warmup_steps" in l]
    if not warned:
        assert dry == [] and trained == [], (dry, trained)
        return
    assert len(trained) == 1 and trained[0].startswith("WARNING: train.warmup_steps"), err
    assert f"{warmup} >= the run's {iters} steps" in trained[0] and "never" not in trained[0]
    assert len(dry) == 1 and f"{warmup} >= the run's {iters} steps" in dry[0], dry


# ---------------------------------------------------------------------------------------------
# generate on a chat-tuned model: the template, said in one line; --raw opts out


def test_generate_applies_the_chat_template_to_a_plain_prompt_and_says_so(tiny_llama, capsys, monkeypatch):
    from cli_harness import run_main

    import mlx_lora

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    question = "What is the code word for the red apple?"
    base = ["generate", "--model", str(tiny_llama), "--max-tokens", "6"]
    code, out, err = run_main(capsys, base + ["--prompt", question])
    assert code == 0, err
    assert [l for l in err.splitlines() if "chat template applied" in l and "--raw" in l], err
    assert out == mlx_lora.generate(str(tiny_llama), question, chat=True, max_tokens=6) + "\n"
    code, out, err = run_main(capsys, base + ["--prompt", question, "--raw"])
    assert code == 0 and "chat template" not in err, err
    assert out == mlx_lora.generate(str(tiny_llama), question, chat=False, max_tokens=6) + "\n"
    # A prompt already in the template's own markup is continued as it is.
    templated = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    code, out, err = run_main(capsys, base + ["--prompt", templated])
    assert code == 0 and "chat template" not in err, err
    assert out == mlx_lora.generate(str(tiny_llama), templated, chat=False, max_tokens=6) + "\n"


def test_generate_says_what_happened_when_the_answer_is_empty(tiny_llama, capsys, monkeypatch):
    from cli_harness import run_main

    from mlx_lora.inference import generation

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    monkeypatch.setattr(generation, "stream", lambda *a, **k: iter(["\n"]))  # an end of turn at once
    for extra, how in (
        (["--raw"], "as raw text; a chat-tuned model usually wants --chat"),
        ([], "with the chat template applied"),
    ):
        code, out, err = run_main(capsys, ["generate", "--model", str(tiny_llama), "--prompt", "Hi", *extra])
        assert code == 0, err
        assert [l for l in err.splitlines() if l.startswith("the model answered with no text") and how in l], err


# ---------------------------------------------------------------------------------------------
# recipes list fits the terminal


@pytest.mark.parametrize("columns", [80, 120])
def test_recipes_list_fits_the_terminal_and_keeps_scripts_apart(tmp_path, columns):
    code, shown = _run_in_terminal(["recipes", "list"], tmp_path, columns=columns)
    lines = shown.splitlines()
    assert code == 0, lines
    assert max(len(l) for l in lines) <= columns, [l for l in lines if len(l) > columns]
    from mlx_lora.commands.recipes import list_recipes

    recipes = list_recipes()
    assert lines[0].split() == ["recipe", "model", "memory", "fits"] and "script" in lines
    split = lines.index("script")
    for r in recipes:
        at = next(i for i, l in enumerate(lines) if l.startswith(r.name + " "))
        assert (at < split) == (r.kind == "config"), r.name
        if r.kind == "config":
            assert r.get("model") in lines[at]  # model ids stay whole: they are pasted into commands


# ---------------------------------------------------------------------------------------------
# a run folder is enough: it names its base model and fixes sequence length, template, masking


@pytest.fixture(scope="module")
def short_run(tiny_llama, tmp_path_factory):
    """A run trained with a short sequence length, loss on every token, the built-in ChatML template."""
    import io

    import mlx_lora
    from mlx_lora import config

    out = tmp_path_factory.mktemp("runs") / "support" / "run"
    cfg = config.build(
        None,
        [
            f"model.path={tiny_llama}",
            f"data.path={demo_data('chat')}",
            f"out={out}",
            "train.iters=2",
            "train.batch_size=2",
            "train.save_every=2",
            "data.cache=false",
            "data.max_seq_length=128",
            "data.train_on=all",
            "data.chat_template=chatml",
            "data.valid_fraction=0",
        ],
    )
    mlx_lora.train(cfg, progress=False, stream=io.StringIO())
    return out


def test_generate_and_eval_take_a_run_folder_alone(tiny_llama, short_run, capsys, monkeypatch):
    from cli_harness import run_main

    import mlx_lora

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    code, out, err = run_main(capsys, ["generate", str(short_run), "--prompt", "Hello", "--max-tokens", "4"])
    assert code == 0, err
    assert out == mlx_lora.generate(str(tiny_llama), "Hello", adapter=str(short_run), chat=True, max_tokens=4) + "\n"
    # --model may also be the run folder; and a checkpoint of the run is read with the run's config.
    ckpt = next((short_run / "checkpoints").glob("step-*"))
    data = str(demo_data("chat"))
    results = {}
    for name, argv in {
        "run": [str(short_run)],
        "as --model": ["--model", str(short_run)],
        "checkpoint": [str(ckpt)],
        "flags": [
            "--model",
            str(tiny_llama),
            "--adapter",
            str(short_run),
            "--max-seq-length",
            "128",
            "--train-on",
            "all",
            "--chat-template",
            "chatml",
        ],
        "longer": [str(short_run), "--max-seq-length", "2048"],
        "assistant only": [str(short_run), "--max-seq-length", "2048", "--train-on", "assistant"],
    }.items():
        code, out, err = run_main(capsys, ["eval", *argv, "--data", data, "--json"])
        assert code == 0, (name, err)
        results[name] = json.loads(out)
    same = {k: (v["loss"], v["tokens"]) for k, v in results.items()}
    assert same["run"] == same["as --model"] == same["flags"], same  # the run's 128 tokens, all of them, ChatML
    assert same["checkpoint"][1] == same["run"][1]
    assert same["longer"][1] > same["run"][1] and same["longer"][1] > same["assistant only"][1], same  # flags win


def test_no_model_and_no_run_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from cli_harness import assert_one_error_message, run_main

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    for argv in (["generate", "--prompt", "hi"], ["eval", "--data", str(demo_data("chat"))], ["chat"]):
        code, out, err = run_main(capsys, argv)
        assert_one_error_message(code, out, err, ["no model given", "--model", "run folder"])
    bare = tmp_path / "adapter"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    code, out, err = run_main(capsys, ["generate", str(bare), "--prompt", "hi"])
    assert_one_error_message(code, out, err, [str(bare), "does not record its base model", "--model"])


def _run_in_terminal(
    argv: list[str], cwd: Path, keys: bytes = b"", until: bytes = b">>> ", columns: int = 80, **env_extra
) -> tuple[int, str]:
    """Run ``mlx-lora ARGV`` on a pseudo-terminal ``columns`` wide; type ``keys`` once ``until`` shows.
    Waits on the output itself; the deadline only ends a truly stuck command."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    env = fresh_env(MLX_LORA_NO_BLAS_REEXEC="1", TERM="dumb", **env_extra)
    env.pop("COLUMNS", None)
    if OPENBLAS:
        env["LD_PRELOAD"] = OPENBLAS
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "mlx_lora", *argv], env)
    text, sent, end = b"", not keys, time.monotonic() + 600
    finished = False
    try:
        while True:
            assert time.monotonic() < end, f"stuck: {text[-2000:]!r}"
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the command closed the terminal
                break
            if not chunk:
                break
            text += chunk
            if not sent and until in text:
                os.write(fd, keys)
                sent = True
        finished = True
    finally:
        if not finished:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), text.decode(errors="replace").replace("\r\n", "\n")


def _serve_until_ready(argv: list[str], cwd: Path) -> tuple[int, list[str]]:
    env = fresh_env(MLX_LORA_NO_BLAS_REEXEC="1")
    if OPENBLAS:
        env["LD_PRELOAD"] = OPENBLAS
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first, models = proc.stdout.readline(), proc.stdout.readline()  # blocks until it serves, or exits
        proc.send_signal(signal.SIGTERM)  # handled as Ctrl-C: a clean stop
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, [first.strip(), models.strip(), *out.splitlines(), *err.splitlines()]


def test_the_quickstarts_last_lines_are_commands_that_run(tiny_llama, short_run, tmp_path, capsys, monkeypatch):
    import shlex

    from cli_harness import run_main

    from mlx_lora.commands.quickstart import QuickstartResult, report_lines

    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")
    res = QuickstartResult(
        out=str(short_run.parent),
        model=str(tiny_llama),
        model_origin="given",
        before=0.0,
        after=1.0,
        eval_examples=1,
        steps=2,
        run_dir=str(short_run),
    )
    lines = report_lines(res, "You route support tickets. Answer with team/priority.")
    commands = [shlex.split(l.strip()) for l in lines if l.strip().startswith("mlx-lora ")]
    assert {c[1] for c in commands} == {"chat", "generate", "eval", "serve"}, lines
    for argv in commands:
        argv = argv[1:]
        assert str(short_run) == argv[1] and "--model" not in argv, argv  # the run folder alone
        if argv[0] in ("generate", "eval"):
            code, out, err = run_main(capsys, argv)
            assert code == 0 and out.strip(), (argv, err)
        elif argv[0] == "chat":
            code, shown = _run_in_terminal(argv, tmp_path, keys=b"\x04")  # Ctrl-D at the prompt
            assert code == 0 and f"chat with {tiny_llama} + adapter {short_run}" in shown, shown
        else:
            code, shown = _serve_until_ready(argv + ["--port", "0"], tmp_path)
            assert code == 0 and shown[0].startswith("serving http://"), shown
            assert shown[1].split() == ["models", f"{tiny_llama.name},", "support"], shown


# ---------------------------------------------------------------------------------------------
# serve stopped with Ctrl-C shuts down cleanly, also with a reply streaming


@pytest.mark.parametrize("attempt", [1, 2, 3])  # the abort it guards against came now and then, not always
def test_serve_stopped_with_ctrl_c_during_a_streamed_reply_exits_cleanly(tiny_llama, tmp_path, attempt):
    import threading

    import httpx

    env = fresh_env(MLX_LORA_NO_BLAS_REEXEC="1")
    if OPENBLAS:
        env["LD_PRELOAD"] = OPENBLAS
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora", "serve", "--model", str(tiny_llama), "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_able,
    )
    got, streaming, ended = [], threading.Event(), threading.Event()
    try:
        url = proc.stdout.readline().split()[1]
        proc.stdout.readline()

        def client():
            body = {
                "model": tiny_llama.name,
                "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 3000,
                "stream": True,
            }
            try:
                with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        got.append(line)
                        if line.startswith("data: {"):
                            streaming.set()
            except httpx.HTTPError as e:
                got.append(f"client error: {e}")
            finally:
                streaming.set()
                ended.set()

        threading.Thread(target=client, daemon=True).start()
        assert streaming.wait(600), "no reply started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
        assert ended.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "terminate called" not in err and "Traceback" not in err and "ERROR" not in err, err
    assert out.strip().endswith("server stopped"), out
    assert [l for l in got if l.strip()][-1] == "data: [DONE]", got[-3:]  # the stream ended, it was not cut
