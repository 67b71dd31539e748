"""A run folder can be trusted: one writer at a time, a resume that cannot corrupt it, a full disk
and every other stop reported as it is.

* The lock: while a run writes its folder, a second ``train`` into it (``--resume``,
  ``--overwrite`` or plain) is refused in one line naming the writer's pid, and changes nothing;
  a SIGKILLed writer's lock dies with it, so its ``--resume`` just works.
* The resume contract (table-driven, through the CLI): every key that fixes the adapter's shape,
  the base model, the data or the seed is refused with its old -> new value and the folder
  stays byte for byte as it was; every key on the allowed list is accepted and the run goes on.
  Damaged ``state.json`` files and an unusable ``metrics.jsonl`` are named, not tracebacks.
* A full disk (a real one, a small tmpfs, when this machine lets the test mount one) ends in one
  line that names the checkpoint kept, or says that none was; the run then resumes.
* Non-finite losses and interrupts say which checkpoint exists, if any.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from cli_harness import assert_one_error_message, cli_env, diff, make_read_only, make_writable, run_main, snapshot

from mlx_lora.testing import make_tiny_dataset
from mlx_lora.training.checkpoints import RunDir, RunLock

TRAIN = ("--quiet", "--batch-size", "2", "--set", "data.valid_fraction=0", "--set", "train.save_every=1")


_env = pytest.fixture(scope="module", autouse=True)(cli_env)


class World:
    def __init__(self, root: Path, model: Path, other_model: Path, data: Path, base: Path):
        self.root, self.model, self.other_model, self.data, self.base = root, model, other_model, data, base


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, _env) -> World:
    """A finished 2-step run (a checkpoint per step) that each case copies and resumes."""
    root = tmp_path_factory.mktemp("trust")
    model = tiny_model_dir("llama")
    data = make_tiny_dataset(root / "data.jsonl", "chat", n=8)
    base = root / "base"
    assert _main(["train", "--model", model, "--data", data, "--out", base, "--iters", "2", *TRAIN]) == 0
    return World(root, model, tiny_model_dir("llama", seed=1), data, base)


def _main(argv) -> int:
    from mlx_lora.commands.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _copy_run(w: World, dst: Path) -> Path:
    shutil.copytree(w.base, dst, symlinks=True)
    return dst


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _refused(capsys, argv, watched, fragments) -> str:
    """Run ``argv``; it must exit 2 with one error line holding ``fragments`` and change nothing."""
    before = snapshot(*watched)
    code, out, err = run_main(capsys, [str(a) for a in argv])
    line = assert_one_error_message(code, out, err, fragments)
    assert code == 2, line
    assert diff(before, snapshot(*watched)) == [], line
    return line


# ----------------------------------------------------------------------------------------------
# the resume contract


def _other_data(w: World, ws: Path) -> Path:
    dst = ws / "elsewhere.jsonl"
    shutil.copy2(w.data, dst)
    return dst


PER_STEP = "examples per step (train.batch_size x train.grad_accum x ranks)"
# case -> (extra argv for `train --resume RUN`, the key the message must name, "old -> new" text)
FORBIDDEN = {
    "lora.r": (["--set", "lora.r=16"], "8 -> 16"),
    "lora.alpha": (["--alpha", "8"], "16.0 -> 8.0"),
    "lora.dropout": (["--set", "lora.dropout=0.1"], "0.0 -> 0.1"),
    "lora.target_modules": (["--set", "lora.target_modules=[q_proj]"], 'null -> ["q_proj"]'),
    "lora.layers_to_transform": (["--set", "lora.layers_to_transform=[0]"], "null -> [0]"),
    "lora.use_dora": (["--dora"], "false -> true"),
    "lora.use_rslora": (["--set", "lora.use_rslora=true"], "false -> true"),
    "model.path": (lambda w, ws: ["--model", w.other_model], "-> {other_model}"),
    "model.dtype": (["--set", "model.dtype=bfloat16"], "auto -> bfloat16"),
    "model.revision": (["--set", "model.revision=main"], "null -> main"),
    "data.path": (lambda w, ws: ["--data", _other_data(w, ws)], "-> {ws}/elsewhere.jsonl"),
    "data.format": (["--set", "data.format=chat"], "auto -> chat"),
    "data.valid_fraction": (["--set", "data.valid_fraction=0.25"], "0.0 -> 0.25"),
    "data.max_seq_length": (["--max-seq-length", "64"], "2048 -> 64"),
    "data.train_on": (["--set", "data.train_on=all"], "assistant -> all"),
    "data.chat_template": (["--set", "data.chat_template=chatml"], "null -> chatml"),
    "data.packing": (["--packing"], "false -> true"),
    "data.length_bucketing": (["--set", "data.length_bucketing=true"], "false -> true"),
    "data.overlong": (["--set", "data.overlong=skip"], "truncate -> skip"),
    "train.optimizer": (["--set", "train.optimizer=sgd"], "adamw -> sgd"),
    "train.seed": (["--seed", "1"], "0 -> 1"),
    "train.batch_size": (["--batch-size", "4"], f"{PER_STEP} (2 -> 4)"),
    "train.grad_accum": (["--set", "train.grad_accum=2"], f"{PER_STEP} (2 -> 4)"),
    "train.method": (["--set", "train.method=orpo"], "sft -> orpo"),
    "train.dpo_loss": (["--set", "train.dpo_loss=ipo"], "sigmoid -> ipo"),
    "train.dpo_beta": (["--set", "train.dpo_beta=0.2"], "0.1 -> 0.2"),
    "train.dpo_label_smoothing": (
        ["--set", "train.method=dpo", "--set", "train.dpo_label_smoothing=0.1"],
        "0.0 -> 0.1",
    ),
    "train.orpo_lambda": (["--set", "train.orpo_lambda=0.2"], "0.1 -> 0.2"),
    "train.dpo_precompute_ref": (
        ["--set", "train.method=dpo", "--set", "train.dpo_precompute_ref=true"],
        "false -> true",
    ),
    "train.group_size": (["--set", "train.group_size=8"], "4 -> 8"),
    "train.temperature": (["--set", "train.temperature=0.7"], "1.0 -> 0.7"),
    "train.max_completion_length": (["--set", "train.max_completion_length=64"], "256 -> 64"),
    "train.grpo_beta": (["--set", "train.grpo_beta=0"], "0.04 -> 0"),
    "train.grpo_loss": (["--set", "train.grpo_loss=bnpo"], "grpo -> bnpo"),
    "train.epsilon": (["--set", "train.epsilon=0.1"], "0.2 -> 0.1"),
    "train.epsilon_high": (["--set", "train.epsilon_high=0.28"], "null -> 0.28"),
    "train.grpo_scale_rewards": (["--set", "train.grpo_scale_rewards=false"], "true -> false"),
    "train.grpo_kl_bias_correction": (["--set", "train.grpo_kl_bias_correction=true"], "false -> true"),
    "train.reward": (["--set", "train.method=grpo", "--set", "train.reward=number"], "null -> number"),
    "train.rewards": (["--set", "train.method=grpo", "--set", "train.rewards={exact: 1}"], "train.rewards"),
    "data.columns": (["--set", "data.columns={completion: answer}"], "data.columns.completion (null -> answer)"),
    "data.sources": (
        lambda w, ws: ["--set", f"data.sources=[{{path: {_other_data(w, ws)}}}]", "--set", "data.path=null"],
        "null -> ",
    ),
}


@pytest.mark.parametrize("key", list(FORBIDDEN))
def test_resume_refuses_a_change_that_breaks_the_run(key, world, tmp_path, capsys):
    args, change = FORBIDDEN[key]
    ws = tmp_path / "ws"
    ws.mkdir()
    run = _copy_run(world, ws / "run")
    if callable(args):
        args = args(world, ws)
    change = change.format(other_model=world.other_model, ws=ws)
    line = _refused(
        capsys,
        ["train", "--resume", run, "--iters", "3", *args],
        (ws, world.model, world.other_model, world.data),
        [str(run), "--resume cannot change", change],
    )
    assert key in line
    assert "train.iters" not in line  # an allowed change in the same command is not listed


def test_resume_names_every_refused_key_at_once(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    line = _refused(
        capsys,
        [
            "train",
            "--resume",
            run,
            "--model",
            world.other_model,
            "--set",
            "lora.r=4",
            "--set",
            "data.train_on=all",
            "--lr",
            "1e-3",
        ],
        (tmp_path, world.model),
        ["model.path", "lora.r (8 -> 4)", "data.train_on (assistant -> all)"],
    )
    assert "train.lr" not in line


# case -> the --set overrides besides train.iters=3 that change it (each run then goes on from step 2)
ALLOWED_CASES = {
    "train.iters": [],
    "train.epochs": ["train.iters=null", "train.epochs=1"],
    "train.lr": ["train.lr=1e-3"],
    "train.schedule": ["train.schedule=linear"],
    "train.warmup_steps": ["train.warmup_steps=1"],
    "train.min_lr_ratio": ["train.min_lr_ratio=0.1"],
    "train.weight_decay": ["train.weight_decay=0.01"],
    "train.max_grad_norm": ["train.max_grad_norm=null"],
    "train.eval_every": ["train.eval_every=1"],
    "train.eval_batches": ["train.eval_batches=null"],
    "train.save_every": ["train.save_every=5"],
    "train.keep_checkpoints": ["train.keep_checkpoints=1"],
    "train.log_every": ["train.log_every=1"],
    "train.early_stopping_patience": ["train.early_stopping_patience=2"],
    "train.nan_policy": ["train.nan_policy=skip"],
    "train.grad_checkpoint": ["train.grad_checkpoint=true"],
    "train.checkpoint_attention": ["train.checkpoint_attention=true"],
    "train.loss_chunk_tokens": ["train.loss_chunk_tokens=null"],
    "train.length_groups": ["train.length_groups=false"],
    "train.compile": ["train.compile=false"],
    "data.cache": ["data.cache=false"],
    "train.report_to": ["train.report_to=[tensorboard]"],
    "model.trust_remote_code": ["model.trust_remote_code=true"],
    "model.dequantize_on_cpu": ["model.dequantize_on_cpu=false"],
    "train.shapes": ["train.shapes=packed"],
    "train.wired_limit_gb": ["train.wired_limit_gb=1"],
    "train.cache_limit_gb": ["train.cache_limit_gb=0.5"],
    "train.clear_cache_after_eval": ["train.clear_cache_after_eval=false"],
    # the same examples per step, in another shape: what the out-of-memory advice asks for
    "train.batch_size": ["train.batch_size=1", "train.grad_accum=2"],
    "train.grad_accum": ["train.batch_size=1", "train.grad_accum=2"],
    "data.path": "the same file, named by a relative path",
    "out": [],  # every case resumes a copy of the run, whose config.yaml names the original folder
}


@pytest.mark.parametrize("key", list(ALLOWED_CASES))
def test_resume_accepts_an_allowed_change_and_goes_on(key, world, tmp_path, capsys):
    from mlx_lora.config import build

    run = _copy_run(world, tmp_path / "run")
    sets = ["train.iters=3"] + (ALLOWED_CASES[key] if key != "data.path" else [])
    extra = {"out": str(run)}
    argv = ["train", "--resume", str(run)] + [a for kv in sets for a in ("--set", kv)]
    if key == "data.path":
        extra["data"] = {"path": os.path.relpath(world.data)}
        argv += ["--data", extra["data"]["path"]]
    code, out, err = run_main(capsys, argv)
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err, err
    steps = _steps(run)
    assert steps[:2] == [1, 2] and steps[-1] >= 3 and len(set(steps)) == len(steps), steps
    assert not (run / ".lock").exists()
    # config.yaml now records the accepted config
    assert build(str(run / "config.yaml")) == build(str(world.base / "config.yaml"), sets, extra=extra)


def test_a_new_learning_rate_is_the_one_used(world, tmp_path, capsys):
    """A constant learning rate lives in the optimizer state the checkpoint restores; the resumed
    run must still take the new one."""
    run = _copy_run(world, tmp_path / "run")
    code, _, err = run_main(
        capsys,
        [
            "train",
            "--resume",
            str(run),
            "--iters",
            "3",
            "--lr",
            "0.005",
            "--set",
            "train.schedule=constant",
            "--set",
            "train.log_every=1",
        ],
    )
    assert code == 0, err
    lr = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] == 3]
    assert lr == [pytest.approx(0.005)]


def test_the_tables_decide_every_config_key():
    """A key added to the config is refused on resume until someone allows it; both tables here
    must then name it, so the decision is made on purpose."""
    from mlx_lora.config import SECTIONS
    from mlx_lora.training.resume import ALLOWED, BATCH_KEYS, refused_changes

    keys = {f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)} | {"out"}
    assert keys <= set(FORBIDDEN) | set(ALLOWED_CASES), keys - set(FORBIDDEN) - set(ALLOWED_CASES)
    assert set(ALLOWED) | set(BATCH_KEYS) <= set(ALLOWED_CASES)
    assert not (set(ALLOWED) & set(FORBIDDEN))

    # refused by default: a key the allowed list does not know
    from mlx_lora.config import Config
    from mlx_lora.training import resume

    real = resume.to_dict
    try:
        seen = []

        def with_new_key(cfg):
            d = real(cfg)
            seen.append(cfg)
            d["train"]["brand_new_knob"] = len(seen)
            return d

        resume.to_dict = with_new_key
        refused = refused_changes(Config(), Config(), 4, 4)
    finally:
        resume.to_dict = real
    assert [c.key for c in refused] == ["train.brand_new_knob"]


def test_resume_refuses_another_base_under_the_same_path(world, tmp_path, capsys):
    """The checkpoint records its base model's fingerprint: new weights in the same folder are
    another base, however the folder is named."""
    model = tmp_path / "model"
    shutil.copytree(world.model, model)
    run = tmp_path / "run"
    code, _, err = run_main(
        capsys, ["train", "--model", str(model), "--data", str(world.data), "--out", str(run), "--iters", "2", *TRAIN]
    )
    assert code == 0, err
    shutil.copy2(world.other_model / "model.safetensors", model / "model.safetensors")
    _refused(
        capsys,
        ["train", "--resume", run, "--iters", "3"],
        (run, model),
        [str(run), "base_model_fingerprint", str(model), "is not the base model"],
    )


def test_resume_refuses_a_hand_edited_config_that_no_longer_fits_the_checkpoint(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    import yaml

    conf = run / "config.yaml"
    data = yaml.safe_load(conf.read_text())
    data["lora"]["r"] = 4
    conf.write_text(yaml.safe_dump(data, sort_keys=False))
    _refused(capsys, ["train", "--resume", run], (run,), [str(run), "lora.r (8 -> 4)"])


def test_resume_cannot_end_before_the_checkpoint(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    _refused(
        capsys, ["train", "--resume", run, "--iters", "1"], (run,), ["train.iters", "step-0000002", "at least 2 steps"]
    )


def test_the_adapter_must_fit_the_checkpoint_tensors(world, tmp_path):
    """Defence in depth below the config check: restoring tensors of another shape is an error."""
    import mlx.core as mx

    from mlx_lora.plumbing.errors import CheckpointError
    from mlx_lora.training.trainer import _check_same_tensors

    a = {"x.lora_A.weight": mx.zeros((8, 64))}
    _check_same_tensors(a, {"x.lora_A.weight": mx.ones((8, 64))}, "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt holds x\.lora_A\.weight of shape \(16, 64\)"):
        _check_same_tensors(a, {"x.lora_A.weight": mx.zeros((16, 64))}, "ckpt")
    with pytest.raises(CheckpointError, match="lacks x.lora_A.weight"):
        _check_same_tensors(a, {}, "ckpt")
    with pytest.raises(CheckpointError, match="has y"):
        _check_same_tensors(a, {**a, "y": mx.zeros(1)}, "ckpt")


# -- damaged state.json and metrics.jsonl ------------------------------------------------------


def _state_edit(change):
    def edit(run: Path) -> Path:
        path = run / "checkpoints" / "step-0000002" / "state.json"
        data = json.loads(path.read_text())
        result = change(data)
        path.write_text(result if isinstance(result, str) else json.dumps(data))
        return path

    return edit


def _step_beyond_the_end(run: Path) -> Path:
    ckpts = run / "checkpoints"
    os.rename(ckpts / "step-0000002", ckpts / "step-0000099")
    (ckpts / "latest").write_text("step-0000099\n")
    path = ckpts / "step-0000099" / "state.json"
    data = json.loads(path.read_text())
    data["step"] = 99
    path.write_text(json.dumps(data))
    return path


# case -> (edit of the run returning the file to name, fragments)
BAD_STATE = {
    "negative_step": (_state_edit(lambda d: d.update(step=-1)), ["'step'", ">= 0", "-1"]),
    "string_step": (_state_edit(lambda d: d.update(step="2")), ["'step'", '"2"']),
    "float_step": (_state_edit(lambda d: d.update(step=2.0)), ["'step'", "2.0"]),
    "step_other_than_the_folder": (_state_edit(lambda d: d.update(step=1)), ["'step' is 1", "step-0000002"]),
    "step_beyond_the_run": (_step_beyond_the_end, ["'step' is 99", "beyond the run's 2 steps"]),
    "missing_key": (_state_edit(lambda d: d.pop("batch_index")), ["'batch_index'", "missing"]),
    "extra_junk": (_state_edit(lambda d: d.update(junk=[1, 2])), ["unexpected key 'junk'"]),
    "not_an_object": (_state_edit(lambda d: "[1, 2]"), ["expected a JSON object"]),
    "bad_global_batch": (
        _state_edit(lambda d: d["extra"].update(global_batch="four")),
        ["'extra.global_batch'", '"four"'],
    ),
    "nan_elapsed": (_state_edit(lambda d: d.update(elapsed_s=float("nan"))), ["'elapsed_s'", "NaN"]),
}


@pytest.mark.parametrize("case", list(BAD_STATE))
def test_a_damaged_state_json_is_named(case, world, tmp_path, capsys):
    edit, fragments = BAD_STATE[case]
    run = _copy_run(world, tmp_path / "run")
    path = edit(run)
    _refused(capsys, ["train", "--resume", run], (run,), [str(path), *fragments])


def test_metrics_jsonl_that_is_a_folder_is_named_before_training(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    (run / "metrics.jsonl" / "notes.txt").write_text("mine")
    _refused(capsys, ["train", "--resume", run, "--iters", "3"], (run,), [str(run / "metrics.jsonl"), "is a folder"])


def test_metrics_jsonl_that_cannot_be_written_is_named_before_training(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    make_read_only(metrics)
    try:
        _refused(capsys, ["train", "--resume", run, "--iters", "3"], (run,), [str(metrics), "cannot read and append"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(metrics)], capture_output=True)
        make_writable(run)


def test_a_torn_or_binary_metrics_line_does_not_stop_a_resume(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "lo\xe2\x82')  # a crash inside a multi-byte character
    code, _, err = run_main(capsys, ["train", "--resume", str(run), "--iters", "3"])
    assert code == 0, err
    assert _steps(run) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# one writer per run folder


@pytest.mark.parametrize("how", ["resume", "overwrite", "plain"])
def test_a_second_writer_is_refused_and_changes_nothing(how, world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    if how == "overwrite":  # a copy's marker names another folder: mark the copy as the tool's own
        from mlx_lora.plumbing.ownership import write_marker

        write_marker(run, "run", "train")
    argv = (
        ["train", "--resume", run]
        if how == "resume"
        else ["train", "--model", world.model, "--data", world.data, "--out", run, *TRAIN]
        + (["--overwrite"] if how == "overwrite" else [])
    )
    with RunLock(run):  # this process is the writer now
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        _refused(capsys, argv, (tmp_path,), [f"{run} is in use by another mlx-lora train (pid {os.getpid()})"])
    assert not (run / ".lock").exists()
    code, _, err = run_main(capsys, [str(a) for a in argv] + ["--iters", "3"])  # free again
    if how == "plain":  # then what it always got: the folder holds a run
        assert code == 2 and "in use" not in err and "--resume" in err, err
    else:
        assert code == 0, err


def test_a_new_run_folder_is_locked_before_its_first_write(world, tmp_path, capsys, monkeypatch):
    """Even the first files of a new run (marker, config) are written under the lock."""
    import mlx_lora.plumbing.ownership as ownership
    import mlx_lora.training.checkpoints as checkpoints

    seen = []

    def spy(write, folder_of):
        def locked_then_write(*args, **kwargs):
            folder = Path(folder_of(*args))
            with pytest.raises(checkpoints.RunInUse):
                RunLock(folder).acquire()
            seen.append((write.__name__, sorted(p.name for p in folder.iterdir())))
            return write(*args, **kwargs)

        return locked_then_write

    monkeypatch.setattr(checkpoints.RunDir, "write_config", spy(checkpoints.RunDir.write_config, lambda s, t: s.path))
    monkeypatch.setattr(ownership, "write_marker", spy(ownership.write_marker, lambda f, *a: f))
    run = tmp_path / "new"
    monkeypatch.setattr(RunLock, "RETRY_S", 0.0)
    code, _, err = run_main(
        capsys,
        ["train", "--model", str(world.model), "--data", str(world.data), "--out", str(run), "--iters", "1", *TRAIN],
    )
    assert code == 0, err
    assert [name for name, _ in seen] == ["write_marker", "write_config"]
    assert seen[0][1] == [".lock"]  # nothing but the lock came before the marker
    assert not (run / ".lock").exists()


def test_the_lock_is_let_go_on_every_way_out(world, tmp_path, capsys, monkeypatch):
    """An error inside training (here a non-finite loss) still releases the lock, in-process."""
    run = tmp_path / "run"
    _nan_at(monkeypatch, 2)
    code, _, err = run_main(
        capsys,
        ["train", "--model", str(world.model), "--data", str(world.data), "--out", str(run), "--iters", "3", *TRAIN],
    )
    assert code == 2 and "loss became nan" in err, err
    assert not (run / ".lock").exists()
    with RunLock(run):
        pass


def test_a_stale_lock_file_of_a_dead_run_is_taken_over(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    (run / ".lock").write_text("999999999\n")  # left by a process that died without cleaning up
    code, _, err = run_main(capsys, ["train", "--resume", str(run), "--iters", "3"])
    assert code == 0, err
    assert not (run / ".lock").exists() and _steps(run)[-1] == 3


def test_a_checkpoint_left_renamed_aside_by_a_crash_is_resumed_from(world, tmp_path, capsys):
    """A crash between the two renames that replace a checkpoint leaves only ``.step-N.old``; the
    resume chooses it while only reading, and puts it back once it holds the lock."""
    run = _copy_run(world, tmp_path / "run")
    ckpts = run / "checkpoints"
    os.rename(ckpts / "step-0000002", ckpts / ".step-0000002.old")
    code, _, err = run_main(capsys, ["train", "--resume", str(run), "--iters", "3"])
    assert code == 0, err
    assert f"resuming  {ckpts / 'step-0000002'} (step 2 of 3)" in err, err
    assert _steps(run) == [1, 2, 3]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def test_a_resume_sees_what_happened_while_it_was_starting(world, tmp_path):
    from mlx_lora.config import build
    from mlx_lora.plumbing.errors import CheckpointError
    from mlx_lora.training.resume import plan_resume

    run = _copy_run(world, tmp_path / "run")
    plan = plan_resume(RunDir(run), build(str(run / "config.yaml"), extra={"out": str(run)}), 1)
    plan.check_unchanged()
    (run / "checkpoints" / "latest").write_text("step-0000001\n")  # another writer moved on
    with pytest.raises(CheckpointError, match="another mlx-lora train wrote this run"):
        plan.check_unchanged()


# -- real processes ----------------------------------------------------------------------------


PAUSE_AT = 2


def paused_main() -> None:
    """Entry point of a training subprocess that stops after writing step PAUSE_AT's metrics
    line and waits there, holding its run folder, until it is killed."""
    import mlx_lora.training.callbacks as callbacks

    on_step = callbacks.MetricsFile.on_step

    def pausing(self, trainer, m):
        on_step(self, trainer, m)
        if m["step"] == PAUSE_AT:
            Path(os.environ["PAUSE_MARK"]).write_text(str(os.getpid()))
            time.sleep(600)

    callbacks.MetricsFile.on_step = pausing
    from mlx_lora.commands.cli import main

    main(sys.argv[1:])


def _cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_live_writer_blocks_a_second_process_until_it_is_killed(world, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "mark"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_run_folder_trust as t; t.paused_main()"
    )
    env = dict(os.environ, PAUSE_MARK=str(mark))
    argv = [
        "train",
        "--model",
        world.model,
        "--data",
        world.data,
        "--out",
        run,
        "--iters",
        "4",
        *TRAIN,
        "--set",
        "train.log_every=1",
    ]  # a metrics line, and so a pause, at every step
    writer = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "the writer never reached its pause"
            time.sleep(0.02)
        before = snapshot(tmp_path)
        for argv in (
            ["--resume", run],
            ["--model", world.model, "--data", world.data, "--out", run, "--overwrite", *TRAIN],
        ):
            r = _cli("train", *argv)
            line = assert_one_error_message(
                r.returncode, r.stdout, r.stderr, [f"{run} is in use by another mlx-lora train (pid {writer.pid})"]
            )
            assert r.returncode == 2, line
        assert diff(before, snapshot(tmp_path)) == []
        writer.kill()  # SIGKILL: no cleanup runs, the operating system drops the lock
        assert writer.wait(timeout=300) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stderr.close()
    assert (run / ".lock").exists()  # the dead writer's file is still there, and locks nothing
    r = _cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _steps(run) == [1, 2, 3, 4] and not (run / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# a full disk


MLX_WRITE_FAILED = "[write] Unable to write 2097246 bytes to file."


def test_disk_full_is_recognised_however_it_is_raised(tmp_path):
    from mlx_lora.model.integrity import is_disk_full, resource_error

    enospc = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

    def wrapped(inner, how):
        try:
            try:
                raise inner
            except OSError as e:
                if how == "cause":
                    raise RuntimeError("saving failed") from e
                raise RuntimeError("saving failed")  # noqa: B904 (the case without a cause)
        except RuntimeError as outer:
            return outer

    yes = [
        RuntimeError(MLX_WRITE_FAILED),
        enospc,
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        wrapped(enospc, "cause"),
        wrapped(enospc, "context"),
    ]
    no = [
        RuntimeError(f"[save_safetensors] Failed to open file {tmp_path}/x.safetensors"),  # a disk with room
        OSError(errno.EACCES, "Permission denied"),
        RuntimeError("[write] File x is not open."),
        RuntimeError("[matmul] shapes do not match"),
        ValueError(MLX_WRITE_FAILED),
    ]
    assert [is_disk_full(e) for e in yes] == [True] * len(yes)
    assert [is_disk_full(e) for e in no] == [False] * len(no)

    msg = str(resource_error(RuntimeError(MLX_WRITE_FAILED), run_dir="runs/x", last_checkpoint="runs/x/c/step-3"))
    assert msg.startswith("out of disk space (" + MLX_WRITE_FAILED + ")") and "step-3 is kept" in msg
    assert "--resume runs/x" in msg
    msg = str(resource_error(wrapped(enospc, "cause"), run_dir="runs/x", last_checkpoint=None))
    assert "writing /runs/x/metrics.jsonl" in msg and "No checkpoint was saved yet" in msg
    assert "is kept" not in msg and "--resume" not in msg and "--overwrite" in msg


@pytest.fixture
def small_disk(tmp_path):
    """A factory: a tmpfs of the given size mounted in tmp_path (skips where mounting is not permitted)."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_mlx_reports_a_full_disk_as_the_integrity_module_expects(small_disk):
    """The message matched above is the one the installed MLX raises on a real full disk."""
    import mlx.core as mx

    from mlx_lora.model.integrity import is_disk_full

    disk = small_disk("1m")
    with pytest.raises(RuntimeError) as info:
        mx.save_safetensors(str(disk / "big.safetensors"), {"x": mx.zeros((1 << 19,))})
    assert str(info.value).startswith("[write] Unable to write ") and is_disk_full(info.value)


def test_a_file_mlx_cannot_create_on_a_full_disk_is_a_full_disk(small_disk, tmp_path):
    """MLX loses the errno of a failed open; the file system then says whether it is full. Here it
    has no inode left (and blocks to spare)."""
    import mlx.core as mx

    from mlx_lora.model.integrity import is_disk_full

    disk = small_disk("1m,nr_inodes=3")
    with pytest.raises(OSError) as info:
        for i in range(10):
            (disk / f"f{i}").touch()
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="Failed to open") as info:
        mx.save_safetensors(str(disk / "x.safetensors"), {"x": mx.zeros(3)})
    assert is_disk_full(info.value)
    with pytest.raises(RuntimeError, match="Failed to open") as info:  # a missing folder is not a full disk
        mx.save_safetensors(str(tmp_path / "nowhere" / "x.safetensors"), {"x": mx.zeros(3)})
    assert not is_disk_full(info.value)


def test_a_real_full_disk_keeps_the_last_checkpoint_and_the_run_resumes(world, small_disk, capsys):
    run = small_disk("1m") / "run"
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(world.model),
            "--data",
            str(world.data),
            "--out",
            str(run),
            "--iters",
            "40",
            *TRAIN,
            "--set",
            "train.keep_checkpoints=100",
        ],
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert [l for l in err.splitlines() if l.startswith("error")] == [line], err
    kept = RunDir(run).latest_checkpoint()
    assert kept is not None, err
    assert line.startswith("error: out of disk space") and f"{kept} is kept" in line and f"--resume {run}" in line
    RunDir.load_checkpoint(kept)
    from mlx_lora.plumbing.ownership import MARKER

    hidden = sorted(p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.startswith("."))
    assert hidden == [MARKER]  # no half-written temporary, no lock left behind

    subprocess.run(["mount", "-o", "remount,size=16m", str(run.parent)], check=True)  # space was freed
    code, _, err = run_main(capsys, ["train", "--resume", str(run), "--set", "train.keep_checkpoints=2"])
    assert code == 0, err
    assert _steps(run)[-1] == 40


def test_a_disk_too_small_for_the_first_checkpoint_says_nothing_was_kept(world, small_disk, capsys):
    run = small_disk("64k") / "run"
    code, _, err = run_main(
        capsys,
        ["train", "--model", str(world.model), "--data", str(world.data), "--out", str(run), "--iters", "3", *TRAIN],
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert line.startswith("error: out of disk space"), err
    assert "No checkpoint was saved yet" in line and "--overwrite" in line and "is kept" not in line
    assert RunDir(run).latest_checkpoint() is None


# ----------------------------------------------------------------------------------------------
# stops say what is true


def _nan_at(monkeypatch, step: int) -> None:
    """Make the loss of optimizer step ``step`` non-finite."""
    import mlx.core as mx

    import mlx_lora.training.trainer as trainer

    accumulate = trainer.Trainer._accumulate

    def poisoned(self, batch):
        loss, ntoks, grads = accumulate(self, batch)
        if self.state.step + 1 == step:
            loss = loss * mx.array(float("nan"))
        return loss, ntoks, grads

    monkeypatch.setattr(trainer.Trainer, "_accumulate", poisoned)


@pytest.mark.parametrize("step", [1, 3])
def test_a_non_finite_loss_names_the_checkpoint_it_keeps_or_says_there_is_none(
    step, world, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    _nan_at(monkeypatch, step)
    code, out, err = run_main(
        capsys,
        ["train", "--model", str(world.model), "--data", str(world.data), "--out", str(run), "--iters", "4", *TRAIN],
    )
    assert "Traceback" not in err, err
    line = assert_one_error_message(code, out, err.strip().splitlines()[-1], [f"at step {step}"])
    if step == 1:
        assert "no checkpoint was saved yet" in line and "kept" in line and "--resume" not in line
    else:
        assert f"the last good checkpoint {run / 'checkpoints' / 'step-0000002'} is kept" in line
        assert f"--resume {run}" in line


@pytest.mark.parametrize("at", [0, 2])
def test_an_interrupt_says_what_was_saved(at, world, tmp_path, capsys, monkeypatch):
    from mlx_lora.data.batching import BatchPlan

    batches = BatchPlan.batches

    def interrupted(self, **kwargs):
        if not kwargs.get("loop", True):  # evaluation walks its own plan: untouched
            return batches(self, **kwargs)

        def steps():
            for i, item in enumerate(batches(self, **kwargs)):
                if i == at:
                    raise KeyboardInterrupt
                yield item

        return steps()

    monkeypatch.setattr(BatchPlan, "batches", interrupted)
    run = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        ["train", "--model", str(world.model), "--data", str(world.data), "--out", str(run), "--iters", "4", *TRAIN],
    )
    assert code == 130, err
    line = next(l for l in err.splitlines() if l.startswith("interrupted"))
    if at == 0:
        assert line.startswith("interrupted before the first step; no checkpoint was saved"), line
        assert "--resume" not in line and "--overwrite" in line
    else:
        assert line.startswith(f"interrupted at step 2; saved {run / 'checkpoints' / 'step-0000002'}"), line
        assert f"--resume {run}" in line
    assert not (run / ".lock").exists()
