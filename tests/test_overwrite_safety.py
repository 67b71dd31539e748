"""What ``--overwrite`` may delete: only what the tool can prove it wrote, and only after the new
output is complete.

Each case builds a real output through the CLI, then makes it doubtful in one way (a copied
marker beside a user's files, a marker that lists a user's file or a path outside, a user's file
deep inside ``checkpoints/``, a recorded file edited since, a symbolic link pointing out, a whole
copy of the folder) and checks, by hashing every file before and after, that ``--overwrite`` is
refused in one line naming the entry and changes nothing. Failures injected after the new output is
built but before the swap (an exception, Ctrl-C) leave the old output byte for byte. Rewritten files
keep their mode; ``chat /save`` appends only to its own chat JSONL.
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

from mlx_lora.plumbing import ownership
from mlx_lora.plumbing.ownership import MARKER, problems, read_marker
from mlx_lora.testing import make_tiny_dataset

REPO = Path(__file__).resolve().parent.parent

_env = pytest.fixture(scope="module", autouse=True)(cli_env)


class World:
    def __init__(self, root: Path, model: Path, data: Path, adapter: Path):
        self.root, self.model, self.data, self.adapter = root, model, data, adapter


def _main(argv) -> int:
    from mlx_lora.commands.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def train_argv(w, out, *extra):
    return [
        "train",
        "--model",
        w.model,
        "--data",
        w.data,
        "--out",
        out,
        "--quiet",
        "--iters",
        "1",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0",
        *extra,
    ]


# command -> argv writing the folder `out` (fast settings)
FOLDER_COMMANDS = {
    "train": train_argv,
    "fuse": lambda w, out: ["fuse", "--model", w.model, "--adapter", w.adapter, "--out", out, "--no-verify"],
    "convert": lambda w, out: ["convert", w.model, "--out", out],
    "export-peft": lambda w, out: ["export", "adapter", "--adapter", w.adapter, "--format", "peft", "--out", out],
    "export-ollama": lambda w, out: [
        "export",
        "ollama",
        "--model",
        w.model,
        "--adapter",
        w.adapter,
        "--name",
        "mine",
        "--out",
        out,
        "--no-create",
        "--no-verify",
        "--type",
        "f16",
    ],
    "quickstart": lambda w, out: [
        "quickstart",
        "--out",
        out,
        "--model",
        w.model,
        "--iters",
        "1",
        "--eval-examples",
        "1",
        "--no-export",
        "--set",
        "data.max_seq_length=1024",
    ],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    root = tmp_path_factory.mktemp("overwrite")
    model = tiny_model_dir("llama")
    data = make_tiny_dataset(root / "data.jsonl", "chat", n=8)
    adapter = root / "run"
    assert _main(train_argv(World(root, model, data, adapter), adapter)) == 0
    return World(root, model, data, adapter)


@pytest.fixture(scope="module")
def outputs(world, tmp_path_factory) -> dict:
    """One real output of each folder command (copied per test, never changed)."""
    root = tmp_path_factory.mktemp("outputs")
    made = {}
    for name, argv in FOLDER_COMMANDS.items():
        made[name] = root / name
        assert _main(argv(world, made[name])) == 0, name
    return made


def refused(capsys, argv, fragments, watched) -> str:
    before = snapshot(*watched)
    code, out, err = run_main(capsys, [str(a) for a in argv])
    message = assert_one_error_message(code, out, err, fragments)
    assert diff(before, snapshot(*watched)) == [], message
    return message


def user_files(folder: Path) -> Path:
    """A user's project: a config.yaml and a checkpoints/ folder, as a run folder has."""
    write(folder / "config.yaml", "project: my thesis\n")
    write(folder / "thesis.tex", "\\documentclass{article} years of work\n")
    write(folder / "checkpoints" / "draft-3" / "notes.md", "- keep\n")
    return folder


def _edit_marker(folder: Path, change) -> None:
    marker = json.loads((folder / MARKER).read_text())
    change(marker)
    (folder / MARKER).write_text(json.dumps(marker))


# ---------------------------------------------------------------------------------------------
# a marker is not trusted by its name


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_copied_marker_beside_a_users_files_authorises_nothing(command, world, outputs, tmp_path, capsys):
    target = user_files(tmp_path / "mine")
    shutil.copy2(outputs[command] / MARKER, target / MARKER)
    refused(
        capsys,
        FOLDER_COMMANDS[command](world, target) + ["--overwrite"],
        [str(target), MARKER, "another folder", "'checkpoints'"],
        [tmp_path],
    )


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_whole_copy_of_an_output_is_not_proven(command, world, outputs, tmp_path, capsys):
    """cp -r makes a new folder: its marker was written for the original, so it proves nothing."""
    target = tmp_path / "copy"
    shutil.copytree(outputs[command], target, symlinks=True)
    refused(
        capsys, FOLDER_COMMANDS[command](world, target) + ["--overwrite"], [str(target), "another folder"], [tmp_path]
    )


def _fresh(world, command, tmp_path, capsys) -> Path:
    out = tmp_path / "out"
    assert _main(FOLDER_COMMANDS[command](world, out)) == 0
    capsys.readouterr()
    assert problems(out, limit=10) == []
    return out


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_marker_that_lists_a_users_file_does_not_delete_it(command, world, tmp_path, capsys):
    out = _fresh(world, command, tmp_path, capsys)
    write(out / "thesis.tex", "years of work\n")
    # a hand-made entry for it: any size and hash but its own prove nothing
    _edit_marker(out, lambda m: m["entries"].update({"thesis.tex": {"size": 3, "sha256": "0" * 64}}))
    refused(
        capsys,
        FOLDER_COMMANDS[command](world, out) + ["--overwrite"],
        [str(out), "'thesis.tex'", "changed"],
        [tmp_path],
    )


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/passwd", "a/../../outside.txt", "./x"])
def test_a_marker_listing_a_path_outside_its_folder_is_refused(entry, world, tmp_path, capsys):
    out = _fresh(world, "train", tmp_path, capsys)
    write(tmp_path / "outside.txt", "not the tool's\n")
    _edit_marker(out, lambda m: m["entries"].update({entry: {"size": 15, "sha256": "0" * 64}}))
    refused(capsys, train_argv(world, out, "--overwrite"), [str(out), repr(entry), "not a path inside"], [tmp_path])


@pytest.mark.parametrize(
    "where",
    [
        "checkpoints/step-0000001/sub/deeper/notes.md",
        "checkpoints/mine.txt",
        "checkpoints/step-0000001/notes.md",
        "notes.md",
    ],
)
def test_a_users_file_inside_a_real_run_is_named_and_kept(where, world, tmp_path, capsys):
    out = _fresh(world, "train", tmp_path, capsys)
    write(out / where, "a user's file\n")
    refused(capsys, train_argv(world, out, "--overwrite"), [str(out), repr(where), "did not write"], [tmp_path])


@pytest.mark.parametrize(
    "what", ["config.yaml", "metrics.jsonl", "checkpoints/step-0000001/state.json", "adapter_model.safetensors"]
)
def test_a_recorded_file_changed_since_is_refused(what, world, tmp_path, capsys):
    out = _fresh(world, "train", tmp_path, capsys)
    with open(out / what, "ab") as f:
        f.write(b"\n# the user's edit\n")
    refused(capsys, train_argv(world, out, "--overwrite"), [str(out), repr(what), "changed since"], [tmp_path])


@pytest.mark.parametrize("command", ["train", "fuse", "export-peft"])
def test_a_symbolic_link_inside_pointing_out_is_refused_and_its_target_kept(command, world, tmp_path, capsys):
    out = _fresh(world, command, tmp_path, capsys)
    outside = write(tmp_path / "elsewhere" / "data.bin", b"the user's bytes")
    sub = out / "checkpoints" if command == "train" else out
    (sub / "link").symlink_to(outside.parent, target_is_directory=True)
    rel = "checkpoints/link" if command == "train" else "link"
    refused(
        capsys,
        FOLDER_COMMANDS[command](world, out) + ["--overwrite"],
        [str(out), repr(rel), "symbolic link"],
        [tmp_path],
    )


def test_a_marker_of_an_older_format_proves_nothing(world, tmp_path, capsys):
    out = tmp_path / "old"
    user_files(out)
    write(
        out / MARKER,
        json.dumps(
            {
                "written_by": "mlx-lora",
                "kind": "run",
                "command": "train",
                "files": ["config.yaml", "thesis.tex", "checkpoints"],
            }
        ),
    )
    refused(capsys, train_argv(world, out, "--overwrite"), [str(out), "older mlx-lora"], [tmp_path])


# ---------------------------------------------------------------------------------------------
# what the tool writes into its own folder stays provable


def test_a_run_with_checkpoints_rotation_evaluations_and_a_resume_stays_provable(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        world.model,
        "--data",
        world.data,
        "--out",
        out,
        "--quiet",
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0.25",
        "--set",
        "train.save_every=1",
        "--set",
        "train.keep_checkpoints=2",
        "--set",
        "train.eval_every=2",
    ]
    assert _main(argv) == 0
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"best", "latest", "step-0000003", "step-0000004"} <= names and "step-0000001" not in names
    assert problems(out, limit=10) == []
    # a resume writes more (metrics cut back and appended, new checkpoints): still provable
    code, _, err = run_main(capsys, ["train", "--resume", str(out), "--iters", "6"])
    assert code == 0, err
    assert problems(out, limit=10) == []
    code, _, err = run_main(capsys, [str(a) for a in argv] + ["--overwrite"])
    assert code == 0, err
    assert problems(out, limit=10) == [] and read_marker(out)["kind"] == "run"
    assert json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())["step"] == 4
    assert not (out / "checkpoints" / "step-0000006").exists()  # the new run, not the resumed one


def test_an_old_checkpoint_holding_a_users_file_is_kept_by_the_rotation(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        world.model,
        "--data",
        world.data,
        "--out",
        out,
        "--quiet",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0",
        "--set",
        "train.save_every=1",
        "--set",
        "train.keep_checkpoints=1",
    ]
    assert _main(argv) == 0
    assert not (out / "checkpoints" / "step-0000001").exists()  # rotated away: it was all the tool's
    notes = write(out / "checkpoints" / "step-0000002" / "deep" / "notes.md", "mine\n")
    code, _, err = run_main(capsys, ["train", "--resume", str(out), "--iters", "4"])
    assert code == 0, err
    assert notes.read_text() == "mine\n"  # step 2 is past keep_checkpoints but holds a user's file
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0000002", "step-0000004"], steps  # step 3 was the tool's alone: rotated away


# ---------------------------------------------------------------------------------------------
# build beside, swap at the end


@pytest.mark.parametrize("command", ["fuse", "convert", "export-peft", "export-ollama", "quickstart", "train"])
@pytest.mark.parametrize("how", ["exception", "ctrl-c"])
def test_a_failure_after_the_new_output_is_built_but_before_the_swap_keeps_the_old(
    command, how, world, tmp_path, capsys, monkeypatch
):
    out = _fresh(world, command, tmp_path, capsys)
    error = KeyboardInterrupt if how == "ctrl-c" else OSError
    real_marker = ownership.write_marker
    built = []

    def swap_fails(new, target, **kw):  # train and quickstart: the new folder is complete here
        built.append(sorted(p.name for p in Path(new).iterdir()))
        raise error("injected before the swap")

    def marker_fails(folder, kind, command_name, files=None):  # the other commands mark their new folder last
        real_marker(folder, kind, command_name, files)
        if files is None and Path(folder) != out:
            built.append(sorted(p.name for p in Path(folder).iterdir()))
            raise error("injected before the swap")

    monkeypatch.setattr(ownership, "swap_in", swap_fails)
    if command not in ("train", "quickstart"):
        monkeypatch.setattr(ownership, "write_marker", marker_fails)
    before, names = snapshot(out), _names(tmp_path)
    try:
        code, _, err = run_main(capsys, [str(a) for a in FOLDER_COMMANDS[command](world, out)] + ["--overwrite"])
        assert code != 0, err
    except (KeyboardInterrupt, OSError):
        pass
    assert built and built[0], "the failure came before the new output was built"
    assert diff(before, snapshot(out)) == []  # the old output byte for byte
    assert _names(tmp_path) == names  # and no temporary left beside it


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_exception_in_the_middle_of_training_keeps_the_old_run(world, tmp_path, capsys, monkeypatch):
    from mlx_lora.training.callbacks import MetricsFile

    out = _fresh(world, "train", tmp_path, capsys)

    def boom(self, trainer, m):
        raise RuntimeError("injected in the middle of training")

    monkeypatch.setattr(MetricsFile, "on_step", boom)
    before, names = snapshot(out), _names(tmp_path)
    with pytest.raises(RuntimeError):
        run_main(capsys, [str(a) for a in train_argv(world, out, "--overwrite", "--iters", "3")])
    assert diff(before, snapshot(out)) == [] and _names(tmp_path) == names


def test_ctrl_c_in_the_middle_of_training_keeps_the_old_run_and_says_so(world, tmp_path, capsys, monkeypatch):
    from mlx_lora.training.callbacks import MetricsFile

    out = _fresh(world, "train", tmp_path, capsys)
    real = MetricsFile.on_step

    def interrupt(self, trainer, m):
        real(self, trainer, m)
        raise KeyboardInterrupt

    monkeypatch.setattr(MetricsFile, "on_step", interrupt)
    before, names = snapshot(out), _names(tmp_path)
    code, _, err = run_main(capsys, [str(a) for a in train_argv(world, out, "--overwrite", "--iters", "3")])
    assert code in (0, 130), err
    assert f"{out} is left as it was" in err, err
    assert diff(before, snapshot(out)) == [] and _names(tmp_path) == names


def test_quickstart_overwrite_with_bad_data_leaves_the_old_output(world, tmp_path, capsys):
    out = _fresh(world, "quickstart", tmp_path, capsys)
    bad = write(tmp_path / "bad.jsonl", '{"messages": [{"role": "user", "content": "no answer"}]}\n{not json\n')
    before, names = snapshot(out), _names(tmp_path)
    code, _, err = run_main(
        capsys,
        [str(a) for a in FOLDER_COMMANDS["quickstart"](world, out)] + ["--overwrite", "--set", f"data.path={bad}"],
    )
    assert code == 2 and str(bad) in err and "Traceback" not in err, err
    assert diff(before, snapshot(out)) == [] and _names(tmp_path) == names
    # a good rerun replaces it, and names the files where they now are
    code, _, err = run_main(capsys, [str(a) for a in FOLDER_COMMANDS["quickstart"](world, out)] + ["--overwrite"])
    assert code == 0, err
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["run_dir"] == str(out / "run") and problems(out, limit=10) == []
    assert _names(tmp_path) == names


def test_a_model_that_does_not_load_leaves_the_old_quickstart(world, tmp_path, capsys):
    out = _fresh(world, "quickstart", tmp_path, capsys)
    broken = write(tmp_path / "broken" / "config.json", "{}")
    before, names = snapshot(out), _names(tmp_path)
    code, _, err = run_main(
        capsys,
        [
            "quickstart",
            "--out",
            str(out),
            "--model",
            str(broken.parent),
            "--iters",
            "1",
            "--eval-examples",
            "1",
            "--no-export",
            "--overwrite",
        ],
    )
    assert code != 0 and "Traceback" not in err, err
    assert diff(before, snapshot(out)) == [] and _names(tmp_path) == names


# ---------------------------------------------------------------------------------------------
# rewritten files keep their mode


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_export_gguf_overwrite_keeps_the_files_mode(mode, world, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = [
        "export",
        "gguf",
        "--model",
        str(world.model),
        "--adapter",
        str(world.adapter),
        "--out",
        str(out),
        "--no-verify",
    ]
    assert _main(argv) == 0
    out.chmod(mode)
    code, _, err = run_main(capsys, argv + ["--overwrite"])
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == mode


def test_eval_out_overwrite_keeps_the_mode_and_replaces_only_its_own_records(world, tmp_path, capsys):
    data = write(
        tmp_path / "eval.jsonl", "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(2))
    )
    out = tmp_path / "preds.jsonl"
    argv = [
        "eval",
        "--generate",
        "--model",
        str(world.model),
        "--data",
        str(data),
        "--max-tokens",
        "2",
        "--out",
        str(out),
    ]
    assert _main(argv) == 0
    out.chmod(0o600)
    code, _, err = run_main(capsys, argv + ["--overwrite"])
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o600
    # a file that merely starts like one, with the user's lines after it
    with open(out, "a") as f:
        f.write("my own notes\n")
    refused(capsys, argv + ["--overwrite"], [str(out), "line 3", "not a record"], [tmp_path])


# ---------------------------------------------------------------------------------------------
# chat /save


def _chat(world, cwd: Path, *lines: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLX_LORA_NO_BLAS_REEXEC="1", HF_HUB_OFFLINE="1")
    env.pop("MLX_LORA_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lora", "chat", "--model", str(world.model), "--max-tokens", "2"],
        input="".join(l + "\n" for l in lines),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_chat_save_appends_only_to_its_own_chat_jsonl(world, tmp_path):
    config = write(tmp_path / "config.json", '{"model_type": "llama"}\n')
    chats = tmp_path / "chats.jsonl"
    outside = write(tmp_path / "elsewhere" / "notes.txt", "mine\n")
    (tmp_path / "link.jsonl").symlink_to(outside)
    noisy = write(
        tmp_path / "mixed.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"messages": [], "note": "mine"})
        + "\n",
    )
    before = snapshot(config, outside, noisy, tmp_path / "link.jsonl")
    text = _chat(
        world,
        tmp_path,
        "hello",
        "/save config.json",
        "/save link.jsonl",
        "/save mixed.jsonl",
        "/save chats.jsonl",
        "/save chats.jsonl",
    )
    assert diff(before, snapshot(config, outside, noisy, tmp_path / "link.jsonl")) == []
    assert (tmp_path / "link.jsonl").is_symlink()
    assert "[not saved: config.json, line 1: not a chat row that /save writes" in text, text
    assert "link.jsonl is a symbolic link" in text and "mixed.jsonl, line 2" in text, text
    rows = [json.loads(l) for l in chats.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0]["messages"][0] == {"role": "user", "content": "hello"}


def test_chat_save_keeps_the_files_mode(world, tmp_path):
    chats = tmp_path / "chats.jsonl"
    _chat(world, tmp_path, "hello", "/save chats.jsonl")
    chats.chmod(0o600)
    _chat(world, tmp_path, "again", "/save chats.jsonl")
    assert chats.stat().st_mode & 0o777 == 0o600
    assert len(chats.read_text().splitlines()) == 2


def test_lm_studio_replaces_its_gguf_only_while_the_marker_records_it(world, tmp_path, capsys):
    models = tmp_path / "models"
    argv = [
        "export",
        "lmstudio",
        "--model",
        world.model,
        "--adapter",
        world.adapter,
        "--name",
        "mine",
        "--models-dir",
        models,
        "--no-verify",
        "--type",
        "f16",
    ]
    assert _main(argv) == 0
    gguf = models / "mlx-lora" / "mine" / "mine-F16.gguf"
    gguf.chmod(0o600)
    code, _, err = run_main(capsys, [str(a) for a in argv] + ["--overwrite"])
    assert code == 0, err
    assert gguf.stat().st_mode & 0o777 == 0o600 and problems(gguf.parent) == []
    with open(gguf, "ab") as f:
        f.write(b"the user's bytes")
    refused(capsys, argv + ["--overwrite"], [str(gguf), "not the file mlx-lora wrote"], [tmp_path])


def test_a_copied_run_resumes_and_its_checkpoints_rotate_by_their_file_names(world, tmp_path, capsys):
    """A copy's marker proves nothing, yet the copy can be resumed: a checkpoint there is replaced or
    deleted only when it holds nothing but the files a checkpoint holds."""
    original = tmp_path / "original"
    argv = [
        "train",
        "--model",
        world.model,
        "--data",
        world.data,
        "--out",
        original,
        "--quiet",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0.25",
        "--set",
        "train.save_every=1",
        "--set",
        "train.keep_checkpoints=2",
        "--set",
        "train.eval_every=1",
    ]
    assert _main(argv) == 0
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    notes = write(copy / "checkpoints" / "step-0000001" / "notes.md", "mine\n")
    code, _, err = run_main(capsys, ["train", "--resume", str(copy), "--iters", "5"])
    assert code == 0, err
    steps = sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0000001", "step-0000004", "step-0000005"], steps  # step 2 and 3 rotated away
    assert notes.read_text() == "mine\n" and (copy / "checkpoints" / "best" / "adapter_model.safetensors").is_file()
    # and the copy is still not the tool's to delete
    refused(capsys, argv[:6] + [copy] + argv[7:] + ["--overwrite"], [str(copy), "another folder"], [tmp_path])


def test_a_new_checkpoint_is_provably_ours_the_moment_it_is_renamed_into_place(tmp_path, monkeypatch):
    # A training killed right after a new checkpoint's rename (before any bookkeeping after it) must
    # leave a checkpoint its resume may write over: the marker records it before the rename.
    from mlx_lora.training.checkpoints import CHECKPOINT_FILES, RunDir

    run = tmp_path / "run"
    run.mkdir()
    ownership.write_marker(run, "run", "train", files=[])
    rd = RunDir(run)
    real_replace = os.replace
    seen = []

    def killed_after_the_rename(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if Path(dst).name == "step-0000006":
            seen.append(ownership.subfolder_problems(run, "checkpoints/step-0000006", CHECKPOINT_FILES))
            raise KeyboardInterrupt("killed here")

    def write(folder, text="first"):
        (folder / "adapters.safetensors").write_text(text)
        (folder / "adapter_config.json").write_text("{}")

    monkeypatch.setattr(os, "replace", killed_after_the_rename)
    with pytest.raises(KeyboardInterrupt):
        rd.replace_checkpoint("step-0000006", write)
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen == [[]], seen  # nothing in it the marker does not prove
    # the resumed run saves that step again over it
    rd.replace_checkpoint("step-0000006", lambda f: write(f, "second"))
    assert (run / "checkpoints" / "step-0000006" / "adapters.safetensors").read_text() == "second"
    assert problems(run) == []


def test_a_replaced_checkpoint_is_provably_ours_at_every_rename(tmp_path, monkeypatch):
    # Saving a checkpoint again over one of the same name (`best`, or a step saved again after a
    # resume) sets the old one aside, renames the new one into place, then records it. A training
    # killed after either rename must leave folders its resume may write over: the new files are
    # recorded beside the old ones before the first rename.
    from mlx_lora.training.checkpoints import CHECKPOINT_FILES, RunDir

    run = tmp_path / "run"
    run.mkdir()
    ownership.write_marker(run, "run", "train", files=[])
    rd = RunDir(run)

    def write(text):
        def put(folder):
            (folder / "adapters.safetensors").write_text(text)
            (folder / "adapter_config.json").write_text("{}")

        return put

    rd.replace_checkpoint("best", write("first"))
    real_replace = os.replace
    for kill_after in (".best.old", "best"):
        seen = []

        def killed_after_the_rename(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            if Path(dst).name == kill_after:
                seen.append(ownership.subfolder_problems(run, "checkpoints/best", CHECKPOINT_FILES))
                raise KeyboardInterrupt("killed here")

        monkeypatch.setattr(os, "replace", killed_after_the_rename)
        with pytest.raises(KeyboardInterrupt):
            rd.replace_checkpoint("best", write(f"killed after {kill_after}"))
        monkeypatch.setattr(os, "replace", real_replace)
        if kill_after == "best":
            assert seen == [[]], seen  # the new one, just renamed into place, is proven
        # the resumed run clears what the kill left (the old `best`, set aside) and saves `best` again
        rd = RunDir(run)
        rd.remove_partial_writes()
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["best"]
        rd.replace_checkpoint("best", write("again"))
        assert (run / "checkpoints" / "best" / "adapters.safetensors").read_text() == "again"
        assert problems(run) == []
        assert "also" not in json.dumps(ownership.read_marker(run))  # one record per file once done
