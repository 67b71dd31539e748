"""``train.report_to``: TensorBoard scalars read back equal ``metrics.jsonl``, a resumed run appends
to the same event folder (records past the checkpoint superseded), wandb writes an offline run
without a network or an API key, and a missing package or unknown tracker is refused before
anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_harness import assert_refused, cli_env, run_main

from mlx_lora.testing import make_tiny_dataset

_env = pytest.fixture(scope="module")(cli_env)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("d") / "chat.jsonl", "chat", n=12, seed=0)


def _train(capsys, model, data, out, *extra):
    argv = [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--quiet",
        "--batch-size",
        "2",
        "--set",
        "data.valid_fraction=0.25",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.save_every=2",
        *extra,
    ]
    code, _, err = run_main(capsys, argv)
    assert code == 0, err


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict = {}
    for r in records:
        for k, v in r.items():
            if k != "step":
                out.setdefault(k, []).append((r["step"], v))
    return out


def _assert_same(scalars: dict, expected: dict) -> None:
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 on disk


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume_appends(tiny_llama, chat, tmp_path, capsys, _env):
    run = tmp_path / "run"
    _train(capsys, tiny_llama, chat, run, "--iters", "4", "--set", "train.report_to=[tensorboard]")
    records = _records(run)
    assert {"loss", "val_loss"} <= {k for r in records for k in r}
    _assert_same(_scalars(run / "tensorboard"), _expected(records))

    _train(capsys, tiny_llama, chat, run, "--iters", "6", "--resume", str(run))
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    _assert_same(_scalars(run / "tensorboard"), _expected(records))


def test_a_resumed_run_supersedes_what_was_logged_past_its_checkpoint(tmp_path):
    from mlx_lora.training.tracking import TensorBoard

    class Trainer:
        class state:
            step = 0

    def log(tb, steps, loss):
        for s in steps:
            tb.on_step(Trainer, {"step": s, "total_steps": 5, "loss": loss, "lr": 0.1})

    tb = TensorBoard(tmp_path / "tb")
    tb.on_train_start(Trainer)
    log(tb, range(1, 6), 1.0)  # killed after logging step 5; its last checkpoint was step 3
    Trainer.state.step = 3
    tb = TensorBoard(tmp_path / "tb")
    tb.on_train_start(Trainer)
    log(tb, range(4, 6), 2.0)
    tb.on_train_end(Trainer, None)
    assert _scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]


def test_wandb_runs_offline_into_the_run_folder(tiny_llama, chat, tmp_path, capsys, _env, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no key configured
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    run = tmp_path / "run"
    _train(capsys, tiny_llama, chat, run, "--iters", "2", "--set", "train.report_to=[wandb]")
    runs = sorted((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb" / "mlx-lora-run-id").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    # --resume continues the same wandb run (offline: a second folder of the same run id, which
    # `wandb sync` appends to that run)
    _train(capsys, tiny_llama, chat, run, "--iters", "3", "--resume", str(run))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    # (a second folder started within the same second gets a "-1" suffix from wandb)
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)


def test_a_missing_tracker_or_an_unknown_one_is_refused_before_training(
    tiny_llama, chat, tmp_path, capsys, _env, monkeypatch
):
    run = tmp_path / "run"
    base = ["train", "--model", str(tiny_llama), "--data", str(chat), "--out", str(run), "--iters", "1"]
    assert_refused(
        capsys,
        base + ["--set", "train.report_to=[mlflow]"],
        ["train.report_to", "'mlflow' is not one of tensorboard, wandb"],
        [tmp_path],
    )
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    assert_refused(
        capsys,
        base + ["--set", "train.report_to=[tensorboard, wandb]"],
        ["train.report_to", "wandb is not installed", "pip install 'mlx-lora[wandb]'"],
        [tmp_path],
    )
    assert not run.exists()
