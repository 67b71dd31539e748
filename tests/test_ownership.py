"""Ownership: every command with ``--out`` writes only where it may and replaces only what it wrote.

For each command the target is filled with a user's files (a ``config.yaml``, a ``thesis.tex``,
a folder of notes) and the command is run with and without ``--overwrite``: it must refuse in one
line naming the folder and the first file it did not write, and every file must survive byte for
byte. The current folder, a folder above it and the home folder are refused even when empty; a
symbolic link is followed; a folder the tool wrote is replaced on request; a killed run's
temporaries are cleaned by the next run; outputs honour the umask.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_harness import assert_one_error_message, cli_env, diff, run_main, snapshot, write

from mlx_lora.plumbing.io import temp_prefix
from mlx_lora.plumbing.ownership import MARKER, read_marker
from mlx_lora.testing import make_tiny_dataset

_env = pytest.fixture(scope="module", autouse=True)(cli_env)


class World:
    def __init__(self, root: Path, model: Path, data: Path, adapter: Path):
        self.root, self.model, self.data, self.adapter = root, model, data, adapter


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    root = tmp_path_factory.mktemp("ownership")
    model = tiny_model_dir("llama")
    data = make_tiny_dataset(root / "data.jsonl", "chat", n=6)
    adapter = root / "run"
    code = _main(
        [
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(adapter),
            "--quiet",
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--set",
            "data.valid_fraction=0",
        ]
    )
    assert code == 0
    return World(root, model, data, adapter)


def _main(argv) -> int:
    from mlx_lora.commands.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


# command name -> argv writing to the folder `out` (fast settings: no verification, one step)
FOLDER_COMMANDS = {
    "train": lambda w, out: [
        "train",
        "--model",
        str(w.model),
        "--data",
        str(w.data),
        "--out",
        str(out),
        "--quiet",
        "--iters",
        "1",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0",
    ],
    "fuse": lambda w, out: [
        "fuse",
        "--model",
        str(w.model),
        "--adapter",
        str(w.adapter),
        "--out",
        str(out),
        "--no-verify",
    ],
    "convert": lambda w, out: ["convert", str(w.model), "--out", str(out)],
    "export-peft": lambda w, out: [
        "export",
        "adapter",
        "--adapter",
        str(w.adapter),
        "--format",
        "peft",
        "--out",
        str(out),
    ],
    "export-ollama": lambda w, out: [
        "export",
        "ollama",
        "--model",
        str(w.model),
        "--adapter",
        str(w.adapter),
        "--name",
        "mine",
        "--out",
        str(out),
        "--no-create",
        "--no-verify",
        "--type",
        "f16",
    ],
    "quickstart": lambda w, out: [
        "quickstart",
        "--out",
        str(out),
        "--model",
        str(w.model),
        "--iters",
        "1",
        "--eval-examples",
        "1",
        "--no-export",
    ],
}
# what each command's folder is marked as
KIND = {
    "train": "run",
    "fuse": "model",
    "convert": "model",
    "export-peft": "peft",
    "export-ollama": "ollama",
    "quickstart": "quickstart",
}
FILE_COMMANDS = {
    "export-gguf": lambda w, out: [
        "export",
        "gguf",
        "--model",
        str(w.model),
        "--adapter",
        str(w.adapter),
        "--out",
        str(out),
        "--no-verify",
    ],
    "export-gguf-adapter": lambda w, out: [
        "export",
        "adapter",
        "--adapter",
        str(w.adapter),
        "--format",
        "gguf",
        "--model",
        str(w.model),
        "--out",
        str(out),
    ],
}


def user_files(folder: Path) -> Path:
    """A user's project folder: it even has a config.yaml, as a run folder does."""
    write(folder / "config.yaml", "project: my thesis\n")
    write(folder / "thesis.tex", "\\documentclass{article} years of work\n")
    write(folder / "notes" / "ideas.md", "- one\n- two\n")
    return folder


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_users_folder_survives_byte_for_byte(command, overwrite, world, tmp_path, capsys):
    target = user_files(tmp_path / "mine")
    argv = FOLDER_COMMANDS[command](world, target) + (["--overwrite"] if overwrite else [])
    before = snapshot(tmp_path, world.model, world.adapter)
    code, out, err = run_main(capsys, argv)
    assert code == 2, err
    assert_one_error_message(code, out, err, [str(target), "'config.yaml'"])
    assert diff(before, snapshot(tmp_path, world.model, world.adapter)) == []


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_folder_of_another_kind_is_not_replaced(command, world, tmp_path, capsys):
    """A folder the tool wrote, but as something else (a run folder given to `fuse --out`)."""
    other = "export-peft" if command == "train" else "train"
    target = tmp_path / "theirs"
    assert _main(FOLDER_COMMANDS[other](world, target)) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, target) + ["--overwrite"])
    assert code == 2
    assert_one_error_message(code, out, err, [str(target), f"a {KIND[other]} folder"])
    assert diff(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("command", ["train", "fuse", "convert", "export-peft", "export-ollama"])
def test_a_folder_the_tool_wrote_is_replaced_on_request_but_not_with_a_users_file_added(
    command, world, tmp_path, capsys
):
    target = tmp_path / "out"
    assert _main(FOLDER_COMMANDS[command](world, target)) == 0
    assert read_marker(target)["kind"] == KIND[command]
    capsys.readouterr()
    # without --overwrite: refused, nothing changed
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, target))
    assert_one_error_message(code, out, err, [str(target), "--overwrite"])
    assert diff(before, snapshot(tmp_path)) == []
    # with --overwrite: replaced, and marked again
    code, _, err = run_main(capsys, FOLDER_COMMANDS[command](world, target) + ["--overwrite"])
    assert code == 0, err
    assert read_marker(target)["kind"] == KIND[command]
    # a file of the user's put inside it makes it theirs again
    write(target / "my-notes.txt", "keep me")
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, target) + ["--overwrite"])
    assert code == 2
    assert_one_error_message(code, out, err, [str(target), "'my-notes.txt'"])
    assert diff(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_the_current_folder_its_parents_and_home_are_never_targets(
    command, where, world, tmp_path, capsys, monkeypatch
):
    home = tmp_path / "home"
    cwd = home / "project" / "work"
    cwd.mkdir(parents=True)
    write(cwd / "main.py", "print('mine')\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    target = {"cwd": ".", "parent": "..", "home": "~"}[where]
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, target) + ["--overwrite"])
    assert code == 2, err
    assert_one_error_message(code, out, err, ["never writes its output over it"])
    assert diff(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("command", ["fuse", "convert", "export-peft", "train"])
def test_a_symlinked_out_is_followed(command, world, tmp_path, capsys):
    real = tmp_path / "disk" / "real"
    link = tmp_path / "link"
    # to a user's folder: refused, untouched
    user_files(real)
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, link) + ["--overwrite"])
    assert_one_error_message(code, out, err, [str(real), "'config.yaml'"])
    assert diff(before, snapshot(tmp_path)) == []
    # to an empty folder: written there, and the link still points at it
    shutil.rmtree(real)
    real.mkdir()
    code, _, err = run_main(capsys, FOLDER_COMMANDS[command](world, link))
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert read_marker(real)["kind"] == KIND[command]
    # a dangling link: one clear line
    link.unlink()
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    code, out, err = run_main(capsys, FOLDER_COMMANDS[command](world, link))
    assert_one_error_message(code, out, err, [str(link), "does not exist"])


@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_file_outputs_replace_only_a_gguf(command, world, tmp_path, capsys):
    target = write(tmp_path / "model.gguf", "not a gguf: the user's notes\n")
    write(tmp_path / "thesis.tex", "years of work")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, out, err = run_main(capsys, FILE_COMMANDS[command](world, target) + extra)
        assert code == 2
        assert_one_error_message(code, out, err, [str(target)])
        assert diff(before, snapshot(tmp_path)) == []
    # a GGUF file is what the command writes: replaced on request
    target.unlink()
    assert _main(FILE_COMMANDS[command](world, target)) == 0
    first = target.read_bytes()
    assert first[:4] == b"GGUF"
    code, _, err = run_main(capsys, FILE_COMMANDS[command](world, target) + ["--overwrite"])
    assert code == 0, err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_lmstudio_adds_to_a_shared_models_folder(world, tmp_path, capsys):
    """LM Studio's models folder is the user's: the export adds its own file and touches nothing else."""
    models = tmp_path / "lmstudio-models"
    write(models / "someone" / "their-model" / "their-model-Q4_0.gguf", b"GGUF their bytes")
    write(models / "mlx-lora" / "other" / "readme.txt", "theirs")
    before = snapshot(models)
    argv = [
        "export",
        "lmstudio",
        "--model",
        str(world.model),
        "--adapter",
        str(world.adapter),
        "--name",
        "mine",
        "--models-dir",
        str(models),
        "--no-verify",
        "--type",
        "f16",
    ]
    code, _, err = run_main(capsys, argv)
    assert code == 0, err
    after = snapshot(models)
    assert {k for k in after if k not in before} >= {str(models / "mlx-lora" / "mine" / "mine-F16.gguf")}
    assert all(after[k] == v for k, v in before.items() if k != str(models / "mlx-lora")), diff(before, after)
    assert read_marker(models / "mlx-lora" / "mine")["files"] == ["mine-F16.gguf"]
    # a second type lands beside the first; the marker lists both
    code, _, err = run_main(capsys, argv[:-1] + ["q8_0"])
    assert code == 0, err
    assert read_marker(models / "mlx-lora" / "mine")["files"] == ["mine-F16.gguf", "mine-Q8_0.gguf"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_runs_temporaries_are_cleaned_by_the_next_run_into_the_same_parent(world, tmp_path, capsys):
    parent = tmp_path / "models"
    parent.mkdir()
    ours_dead = temp_prefix("m").replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")
    stale_dir = parent / f"{ours_dead}abc123.partial"
    write(stale_dir / "model.safetensors", b"\0" * 4096)
    stale_file = write(
        parent / f"{temp_prefix('x.gguf').replace(f'-{os.getpid()}.', f'-{_dead_pid()}.')}q.partial", b"\0" * 4096
    )
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = write(parent / f"{temp_prefix('y').replace(f'-{os.getpid()}.', f'-{sleeper.pid}.')}z.partial", b"1")
        users = write(parent / ".m.backup.partial", b"a user's hidden file that merely looks like a temporary")
        code, _, err = run_main(capsys, FOLDER_COMMANDS["convert"](world, parent / "m"))
        assert code == 0, err
        assert not stale_dir.exists() and not stale_file.exists()
        assert live.exists() and users.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_output_honours_the_umask(mask, world, tmp_path, capsys):
    old = os.umask(mask)
    try:
        outs = {
            "gguf": (FILE_COMMANDS["export-gguf"], tmp_path / "m.gguf"),
            "lora": (FILE_COMMANDS["export-gguf-adapter"], tmp_path / "lora.gguf"),
            "fuse": (FOLDER_COMMANDS["fuse"], tmp_path / "fused"),
            "peft": (FOLDER_COMMANDS["export-peft"], tmp_path / "peft"),
            "ollama": (FOLDER_COMMANDS["export-ollama"], tmp_path / "ollama"),
            "train": (FOLDER_COMMANDS["train"], tmp_path / "run"),
        }
        for name, (build, out) in outs.items():
            code, _, err = run_main(capsys, build(world, out))
            assert code == 0, (name, err)
    finally:
        os.umask(old)
    for p in [tmp_path / "m.gguf", tmp_path / "lora.gguf", *tmp_path.glob("*/**/*")]:
        if p.name == ".lock":
            continue  # holds only a pid; its mode says nothing about the outputs
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)} != {oct(want)}"


def test_marker_says_what_wrote_the_folder(world, tmp_path):
    assert _main(FOLDER_COMMANDS["fuse"](world, tmp_path / "f")) == 0
    marker = json.loads((tmp_path / "f" / MARKER).read_text())
    assert marker["written_by"] == "mlx-lora" and marker["kind"] == "model" and marker["command"] == "fuse"
    assert "config.json" in marker["files"] and "model.safetensors" in marker["files"]
