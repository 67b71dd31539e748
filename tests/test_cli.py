"""The ``mlx-lora`` command as a user runs it: in a subprocess, judged by exit code and output.

Each subprocess that loads a model pays the mlx-lm import (seconds), so only one test does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_lora.commands.cli import cli
from mlx_lora.plumbing.backend import BLAS_LABELS, fast_blas


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("MLX_LORA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, one line on stderr starting 'error:', no traceback."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture()
def data_file(tmp_path) -> Path:
    from mlx_lora.testing import make_tiny_dataset

    return make_tiny_dataset(tmp_path / "train.jsonl", "chat", n=8)


def test_help_lists_commands_without_importing_mlx_lm(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split("Commands:", 1)[1].split()
    for name in ("train", "generate", "eval", "doctor", "convert"):
        assert name in commands
    # --help must stay instant: the multi-second mlx-lm import happens inside commands only.
    probe = (
        "import sys; from click.testing import CliRunner; from mlx_lora.commands.cli import cli; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx_lm', 'transformers', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_doctor_json_reports_backend_and_blas(tmp_path):
    env = {"LD_PRELOAD": ""}  # the command itself must find and preload the fastest BLAS installed
    r = run_cli("doctor", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["matmul_gflops"] > 0
    assert {"mlx", "mlx-lm", "python"} <= set(facts["versions"])
    if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
        assert facts["backend"] in ("metal", "cuda") and facts["compute_dtype"] == "bfloat16"
        return
    assert facts["backend"] == "cpu" and facts["compute_dtype"] == "float32"
    chosen = fast_blas() if sys.platform == "linux" else None
    if chosen:
        assert BLAS_LABELS[chosen[0]] in facts["blas"] and "blas_hint" not in facts
    else:
        assert facts["blas"]
        if "reference BLAS" in facts["blas"]:
            assert "install" in facts["blas_hint"]


def test_bad_set_key_is_one_error_line(tmp_path, data_file):
    r = run_cli("train", "--model", "m", "--data", str(data_file), "--set", "lora.aplha=4", cwd=tmp_path)
    assert r.returncode == 2
    assert_user_error(r, "lora.aplha", "did you mean 'alpha'")


def test_debug_shows_the_traceback(tmp_path, data_file):
    r = run_cli("--debug", "train", "--model", "m", "--data", str(data_file), "--set", "lora.aplha=4", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_missing_model_path_fails_before_writing_anything(tmp_path, data_file):
    missing = tmp_path / "no-such-model"
    r = run_cli("train", "--model", str(missing), "--data", str(data_file), "--out", "run", cwd=tmp_path)
    assert r.returncode == 2
    assert_user_error(r, str(missing), "does not exist")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_missing_data_file(tmp_path, tiny_llama):
    r = run_cli("train", "--model", str(tiny_llama), "--data", "nope.jsonl", "--out", "run", "--quiet", cwd=tmp_path)
    assert r.returncode == 2
    assert_user_error(r, "nope.jsonl", "data.path")
    assert not (tmp_path / "run").exists()


def test_missing_required_options_are_all_named(tmp_path):
    r = run_cli("train", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: invalid configuration (2 problems)")
    assert "model.path: required" in r.stderr and "data.path: required" in r.stderr


def test_train_options_leave_defaults_to_the_config():
    """Defaults live in config.py only: options the user did not give must not reach the config."""
    from mlx_lora.commands.cli import _overrides

    train = cli.commands["train"]
    ctx = train.make_context("train", ["--model", "m", "--rank", "4"])
    assert _overrides(**ctx.params) == {"model": {"path": "m"}, "lora": {"r": 4}}


def test_help_lists_the_lazy_commands_without_importing_them():
    """`mlx-lora --help` stays fast: it lists every command with its own short help, and imports
    none of the lazily loaded command modules (nor numpy, nor the config)."""
    import subprocess
    import sys

    from mlx_lora.commands.cli import LAZY_COMMANDS, lazy_command

    code = (
        "import sys; from mlx_lora.commands.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith(('mlx_lora.', 'numpy', 'mlx.'))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
    )
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.split("LOADED", 1)[1]
    assert "numpy" not in loaded and "mlx_lora.config" not in loaded, loaded
    for name, (_, short) in LAZY_COMMANDS.items():
        assert name in r.stdout
        own = " ".join((lazy_command(name).help or "").split("\n\n")[0].split())
        assert short == own, f"{name}: LAZY_COMMANDS says {short!r}, the command says {own!r}"
