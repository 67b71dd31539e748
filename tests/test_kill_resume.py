"""Runs survive being killed, running out of disk or memory, and know their base model.

* Interruption: ``python -m mlx_lora train`` is SIGKILLed again and again, at random moments and
  inside every kind of write a run makes (a checkpoint's adapter and optimizer files, the
  ``latest`` pointer, the pruning of an old checkpoint, the run folder's adapter, a metrics line),
  and resumed each time. After every kill each checkpoint on disk must load; at the end the
  adapter and the loss of every step must equal those of an uninterrupted run, and no temporary
  file may be left.
* Resources: a full disk during a checkpoint write and out-of-memory errors (as MLX raises them
  on Metal, CUDA and the CPU) end with one message that says what to change, and the last good
  checkpoint is kept; the run then resumes.
* Integrity: runs record the fingerprint of their base model; the fingerprint follows the
  weights, not the file layout.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora.config import build
from mlx_lora.plumbing.ownership import LOCK, MARKER
from mlx_lora.testing import make_tiny_dataset
from mlx_lora.training.checkpoints import RunDir

STEPS = 40  # enough that a fast machine cannot finish before every kind of kill has happened
CONFIG = """\
model: {{path: {model}}}
data: {{path: {data}, valid_fraction: 0.0}}
lora: {{r: 4, dropout: 0.1}}
train: {{iters: {steps}, batch_size: 2, lr: 0.003, save_every: 1, keep_checkpoints: 2, log_every: 1, seed: 5,
         eval_every: 1000}}
"""
KILL_SEED = 20240611


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(config file, uninterrupted reference run folder, data cache) shared by the module."""
    import mlx_lora

    root = tmp_path_factory.mktemp("kill")
    data = make_tiny_dataset(root / "chat8.jsonl", "chat", n=8, seed=2)
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(model=tiny_model_dir("llama", init_std=0.2), data=data, steps=STEPS))
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_LORA_CACHE", str(cache))
        ref = root / "reference"
        result = mlx_lora.train(build(str(cfg), extra={"out": str(ref)}), progress=False)
    assert result.steps == STEPS and result.stopped == "completed"
    return cfg, ref, cache


@pytest.fixture(autouse=True)
def _env(setup, monkeypatch):
    monkeypatch.setenv("MLX_LORA_CACHE", str(setup[2]))
    monkeypatch.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")  # main() must never exec over the test process
    monkeypatch.delenv("MLX_LORA_DEBUG", raising=False)


def _adapter(folder) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(Path(folder) / "adapter_model.safetensors")).items()}


def _losses(run) -> dict[int, float]:
    """step -> loss from metrics.jsonl; fails on a torn line or a step logged twice."""
    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def assert_same_run(run, ref) -> None:
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    ref_losses, losses = _losses(ref), _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5
    )


def leftovers(run: Path) -> list[str]:
    """Hidden temporary files and folders a cut-short write leaves in the run folder (the ownership
    marker and the lock file, which a killed run leaves behind by design, are not such leftovers)."""
    return sorted(
        str(p.relative_to(run))
        for folder in (run, run / "checkpoints")
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name.startswith(".") and p.name not in (MARKER, LOCK)
    )


def assert_everything_readable(run: Path) -> int:
    """Every checkpoint, the run folder's adapter and config load; returns the newest step."""
    rd = RunDir(run)
    ckpts = rd.list_checkpoints()
    for c in ckpts:
        assert RunDir.is_complete(c), f"unreadable checkpoint {c}: {sorted(p.name for p in c.iterdir())}"
        RunDir.load_checkpoint(c)
    latest = rd.latest_checkpoint()
    assert (latest is None) == (not ckpts)
    if (run / "adapter_model.safetensors").exists():
        mx.load(str(run / "adapter_model.safetensors"))
        json.loads((run / "adapter_config.json").read_text())
    if (run / "config.yaml").exists():
        build(str(run / "config.yaml"))
    return int(latest.name.split("-")[1]) if latest else 0


# ----------------------------------------------------------------------------------------------
# the child: the real CLI, with a pause planted inside one kind of write for the parent to kill


def _hold(reason: str) -> None:
    Path(os.environ["KILL_MARK"]).write_text(reason)
    time.sleep(600)  # the parent SIGKILLs us here


def child_main() -> None:
    """Entry point of the training subprocess: install the pause for ``KILL_PHASE`` (on its
    ``KILL_ON_CALL``-th occurrence), then run ``mlx-lora`` with the given arguments."""
    import mlx_lora.model.adapters as adapters
    import mlx_lora.plumbing.ownership as ownership
    import mlx_lora.training.callbacks as callbacks
    import mlx_lora.training.checkpoints as checkpoints

    phase, nth = os.environ.get("KILL_PHASE", ""), int(os.environ.get("KILL_ON_CALL", "1"))
    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] == nth

    def partial_file(target: Path) -> None:
        # what atomic_path leaves when a process dies while writing: a hidden, half-written temp file
        # under a name that says which host and process made it
        (target.parent / f"{ownership.temp_prefix(target.name)}killed.tmp").write_bytes(b"\x93partial" * 512)

    save_opt, save_adapter = checkpoints.atomic_save_safetensors, adapters.atomic_save_safetensors
    write_text, delete_owned, write_metric = (
        checkpoints.atomic_write_text,
        ownership.delete_owned,
        callbacks.MetricsFile._write,
    )

    def opt_file(target, arrays, metadata=None):
        if phase == "checkpoint-optimizer" and due():
            partial_file(Path(target))
            _hold(phase)
        return save_opt(target, arrays, metadata)

    def adapter_file(target, arrays, metadata=None):
        in_ckpt = Path(target).parent.name.startswith(".step-")
        if (phase == "checkpoint-adapter" and in_ckpt or phase == "run-adapter" and not in_ckpt) and due():
            partial_file(Path(target))
            _hold(phase)
        return save_adapter(target, arrays, metadata)

    def text_file(target, text):
        if phase == "latest-pointer" and Path(target).name == "latest" and due():
            _hold(phase)
        return write_text(target, text)

    def remove_owned(path, *args, **kwargs):
        if phase == "pruning" and str(path).endswith(".deleting") and due():
            victim = next(p for p in sorted(Path(path).iterdir()) if p.is_file())
            victim.unlink()  # the deletion is half done
            _hold(phase)
        return delete_owned(path, *args, **kwargs)

    def metric(self, record):
        if phase == "metrics-line" and "loss" in record and due():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record)[:20])  # a torn last line
            _hold(phase)
        return write_metric(self, record)

    checkpoints.atomic_save_safetensors = opt_file
    adapters.atomic_save_safetensors = adapter_file
    checkpoints.atomic_write_text = text_file
    ownership.delete_owned = remove_owned
    callbacks.MetricsFile._write = metric

    from mlx_lora.commands.cli import main

    main(sys.argv[1:])


def _launch(args: list[str], env: dict) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_kill_resume as t; t.child_main()"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(proc: subprocess.Popen, until, timeout: float = 300.0) -> bool:
    """Poll until ``until()`` holds (True) or the process exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the training process made no progress")


PHASES = [
    "checkpoint-adapter",
    "checkpoint-optimizer",
    "latest-pointer",
    "pruning",
    "run-adapter",
    "metrics-line",
    "random",
    "sigterm",
]


def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(setup, tmp_path):
    cfg, ref, _ = setup
    rng = random.Random(KILL_SEED)
    phases = PHASES[:]
    rng.shuffle(phases)
    run, mark = tmp_path / "run", tmp_path / "mark"
    base_env = dict(os.environ)
    kills, mid_write, steps_at_kill = 0, 0, []
    for phase in phases:
        step = assert_everything_readable(run) if run.exists() else 0
        args = (
            ["train", "--resume", str(run)]
            if RunDir(run).exists()
            else ["train", "--config", str(cfg), "--out", str(run)]
        ) + ["--quiet"]
        # before the first checkpoint exists, pause at a later write so there is one to resume from
        nth = rng.randint(1, 2) if step else rng.randint(2, 3)
        mark.unlink(missing_ok=True)
        proc = _launch(args, dict(base_env, KILL_PHASE=phase, KILL_MARK=str(mark), KILL_ON_CALL=str(nth)))
        try:
            if phase in ("random", "sigterm"):
                progressed = _wait(proc, lambda step=step: assert_progress(run) > step)
                if progressed:
                    time.sleep(rng.uniform(0.0, 0.03))
            else:
                progressed = _wait(proc, mark.exists)
            if not progressed:  # finished before the planned moment: nothing left to interrupt
                assert proc.wait() == 0, proc.stderr.read()
                break
            if phase == "sigterm":
                proc.send_signal(signal.SIGTERM)  # handled like Ctrl-C: save, then exit 130
                assert proc.wait(timeout=300) == 130, proc.stderr.read()
                assert "interrupted at step" in proc.stderr.read()
            else:
                proc.kill()
                assert proc.wait(timeout=300) == -signal.SIGKILL
                kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        mid_write += bool(leftovers(run)) or phase in ("latest-pointer", "metrics-line")
        steps_at_kill.append((phase, assert_everything_readable(run)))
    # the last life runs to the end
    final = subprocess.run(
        [sys.executable, "-m", "mlx_lora", "train", "--resume", str(run), "--quiet"],
        env=base_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr
    print(
        f"\nkills survived: {kills} SIGKILL + 1 SIGTERM, {mid_write} inside a write; "
        f"(phase, newest checkpoint step) after each: {steps_at_kill}"
    )
    assert kills >= len(PHASES) - 2 and mid_write >= 6, steps_at_kill
    assert_same_run(run, ref)
    assert leftovers(run) == []  # resuming cleared every half-written temp file
    assert [p.name for p in RunDir(run).list_checkpoints()] == [f"step-{s:07d}" for s in (STEPS - 1, STEPS)]


def assert_progress(run: Path) -> int:
    ckpts = RunDir(run).list_checkpoints()
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


# ----------------------------------------------------------------------------------------------
# resources: disk full, out of memory


def run_main(capsys, argv) -> tuple[int, str]:
    from mlx_lora.commands.cli import main

    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_error(err: str) -> str:
    """The one error line, which ends the output (the banner lines before it are progress)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [l for l in lines if l.startswith("error")] == lines[-1:], err
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def test_disk_full_during_a_checkpoint_keeps_the_last_one(setup, tmp_path, capsys, monkeypatch):
    import mlx_lora.training.checkpoints as checkpoints

    cfg, ref, _ = setup
    run = tmp_path / "run"
    save, calls = checkpoints.atomic_save_safetensors, [0]

    def disk_full(target, arrays, metadata=None):
        calls[0] += 1
        if calls[0] == 4:  # the optimizer file of the 4th checkpoint: half written, then ENOSPC
            Path(target).with_name(f".{Path(target).name}.full.tmp").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return save(target, arrays, metadata)

    monkeypatch.setattr(checkpoints, "atomic_save_safetensors", disk_full)
    code, err = run_main(capsys, ["train", "--config", cfg, "--out", run, "--quiet"])
    line = one_error(err)
    assert code == 2
    for words in ("out of disk space", "free space", "step-0000003", f"--resume {run}"):
        assert words in line, line
    assert RunDir(run).latest_checkpoint().name == "step-0000003"
    assert assert_everything_readable(run) == 3
    assert leftovers(run) == []  # the half-written checkpoint folder went away with its temp file
    kept, top = _adapter(run / "checkpoints" / "step-0000003"), _adapter(run)
    assert all(np.array_equal(kept[k], top[k]) for k in kept)  # the run's adapter is the kept one

    monkeypatch.setattr(checkpoints, "atomic_save_safetensors", save)  # space was freed
    code, err = run_main(capsys, ["train", "--resume", run, "--quiet"])
    assert code == 0, err
    assert_same_run(run, ref)


OOM_ERRORS = {
    "metal": RuntimeError(
        "[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the "
        "maximum allowed buffer size of 28991029248 bytes."
    ),
    "metal-resources": RuntimeError("[metal::malloc] Resource limit (499000) exceeded."),
    "cuda": RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory"),
    "cpu": MemoryError("std::bad_alloc"),
}


@pytest.mark.parametrize("kind", list(OOM_ERRORS))
def test_out_of_memory_says_what_to_change_and_keeps_the_checkpoint(kind, setup, tmp_path, capsys, monkeypatch):
    from mlx_lora.data.batching import BatchPlan

    cfg = setup[0]
    run = tmp_path / "run"
    batches = BatchPlan.batches

    def running_out(self, **kwargs):
        if not kwargs.get("loop", True):  # evaluation walks its own plan: untouched
            return batches(self, **kwargs)

        def steps():
            for i, item in enumerate(batches(self, **kwargs)):
                if i == 3:  # the 4th step needs more memory than there is
                    raise OOM_ERRORS[kind]
                yield item

        return steps()

    monkeypatch.setattr(BatchPlan, "batches", running_out)
    code, err = run_main(capsys, ["train", "--config", cfg, "--out", run, "--quiet"])
    line = one_error(err)
    assert code == 2
    for words in (
        "out of memory",
        "train.batch_size",
        "train.grad_accum",
        "grad_checkpoint",
        "quantized base",
        "step-0000003",
        f"--resume {run}",
    ):
        assert words in line, line
    assert assert_everything_readable(run) == 3 and leftovers(run) == []
    if kind != "metal":
        return
    # the advice works: half the batch, twice the accumulation, same examples per step
    monkeypatch.setattr(BatchPlan, "batches", batches)
    code, err = run_main(
        capsys, ["train", "--resume", run, "--quiet", "--set", "train.batch_size=1", "--set", "train.grad_accum=2"]
    )
    assert code == 0, err
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))


def test_out_of_memory_outside_training_names_the_inference_remedies(setup, capsys, monkeypatch):
    import mlx_lora.commands.api as api

    def load(*args, **kwargs):
        raise RuntimeError("[malloc] Unable to allocate 1073741824 bytes.")

    monkeypatch.setattr(api, "load_for_inference", load)
    code, err = run_main(capsys, ["generate", "--model", "m", "--prompt", "hi"])
    line = one_error(err)
    assert code == 2 and "out of memory" in line and "--max-seq-length" in line and "Unable to allocate" in line


# ----------------------------------------------------------------------------------------------
# integrity: which base model a run belongs to


def test_runs_record_the_fingerprint_of_their_base(setup):
    from mlx_lora.model.integrity import FINGERPRINT_KEY, base_model_fingerprint

    cfg, ref, _ = setup
    expected = base_model_fingerprint(build(str(cfg)).model.path)
    folders = [ref] + RunDir(ref).list_checkpoints()
    assert len(folders) == 3
    for folder in folders:
        conf = json.loads((folder / "adapter_config.json").read_text())
        assert conf["mlx_lora"][FINGERPRINT_KEY] == expected, folder


def test_run_files_get_the_usual_permissions(setup):
    """Atomic writes go through private temp files; what lands must be as readable as any file the
    user writes (e.g. for a service account that serves the adapter)."""
    mask = os.umask(0)
    os.umask(mask)
    _, ref, _ = setup
    for f in [ref / "adapter_model.safetensors", ref / "config.yaml", ref / "checkpoints" / "latest"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    for d in RunDir(ref).list_checkpoints():
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, d


def test_fingerprint_follows_the_weights_not_the_files(tiny_model_dir, tmp_path):
    from mlx_lora.model.integrity import base_model_fingerprint, check_adapter_base
    from mlx_lora.plumbing.errors import ModelError

    model = tiny_model_dir("llama")
    fp = base_model_fingerprint(model)
    assert len(fp) == 64 and fp == base_model_fingerprint(model)

    # the same tensors in two shards (with an index), in a folder of another name: same model
    shards = tmp_path / "sharded"
    shutil.copytree(model, shards, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = mx.load(str(model / "model.safetensors"))
    names = sorted(tensors)
    half = {n: tensors[n] for n in names[: len(names) // 2]}
    rest = {n: tensors[n] for n in names[len(names) // 2 :]}
    mx.save_safetensors(str(shards / "model-00001-of-00002.safetensors"), half, metadata={"format": "pt"})
    mx.save_safetensors(str(shards / "model-00002-of-00002.safetensors"), rest, metadata={"format": "pt"})
    index = {
        "weight_map": {
            **{n: "model-00001-of-00002.safetensors" for n in half},
            **{n: "model-00002-of-00002.safetensors" for n in rest},
        }
    }
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    assert base_model_fingerprint(shards) == fp

    def variant(name, change) -> Path:
        out = tmp_path / name
        shutil.copytree(model, out)
        t = dict(tensors)
        change(t)
        mx.save_safetensors(str(out / "model.safetensors"), t, metadata={"format": "pt"})
        return out

    # one weight changed, one tensor recast, one tensor missing: each is another base
    first = names[0]
    others = [
        variant(
            "one-value",
            lambda t: t.__setitem__(
                first, t[first] + mx.array(np.eye(1, t[first].size, dtype=np.float32).reshape(t[first].shape))
            ),
        ),
        variant("float16", lambda t: t.__setitem__(first, t[first].astype(mx.float16))),
        variant("missing", lambda t: t.pop(names[-1])),
        tiny_model_dir("llama", seed=1),
    ]
    prints = {base_model_fingerprint(o) for o in others}
    assert len(prints) == len(others) and fp not in prints

    info = {"mlx_lora": {"base_model_fingerprint": fp}}
    assert check_adapter_base(info, shards) is None
    assert "different base model" in check_adapter_base(info, others[0])
    with pytest.raises(ModelError, match=r"model\.safetensors.*truncated"):
        broken = tmp_path / "broken"
        shutil.copytree(model, broken)
        os.truncate(broken / "model.safetensors", 4096)
        base_model_fingerprint(broken)


def test_an_interrupt_inside_an_optimizer_step_waits_for_the_step_to_finish():
    """Ctrl-C (or SIGTERM, handled like it) during a step's weight/optimizer/counter update is
    delivered only once the update is whole, so the checkpoint it triggers is consistent."""
    from mlx_lora.training.trainer import interrupts_deferred

    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_waits_for_the_block(interrupts_deferred)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_waits_for_the_block(interrupts_deferred):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal would be handled here, mid-step
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    with interrupts_deferred(enabled=False), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
