"""The plumbing every command shares: atomic folders, the safetensors header reader, the cache
root, hub snapshots and the progress display."""

from __future__ import annotations

import io as stdio
import json
import os
import struct
import threading

import pytest

from mlx_lora.converters import io as cio
from mlx_lora.model.integrity import base_model_fingerprint, check_safetensors
from mlx_lora.plumbing import hub, progress
from mlx_lora.plumbing.cache import cache_root
from mlx_lora.plumbing.errors import ModelError
from mlx_lora.plumbing.io import OutputAppeared, atomic_dir
from mlx_lora.training.callbacks import Progress


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# atomic folders and files


@pytest.mark.parametrize("set_aside", [True, False])
def test_a_folder_that_appears_while_writing_is_kept_or_replaced(tmp_path, set_aside):
    target = tmp_path / "out"
    with pytest.raises(OutputAppeared, match="appeared while"):
        with atomic_dir(target, set_aside=set_aside) as tmp:
            (tmp / "ours").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    with atomic_dir(target, overwrite=True, set_aside=set_aside) as tmp:
        (tmp / "ours").write_text("1")
    assert [p.name for p in target.iterdir()] == ["ours"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_an_empty_folder_is_written_into_and_a_full_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "empty" / "a").is_file()
    with pytest.raises(FileExistsError, match="not an empty folder"):
        with atomic_dir(tmp_path / "empty"):
            pass


def test_converter_json_is_atomic_utf8_and_follows_the_umask(tmp_path, umask_027):
    cio.write_json(tmp_path / "c.json", {"name": "café"})
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "name": "café"\n}\n'
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_prepared_data_follows_the_umask(tmp_path, umask_027):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "recipes" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", script)
    prepare_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_data)
    prepare_data.write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "é"}])
    f = tmp_path / "d" / "train.jsonl"
    assert f.read_text(encoding="utf-8") == '{"text": "é"}\n' and f.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in f.parent.iterdir()] == ["train.jsonl"]


# ---------------------------------------------------------------------------------------------
# the safetensors header reader


def _safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_fp8_tensors_are_checked_fingerprinted_and_not_converted(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    f = _safetensors(
        folder / "model.safetensors",
        {"w": {"dtype": "F8_E4M3", "shape": [2, 4], "data_offsets": [0, 8]}},
        bytes(range(8)),
    )
    infos, _ = cio.read_safetensors_header(f)
    assert infos["w"].nbytes == 8 and infos["w"].offset == f.stat().st_size - 8
    assert len(base_model_fingerprint(folder)) == 64
    with pytest.raises(ModelError, match="'w': unsupported dtype F8_E4M3"):
        cio.load_safetensors(f)
    _safetensors(f, {"w": {"dtype": "F8_E4M3", "shape": [2, 4], "data_offsets": [0, 6]}}, bytes(range(8)))
    with pytest.raises(ModelError, match="needs 8 bytes, header gives 6"):
        check_safetensors(f)


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, None),  # numbers as strings are read as numbers
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, "x"]}, "malformed header entry"),
        ({"dtype": "F4", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype F4"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated"),
    ],
)
def test_every_reader_applies_the_same_checks(tmp_path, entry, words):
    """The fingerprint, the damaged-file check and the converters read one header the same way."""
    from mlx_lora.converters.fuse import safetensors_dtypes

    folder = tmp_path / "m"
    folder.mkdir()
    _safetensors(folder / "model.safetensors", {"w": entry}, b"\0" * 8)
    readers = [
        lambda: cio.read_safetensors_header(folder / "model.safetensors"),
        lambda: check_safetensors(folder / "model.safetensors"),
        lambda: base_model_fingerprint(folder),
        lambda: safetensors_dtypes(folder),
    ]
    for read in readers:
        if words is None:
            read()
        else:
            with pytest.raises(ModelError, match=words):
                read()


# ---------------------------------------------------------------------------------------------
# the cache root


def test_every_cache_follows_mlx_lora_cache(tmp_path, monkeypatch):
    from mlx_lora.commands import quickstart
    from mlx_lora.converters.gguf_import import gguf_cache_dir
    from mlx_lora.data.examples import default_cache_dir

    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "c"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert cache_root() == tmp_path / "c"
    assert (
        quickstart.models_cache_dir().parent
        == default_cache_dir().parent
        == gguf_cache_dir(gguf).parent.parent
        == cache_root()
    )
    monkeypatch.delenv("MLX_LORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mlx-lora"


# ---------------------------------------------------------------------------------------------
# hub snapshots


def test_a_cached_snapshot_is_used_without_asking_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, **k: str(tmp_path) if k.get("local_files_only") else asked.append(repo),
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: asked.append("info"))
    assert hub.snapshot("org/model", timeout_s=5) == tmp_path and not asked


def test_download_gives_up_on_a_silent_hub_with_one_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("not cached"))
    )
    silent = threading.Event()  # the hub never answers while the test runs
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: silent.wait(600))
    try:
        with pytest.raises(ModelError, match=r"could not download 'org/model'.*TimeoutError: no answer within"):
            hub.download("org/model", timeout_s=0.2)
    finally:
        silent.set()


# ---------------------------------------------------------------------------------------------
# progress


class _Terminal(stdio.StringIO):
    def isatty(self):
        return True


STEP = dict(total_steps=3, loss=1.5, lr=1e-4, tokens_per_s=1000.0, peak_memory_gb=1.25, eta_s=65.0)


@pytest.mark.parametrize(
    "env, terminal, bar", [(None, True, True), (None, False, False), ("0", True, False), ("1", False, True)]
)
def test_mlx_lora_progress_decides_between_a_bar_and_lines(monkeypatch, env, terminal, bar):
    if env is None:
        monkeypatch.delenv("MLX_LORA_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("MLX_LORA_PROGRESS", env)
    stream = _Terminal() if terminal else stdio.StringIO()
    assert progress.show_bar(stream) is bar
    p = Progress(stream=stream, log_every=1)
    for step in (1, 2, 3):
        p.on_step(None, dict(STEP, step=step))
    p.on_eval(None, {"step": 3, "val_loss": 1.0, "val_ppl": 2.72, "is_best": True})
    p.on_train_end(None, None)
    text = stream.getvalue()
    assert "step 3: val loss 1.0000  ppl 2.72 (best)\n" in text
    if bar:
        assert "\r[" in text and "3/3" in text and "loss 1.5000 lr 1.00e-04 1000 tok/s eta 01:05 peak 1.25 GB" in text
    else:
        assert text.splitlines()[:3] == [
            f"step {s}/3  loss 1.5000  lr 1.00e-04  1000 tok/s  eta 01:05  peak 1.25 GB" for s in (1, 2, 3)
        ]


def test_byte_progress_draws_only_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("MLX_LORA_PROGRESS", "0")
    with progress.ByteProgress(2048, "model.safetensors") as bar:
        bar.update(2048)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MLX_LORA_PROGRESS", "1")
    with progress.ByteProgress(2048, "model.safetensors") as bar:
        bar.update(2048)
    assert "model.safetensors" in capsys.readouterr().err
