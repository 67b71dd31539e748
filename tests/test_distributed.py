"""Scale-out: data-parallel ranks on loopback (ring backend), failure handling, resume across
rank counts, and the helpers they rest on.

Multi-process tests start real processes: ``mlx.launch -n 2 --backend ring`` for the documented
command, or two processes with ``MLX_RANK``/``MLX_HOSTFILE`` set by hand where the test must know
each rank's process id (to kill or freeze it). Children inherit this environment, so an
``LD_PRELOAD`` of OpenBLAS set for the test run reaches them too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_lora
from mlx_lora.config import build
from mlx_lora.testing import make_tiny_dataset
from mlx_lora.training import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
ITERS = 12
LR = 3e-3


# ----------------------------------------------------------------------------------------------
# helpers


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_RANK", "MLX_HOSTFILE"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _hostfile(tmp_path: Path, n: int = 2) -> Path:
    port = _free_port_pair()
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port + i}"] for i in range(n)]))
    return path


def _start_ranks(tmp_path: Path, argv: list[str], n: int = 2) -> list[subprocess.Popen]:
    """Start ``argv`` as ranks 0..n-1 of a loopback ring, output in rank<i>.out / .err."""
    hosts = _hostfile(tmp_path, n)
    procs = []
    for r in range(n):
        with open(tmp_path / f"rank{r}.out", "w") as out, open(tmp_path / f"rank{r}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=err, cwd=tmp_path, env=_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hosts))
                )
            )
    return procs


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _adapter(run) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(Path(run) / "adapter_model.safetensors")).items()}


def _records(run) -> list[dict]:
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _train_args(model, data, out, batch_size, *extra) -> list[str]:
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        str(ITERS),
        "--batch-size",
        str(batch_size),
        "--lr",
        str(LR),
        "--seed",
        "1",
        "--set",
        "data.valid_fraction=0.25",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.save_every=2",
        "--set",
        "train.keep_checkpoints=20",
        *extra,
    ]


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    # Summation order differs (two partial sums vs one), which Adam's normalisation turns into
    # ~1e-6 absolute noise in weights of ~1e-1; where a gradient is itself near zero (lora_A's,
    # while lora_B is still near its zero init) Adam divides the noise by that tiny gradient, so a
    # rare element moves by up to ~1e-4 (measured: 1 of 512). A different computation (other rows,
    # a missing reduction) moves every element: each tensor must agree as a whole to 1e-3 and in
    # 99% of its elements to float32 summation noise.
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= 1e-3 * np.linalg.norm(b[k]), k
        close = np.isclose(a[k], b[k], rtol=1e-3, atol=2e-5)
        assert close.mean() >= 0.99, (k, int((~close).sum()), a[k].size)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama", init_std=0.2)  # trains visibly in a few steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("dist_data") / "chat.jsonl", "chat", n=16, seed=2)


@pytest.fixture(scope="module")
def one_rank_run(model, data, tmp_path_factory):
    """The reference: one process, batch 4, in this process."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    args = _train_args(model, data, out, 4)
    from click.testing import CliRunner

    from mlx_lora.commands.cli import cli

    res = CliRunner().invoke(cli, ["train", "--quiet", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


# ----------------------------------------------------------------------------------------------
# the acceptance tests


def test_two_ranks_batch_2_equal_one_rank_batch_4(model, data, one_rank_run, tmp_path):
    """mlx.launch -n 2 --backend ring ... -m mlx_lora train: same loss curve, validation losses
    and adapter as one process with the same global batch; one writer; group-wide numbers."""
    out = tmp_path / "run"
    port = _free_port_pair()
    cmd = [
        str(LAUNCH),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(port),
        "--python",
        sys.executable,
        "-m",
        "mlx_lora",
        "train",
        *_train_args(model, data, out, 2),
        "--distributed",
        "--dist-timeout",
        "300",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=400)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and f"done: {ITERS} steps" in log, log
    assert "Node with rank" not in log  # the launcher saw no rank fail

    ref, got = _records(one_rank_run), _records(out)
    train_ref = [r for r in ref if "loss" in r]
    train_got = [r for r in got if "loss" in r]
    assert [r["step"] for r in train_got] == list(range(1, ITERS + 1))  # one writer, no duplicates
    np.testing.assert_allclose([r["loss"] for r in train_got], [r["loss"] for r in train_ref], rtol=1e-4)
    # tokens are counted for the whole group: equal to the 1-process run's per step
    assert [r["tokens"] for r in train_got] == [r["tokens"] for r in train_ref]
    val_ref = [r["val_loss"] for r in ref if "val_loss" in r]
    val_got = [r["val_loss"] for r in got if "val_loss" in r]
    assert len(val_got) == len(val_ref) == ITERS // 4
    np.testing.assert_allclose(val_got, val_ref, rtol=1e-4)
    _assert_same_adapter(_adapter(out), _adapter(one_rank_run))

    # rank 0 alone reports: one banner, one progress line per step, the group's batch
    assert log.count("step 1/") == 1 and log.count("training  ") == 1
    assert "x 2 ranks = 4 examples/step" in log and "scale-out 2 ranks" in log
    state = json.loads((out / "checkpoints" / f"step-{ITERS:07d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["extra"]["global_batch"] == 4


def test_killed_rank_stops_the_other_and_checkpoint_resumes_on_one_rank(model, data, one_rank_run, tmp_path):
    """SIGKILL one rank mid-run: the other exits promptly with a clear message; the last checkpoint
    resumes on 1 process with batch 4 and ends exactly where the straight 1-process run ends."""
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "mlx_lora",
        "train",
        "--quiet",
        *_train_args(model, data, out, 2),
        "--distributed",
        "--dist-timeout",
        "300",
    ]
    procs = _start_ranks(tmp_path, argv)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists():
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "rank0.err").read_text()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        rc = procs[0].wait(timeout=300)  # a stuck rank only; the message below says how it noticed
    finally:
        _stop(procs)
    err = (tmp_path / "rank0.err").read_text()
    assert rc == dist.EXIT_CODE, err
    assert "lost the connection to another rank" in err and f"--resume {out}" in err, err

    from mlx_lora.training.checkpoints import RunDir

    ckpt = RunDir(out).latest_checkpoint()
    state = json.loads((ckpt / "state.json").read_text())
    assert 2 <= state["step"] < ITERS and state["world_size"] == 2

    # continue on one process with the same global batch (4 = 2 ranks x 2)
    cfg = build(str(out / "config.yaml"), ["train.batch_size=4"])
    result = mlx_lora.train(cfg, resume=True, progress=False)
    assert result.steps == ITERS and result.stopped == "completed"
    _assert_same_adapter(_adapter(out), _adapter(one_rank_run))
    losses = {r["step"]: r["loss"] for r in _records(out) if "loss" in r}
    ref = {r["step"]: r["loss"] for r in _records(one_rank_run) if "loss" in r}
    assert sorted(losses) == list(range(1, ITERS + 1))
    np.testing.assert_allclose([losses[s] for s in ref], list(ref.values()), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# collectives, watchdog and joining, on light processes (mlx.core only)

COLLECTIVES_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import mlx.core as mx
    import numpy as np
    from mlx_lora.training import distributed as dist

    group = dist.init(required=True, timeout_s=120)
    rank = group.rank()
    sync = dist.Collectives(group, timeout_s=float(sys.argv[1]))
    sync.hint = "HINT-TEXT"
    out = {"size": group.size()}
    out["sum"] = sync.sum([1.5 * (rank + 1), rank], "test sum")
    out["json"] = sync.broadcast_json({"from": rank} if rank == 0 else None, "test json")
    rng = np.random.default_rng(rank)
    mine = {"f": mx.array(rng.standard_normal((3, 5)).astype(np.float32)),
            "b": mx.array(rng.standard_normal(7).astype(np.float32)).astype(mx.bfloat16),
            "u": mx.array(np.uint64(2**40 + 7 * rank))}
    got = sync.broadcast_arrays(mine if rank == 0 else None, "test arrays")
    out["arrays"] = {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v).tolist() for k, v in got.items()}
    out["dtypes"] = {k: str(v.dtype) for k, v in got.items()}
    parts = [mx.array(rng.standard_normal(n).astype(np.float32)) for n in (4, 3, 6)]
    summed = dist.all_sum_arrays(parts, group, bucket_bytes=16)
    out["parts"] = [np.array(p).tolist() for p in parts]
    out["summed"] = [np.array(s).tolist() for s in summed]
    out["identical_same"] = sync.identical([mx.arange(4)], "test identical")
    out["identical_diff"] = sync.identical([mx.arange(4) + rank], "test identical")
    from mlx_lora.training.checkpoints import TrainState
    ckpt = None
    if rank == 0:
        opt = {"step": mx.array(np.uint64(5)), "state": {"w": {"m": mx.ones((2, 2)), "v": mx.full((3,), 0.5)}}}
        ckpt = ({"a.lora_A": mx.full((2, 3), 0.25)}, opt, TrainState(step=5, batch_index=2, world_size=2,
                                                                      best_val_loss=1.5, extra={"global_batch": 4}))
    adapter, opt, state = dist.share_checkpoint(ckpt, sync)
    out["ckpt"] = [np.array(adapter["a.lora_A"]).tolist(), int(opt["step"].item()),
                   np.array(opt["state"]["w"]["v"]).tolist(), state.__dict__]
    try:
        dist.check_same_config("a: 1\\nb: %d\\n" % (2 if rank == 0 else 3), sync)
        out["config"] = None
    except dist.DistributedError as e:
        out["config"] = str(e)
    print(json.dumps(out), flush=True)
    if rank == 1:
        time.sleep(600)  # hang: rank 0's next collective must give up on its own
    sync.sum([1.0], "the hang test")
    print("UNREACHABLE", flush=True)
""")


def test_collectives_between_two_processes_and_watchdog(tmp_path):
    timeout = 20.0  # long enough that a peer slowed by a loaded machine is not taken for a hung one
    procs = _start_ranks(tmp_path, [sys.executable, "-c", COLLECTIVES_SCRIPT, str(timeout)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "rank1.out").read_text().strip():
            assert procs[1].poll() is None, (tmp_path / "rank1.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rc0 = procs[0].wait(timeout=300)
        alive = procs[1].poll() is None
    finally:
        _stop(procs)
    err0 = (tmp_path / "rank0.err").read_text()
    out = [json.loads((tmp_path / f"rank{r}.out").read_text().splitlines()[0]) for r in range(2)]

    # the watchdog ended the waiting rank with a message, while its peer was still (hung) alive
    # (the peer sleeps 600 s: alive proves rank 0 gave up on its own, not when the peer came back)
    assert rc0 == dist.EXIT_CODE and alive, err0
    assert "waited 20 s for the other ranks in the hang test" in err0 and "HINT-TEXT" in err0
    assert "UNREACHABLE" not in (tmp_path / "rank0.out").read_text()

    for o in out:
        assert o["size"] == 2
        assert o["sum"] == [1.5 + 3.0, 1.0]
        assert o["json"] == {"from": 0}
        # rank 0's arrays, bit for bit, dtypes kept
        rng0 = np.random.default_rng(0)
        f = rng0.standard_normal((3, 5)).astype(np.float32)
        b = rng0.standard_normal(7).astype(np.float32)
        np.testing.assert_array_equal(np.array(o["arrays"]["f"], np.float32), f)
        b16 = np.array(mx.array(b).astype(mx.bfloat16).astype(mx.float32))
        np.testing.assert_array_equal(np.array(o["arrays"]["b"], np.float32), b16)
        assert o["arrays"]["u"] == 2**40 and o["dtypes"] == {
            "f": "mlx.core.float32",
            "b": "mlx.core.bfloat16",
            "u": "mlx.core.uint64",
        }
        assert o["identical_same"] is True and o["identical_diff"] is False
        adapter, step, v, state = o["ckpt"]  # rank 0's checkpoint, rebuilt on every rank
        assert adapter == [[0.25] * 3] * 2 and step == 5 and v == [0.5] * 3
        assert state["step"] == 5 and state["batch_index"] == 2 and state["best_val_loss"] == 1.5
        assert state["extra"] == {"global_batch": 4}
        assert "rank 1 resolved a different configuration" in o["config"]
    assert "b: 3" in out[1]["config"] and "b: 2" in out[1]["config"]
    # bucketed sums equal the element-wise sums of both ranks' arrays
    for i in range(3):
        expect = np.array(out[0]["parts"][i], np.float32) + np.array(out[1]["parts"][i], np.float32)
        for o in out:
            np.testing.assert_allclose(o["summed"][i], expect, rtol=1e-6)


def test_rank_whose_peer_never_connects_gives_up(tmp_path):
    hosts = _hostfile(tmp_path, 2)
    code = "from mlx_lora.training import distributed as dist; dist.init(timeout_s=2); print('JOINED')"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(MLX_RANK="0", MLX_HOSTFILE=str(hosts)),
    )
    assert res.returncode != 0 and "JOINED" not in res.stdout
    assert "gave up after 2 s waiting for the other ranks to connect" in res.stderr, res.stderr
    assert "127.0.0.1" in res.stderr  # names the hosts it tried


# ----------------------------------------------------------------------------------------------
# in-process helpers


def test_distributed_flag_without_a_launcher_fails_clearly(monkeypatch):
    for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(dist.DistributedError, match="mlx.launch"):
        dist.init(required=True)
    assert dist.init().size() == 1


def test_single_host_mlx_launch_is_explained(monkeypatch, tmp_path):
    empty = tmp_path / "hostfile"
    empty.write_text("\n")  # what mlx.launch -n 1 writes
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(empty))
    with pytest.raises(dist.DistributedError, match="without mlx.launch"):
        dist.init()


def test_launch_backend_from_environment():
    assert dist.launch_backend({}) is None
    assert dist.launch_backend({"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/h"}) == "ring"
    assert dist.launch_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert (
        dist.launch_backend({"MLX_RANK": "0", "MLX_JACCL_COORDINATOR": "10.0.0.1:1", "MLX_IBV_DEVICES": "x"}) == "jaccl"
    )
    assert dist.launch_backend({"MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "10.0.0.1"}) == "nccl"


def test_timeout_resolution(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.resolve_timeout() == dist.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist.TIMEOUT_ENV, "42")
    assert dist.resolve_timeout() == 42.0 and dist.resolve_timeout(7) == 7.0
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(dist.DistributedError, match=dist.TIMEOUT_ENV):
        dist.resolve_timeout()
    with pytest.raises(dist.DistributedError, match="positive"):
        dist.resolve_timeout(0)


@pytest.mark.parametrize("old,new", [(4, 4), (8, 4), (4, 8), (6, 4), (3, 5)])
def test_position_converts_through_examples(old, new):
    for index in range(13):
        seen = index * old  # examples of the epoch already trained on
        j = dist.convert_position(index, old, new)
        # never skip an example; re-read fewer than one new batch
        assert j * new <= seen < (j + 1) * new
    assert dist.convert_position(5, 4, 4) == 5


def test_bucketed_sum_keeps_shapes_values_and_dtypes():
    group = mx.distributed.init()  # one process: the sum is the identity, the packing is not
    rng = np.random.default_rng(0)
    arrays = [mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(2, 3), (5,), (1, 4, 2), ()]]
    arrays.insert(2, mx.array([3, 1, 2], mx.int32))
    for bucket in (1, 24, 10**9):
        out = dist.all_sum_arrays(arrays, group, bucket_bytes=bucket)
        for a, b in zip(arrays, out):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(np.array(a), np.array(b))
    grads = {"x": {"lora_a": arrays[0], "lora_b": arrays[1]}}
    g, n = dist.all_sum_gradients(grads, mx.array(17.0), group)
    assert n.item() == 17.0 and np.array_equal(np.array(g["x"]["lora_b"]), np.array(arrays[1]))


def test_fingerprint_sees_every_bit():
    a = mx.array(np.arange(6, dtype=np.float32))
    flipped = np.arange(6, dtype=np.float32)
    flipped.view(np.uint32)[3] ^= 1  # lowest mantissa bit
    assert dist.fingerprint([a]) == dist.fingerprint([mx.array(np.arange(6, dtype=np.float32))])
    assert dist.fingerprint([a]) != dist.fingerprint([mx.array(flipped)])
    assert dist.fingerprint([a]) != dist.fingerprint([a.reshape(2, 3)])
    assert dist.fingerprint([a.astype(mx.bfloat16)]) != dist.fingerprint([a])


def test_banner_explains_the_group_batch():
    assert dist.batch_lines(2, 2, 1, 1e-4) == []
    lines = dist.batch_lines(2, 2, 3, 1e-4, "ring")
    assert "each rank takes 4 of the 12 examples" in lines[0] and "batch 12" in lines[0]
    assert "batch_size B/3" in lines[1]
