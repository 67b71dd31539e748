"""The prepared device run (bench/gpu_run.sh, bench/gpu_run.py) works, checked on the CPU in its dry
mode at tiny sizes: every step runs in order, within the budget, and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_dry_mode_runs_the_steps_and_writes_their_json(tmp_path, tiny_llama):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "gpu_run.py"),
        "--dry",
        "--only",
        "facts,models,trace,attention",
        "--like",
        str(tiny_llama),
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--budget",
        "600",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_run.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["facts", "model_big", "model_small", "trace_1b", "trace_1b_packed", "attention_1b"]
    assert all(s["rc"] == 0 for s in steps.values())
    assert json.loads(steps["facts"]["tail"].strip().splitlines()[-1])["backend"] == "cpu"

    phases = [
        "weights loaded",
        "LoRA wrapped",
        "trainer built (optimizer state)",
        "first forward (loss only)",
        "first forward+backward (compiles)",
        "forward+backward (compiled)",
        "optimizer step",
        "evaluation (loss only)",
        "after clear_cache",
    ]
    for name, policy in (("trace_1b", "exact"), ("trace_1b_packed", "packed")):
        trace = json.loads((out / f"{name}.json").read_text())
        got = {p["name"]: p for p in trace["phases"]}
        assert list(got) == phases
        assert any(f"({policy} shapes)" in n for n in trace["notes"]), trace["notes"]
        weights = got["weights loaded"]["active"]
        assert weights > 0 and all(p["peak"] >= p["active"] >= 0 for p in trace["phases"])
        # the backward pass holds activations beyond the weights; clear_cache empties the cache
        assert got["forward+backward (compiled)"]["peak"] > got["LoRA wrapped"]["active"]
        assert got["after clear_cache"]["cache"] == 0
    attention = json.loads((out / "attention_1b.json").read_text())
    assert len(attention["results"]) == 4 and all(r["ms"] > 0 for r in attention["results"].values())


def test_out_of_budget_steps_are_skipped_and_recorded(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "gpu_run.py"),
        "--dry",
        "--only",
        "facts,attention",
        "--like",
        str(tmp_path),
        "--out",
        str(out),
        "--budget",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr
    steps = json.loads((out / "gpu_run.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["facts", "attention_1b"]
    assert all("skipped" in s for s in steps)


def test_shell_script_parses_and_names_its_modes():
    for script in ("gpu_run.sh", "gpu_prepare.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "bench" / script)]).returncode == 0, script
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "stage|run|dry" in proc.stderr


def test_a_step_out_of_time_is_stopped_with_its_workers_and_keeps_finished_results(tmp_path, monkeypatch):
    """A benchmark that runs out of time loses neither the runs it finished (gathered into a
    partial JSON) nor the device: its worker processes are stopped with it."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_run

    work = tmp_path / "work"
    (work / "bench-big").mkdir(parents=True)
    (work / "model-big").mkdir()  # as the models step (not run here) leaves it
    (work / "bench-big" / "mlx_lm.result.json").write_text(json.dumps({"steps": [1, 2]}))
    pidfile = tmp_path / "grandchild.pid"
    slow = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)",
    ]
    real = gpu_run.subprocess.Popen

    def popen(cmd, **kw):  # every step's command becomes the slow one
        return real(slow, **kw)

    monkeypatch.setattr(gpu_run.subprocess, "Popen", popen)
    rc = gpu_run.main(
        [
            "--dry",
            "--only",
            "bench",
            "--like",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(work),
            "--budget",
            "600",
            "--step-cap",
            "3",
        ]
    )
    assert rc == 1
    steps = json.loads((tmp_path / "out" / "gpu_run.json").read_text())["steps"]
    big = next(s for s in steps if s["name"] == "bench_1b")
    assert big["rc"] == "timeout" and big["partial"] == ["mlx_lm"]
    assert json.loads((tmp_path / "out" / "bench_1b.partial.json").read_text()) == {"mlx_lm": {"steps": [1, 2]}}
    pid = int(pidfile.read_text())
    # The step's cap killed the whole group (the step took its 3 s, not the 600 s it sleeps): the
    # grandchild goes too, at once; the deadline only ends a truly stuck case.
    end = __import__("time").monotonic() + 120
    while not _gone(pid):
        assert __import__("time").monotonic() < end, f"grandchild {pid} still running"
        __import__("time").sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:  # no such process
        return True
