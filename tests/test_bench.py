"""The benchmark script runs end to end (every run, the table, the JSON) on a tiny model. Its
numbers on a tiny model mean nothing; that they are there and consistent is what is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "train_vs_mlx_lm.py"),
        "--model",
        str(model),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-len",
        "96",
        "--median-len",
        "60",
        "--valid-rows",
        "3",
        "--oob-steps",
        "2",
        "--oob-batch-size",
        "1",
        "--quality-seeds",
        "1",
        "--json",
        str(out),
        "--work",
        str(tmp / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_every_run_reports_speed_memory_and_loss(bench_run):
    R, _ = bench_run
    assert set(R["runs"]) == {"ours", "mlx_lm"}
    for name, run in R["runs"].items():
        assert len(run["steps"]) == 2, name  # the requested number of optimizer steps
        s = R["summary"][name]
        assert s["tokens_per_s"] > 0 and s["peak_memory_gb"] > 0 and s["train_wall_s"] > 0, name
        assert 0 < s["mfu_pct"] < 100, name
    # Both trainers saw the same rows once: ours trains on exactly the data's target tokens;
    # mlx-lm's mask also counts one position past each row's end (a padding token).
    targets = R["data_stats"]["targets"]
    assert R["runs"]["ours"]["trained_tokens"] == targets
    assert R["runs"]["mlx_lm"]["trained_tokens"] == targets + R["data_stats"]["rows"]
    assert set(R["val"]) >= {"base", "ours", "mlx_lm", "ours_seed1", "paired_diff", "paired_se", "order_spread"}
    assert list(R["quality_runs"]) == ["ours_seed1"]


def test_our_step_computes_what_mlx_lm_computes_on_its_own_batches(bench_run):
    R, stdout = bench_run
    ls = R["lockstep"]
    assert len(ls["steps"]) == 2  # min(--lockstep-steps, --steps)
    theirs = [s["loss"] for s in R["runs"]["mlx_lm"]["steps"]]
    ours = [s["loss"] for s in ls["steps"]]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ls["max_rel_diff"] <= ls["tolerance"] and R["targets"][0]["quality_ok"]
    assert "same computation" in stdout


def test_memory_constrained_mode_runs_the_longest_batches_and_computes_the_same(bench_run):
    R, _ = bench_run
    lm = R["lowmem"]
    assert lm["plan_steps"][0] == 1 and len(lm["steps"]) == len(lm["plan_steps"])
    assert 0 < lm["peak_memory_gb"] and lm["tokens_per_s"] > 0 and lm["ours_tokens_per_s"] > 0
    # Same first batch from the same initial weights: same loss, other memory policy.
    assert lm["step1_loss"] == pytest.approx(lm["ours_step1_loss"], rel=1e-4)


def test_table_targets_and_out_of_box(bench_run):
    R, stdout = bench_run
    linux_cpu = sys.platform == "linux" and R["probe"]["facts"]["backend"] == "cpu"
    expected = ["speed", "memory", "lowmem"] + (["out_of_box"] if linux_cpu else [])
    assert [t["name"] for t in R["targets"]] == expected
    for t in R["targets"]:
        assert isinstance(t["met"], bool) and t["ratio"] > 0
        assert ("[MET]" if t["met"] else "[NOT MET]") + " " + t["text"] in stdout
    if not linux_cpu:
        return
    oob = R["out_of_box"]
    assert oob["ratio"] == pytest.approx(oob["ours_tokens_per_s"] / oob["mlx_lm_tokens_per_s"])
    assert oob["mlx_lm_blas"] == "reference BLAS bundled with mlx-cpu"  # nothing preloaded out of the box
    for label in (
        "trained tokens/s",
        "peak memory (GB)",
        "wall time, training (s)",
        "validation loss after",
        "model FLOP utilisation (%)",
        "ours/mlx-lm",
        "load avg",
    ):
        assert label in stdout, label
