"""Scale out: data-parallel training over several processes or Macs with ``mx.distributed``.

How it works
------------
Every rank holds the whole model and the same adapter. Each optimizer step reads one *global*
batch of ``batch_size x grad_accum x ranks`` examples; rank r takes its own disjoint share of it.
The ranks sum their gradients and target-token counts with one ``all_sum`` inside the compiled
step and divide once by the group's token count, so 2 ranks x ``batch_size: 2`` take exactly the
step of 1 process x ``batch_size: 4`` (up to float rounding; with ``lora.dropout`` > 0 each rank
draws its own masks, so the runs agree statistically, not bit for bit). The all-summed gradient
is the same on every rank, so the adapter and the optimizer state stay identical everywhere
(each checkpoint verifies this with a fingerprint). Only rank 0 writes the run folder, the metrics and the
progress; validation is split over the ranks and reduced. The reported loss, tokens/s and
"examples/step" are those of the whole group.

Two processes on one machine (a check that everything works; little speed-up on a laptop)::

    mlx.launch -n 2 --backend ring --python "$(which python)" -m mlx_lora train --config my.yaml

A ring of Macs
--------------
1. Every Mac needs the same environment at the same path (e.g. ``~/venv`` with ``pip install
   mlx-lora``), the model and the data at the same paths, and password-less ``ssh`` from the Mac
   you launch on to every Mac (System Settings > General > Sharing > Remote Login; then
   ``ssh-copy-id mac2``).
2. Write a hostfile. Over Ethernet or Wi-Fi::

       mlx.distributed_config --over ethernet --hosts mac1,mac2 --output-hostfile hosts.json

   With the Macs cabled in a ring by Thunderbolt, ``--over thunderbolt`` (the default) sets up
   the Thunderbolt bridge addresses as well. The file lists each host's ssh name and its IPs::

       {"backend": "", "envs": [], "hosts": [{"ssh": "mac1", "ips": ["192.168.1.10"]},
                                             {"ssh": "mac2", "ips": ["192.168.1.11"]}]}

   The ring backend needs IP addresses: ``mlx.launch --hosts 192.168.1.10,192.168.1.11``
   works without a hostfile, host *names* do not.
3. Launch from rank 0's Mac (its run folder is the one that gets written)::

       mlx.launch --hostfile hosts.json --backend ring --python ~/venv/bin/python \\
           -m mlx_lora train --config my.yaml --distributed

   ``--distributed`` makes a rank that was not started by a launcher fail at once instead of
   training alone. ``mlx.launch --hosts 192.168.1.10,192.168.1.11 -- ~/venv/bin/mlx-lora train
   ...`` works as well (give the full path: ssh sessions do not activate the venv).

Batch size and learning rate: with ``batch_size: 4`` on 2 ranks each step sees 8 examples. To
reproduce a single-machine run exactly, divide ``batch_size`` by the number of ranks and keep the
learning rate. To use the extra machines for a bigger global batch instead, k times the batch
needs about 1/k of the steps for the same epochs; with Adam raise the learning rate by about
sqrt(k) and check the validation loss.

Resume: ``mlx-lora train --resume runs/NAME`` works with the same or a different number of
ranks. Rank 0 reads the newest complete checkpoint and sends it to the other ranks, so only rank
0's disk needs the run folder (the other Macs need the config file that ``--resume`` reads:
``runs/NAME/config.yaml``, copy it, or pass ``--config``). With an unchanged global batch size the
resumed run takes exactly the steps of an uninterrupted one; with another global batch size it
continues at the same fraction of the epoch.

Failures: a rank that crashes or is killed closes its connections, and the others stop within
about a second with "lost the connection to another rank" (under ``mlx.launch`` the launcher may
stop them first: it prints which rank exited, and rank 0 saves a checkpoint when it is between
two steps). A rank that hangs, or a Mac that drops off the network, is caught by a watchdog: a
rank that waits longer than ``--dist-timeout`` seconds (default 300, or
``MLX_LORA_DIST_TIMEOUT``) for the others, to connect or inside a collective, prints what it was
waiting for and exits with code 3. Checkpoints are written
atomically by rank 0, so the newest one is always complete. ``mlx.launch`` itself stops the
remaining ranks when one exits with an error, but always exits with status 0: check the output.

What speed-up to expect: a step costs ``t_compute / ranks + t_comm`` where ``t_comm`` is about
``2 (ranks - 1) / ranks x 4 bytes x trainable parameters / bandwidth`` (one ring all-reduce of the
float32 LoRA gradients). LoRA gradients are small: r=16 on every linear layer of an 8B Llama is
42M parameters, 168 MB, so with 2 Macs ~0.15 s per step on 10 GbE (1.1 GB/s), under 0.1 s over a
Thunderbolt bridge, ~1.5 s on gigabit Ethernet and several seconds on Wi-Fi. With steps of several
seconds, 2 Macs over Thunderbolt or 10 GbE train close to 2x as fast; over Wi-Fi expect little or
nothing. The slowest Mac sets the pace. Two processes on one machine share its cores and memory
bandwidth, so they are not faster than one: on a 2-core Linux CPU (SmolLM2-135M, LoRA r=8, 4 x 128
tokens per step, another workload competing) 1 process ran at 26 tokens/s and 2 processes at 15.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.training.checkpoints import TrainState

TIMEOUT_ENV = "MLX_LORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
"""How long a rank waits for the others (to connect, or inside one collective) before exiting."""
EXIT_CODE = 3
"""Exit status of a rank that gives up on the others (timeout or lost connection)."""
BUCKET_BYTES = 32 * 1024**2
"""Arrays are concatenated into all_sum calls of about this size: one call per step for LoRA."""

_DTYPES = {
    str(d): d
    for d in (
        mx.bool_,
        mx.uint8,
        mx.uint16,
        mx.uint32,
        mx.uint64,
        mx.int8,
        mx.int16,
        mx.int32,
        mx.int64,
        mx.float16,
        mx.bfloat16,
        mx.float32,
    )
}
_COMM_ERROR_MARKS = ("[ring]", "[mpi]", "[nccl]", "[jaccl]", "connection", "peer")


class DistributedError(MlxLoraError):
    """A rank could not join its group, or lost the other ranks."""

    exit_code = EXIT_CODE


# ----------------------------------------------------------------------------------------------
# joining the group


def launch_backend(env: Optional[dict] = None) -> Optional[str]:
    """The backend a launcher (``mlx.launch``, ``mpirun``) prepared this process for, read from
    its environment; ``None`` when the process was started on its own."""
    env = os.environ if env is None else env
    if env.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    if env.get("NCCL_HOST_IP") or env.get("MLX_WORLD_SIZE"):
        return "nccl"
    if env.get("MLX_HOSTFILE") and env.get("MLX_RANK") is not None:
        return "ring"
    if any(env.get(k) for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return "mpi"
    return None


def resolve_timeout(timeout_s: Optional[float] = None) -> float:
    """``timeout_s`` if given, else ``$MLX_LORA_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`."""
    source = "--dist-timeout"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if not raw:
            return DEFAULT_TIMEOUT_S
        source = TIMEOUT_ENV
        try:
            timeout_s = float(raw)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise DistributedError(f"{source} must be a positive number of seconds, got {timeout_s}")
    return float(timeout_s)


NOT_LAUNCHED = (
    "--distributed: this process was not started by a distributed launcher, so it would train alone. "
    "Start every rank with mlx.launch, e.g. "
    "'mlx.launch --hostfile hosts.json --python \"$(which python)\" -m mlx_lora train ... --distributed' "
    "(or 'mlx.launch -n 2 --backend ring ...' for two local processes), or drop --distributed"
)


def init(required: bool = False, timeout_s: Optional[float] = None) -> mx.distributed.Group:
    """Join the group this process was launched into (a group of 1 when not launched).

    A rank that was launched waits at most ``timeout_s`` (see :func:`resolve_timeout`) for the
    others to connect, then exits with :data:`EXIT_CODE` and a message naming what to check.
    ``mx.distributed.init`` holds the interpreter lock while it connects, so no thread of this
    process could intervene: a tiny guard process does the timing. With ``required``, a group
    of one is an error (the ``--distributed`` flag).
    """
    timeout = resolve_timeout(timeout_s)
    backend = launch_backend()
    if backend is None:
        if required:
            raise DistributedError(NOT_LAUNCHED)
        return mx.distributed.init()
    where = ""
    if backend == "ring":
        where = _ring_hosts()
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    message = (
        f"mlx-lora: rank {rank} gave up after {timeout:g} s waiting for the other ranks to connect "
        f"({backend} backend{where}). Check that every host runs the same command with the same "
        f"environment, that the addresses and ports are reachable from every host (firewall, "
        f"VPN), and look for another rank's error; raise the limit with --dist-timeout."
    )
    try:
        with _InitGuard(timeout, message):
            group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"rank {rank} could not join the {backend} group{where}: {e}") from None
    if required and group.size() < 2:
        raise DistributedError(NOT_LAUNCHED)
    return group


def _ring_hosts() -> str:
    path = os.environ.get("MLX_HOSTFILE", "")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DistributedError(f"MLX_HOSTFILE={path}: cannot read the ring hostfile ({e})") from None
    if not text.strip():
        # mlx.launch writes an empty hostfile for a single host, which mx.distributed rejects.
        raise DistributedError(
            "launched by mlx.launch on a single host: run 'mlx-lora train' without mlx.launch for one "
            "process, or launch 2 or more ranks (-n 2, or several --hosts)"
        )
    try:
        hosts = json.loads(text)
        return ", hosts " + " ".join(",".join(h) if isinstance(h, list) else str(h) for h in hosts)
    except (ValueError, TypeError):
        raise DistributedError(f"MLX_HOSTFILE={path}: the ring hostfile is not valid JSON") from None


_GUARD_CODE = r"""
import os, select, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + timeout
while True:
    left = end - time.monotonic()
    if left <= 0:
        break
    ready, _, _ = select.select([0], [], [], left)
    if ready and not os.read(0, 64):
        sys.exit(0)  # the watched process finished its wait (or died): stand down
sys.stderr.write(message + "\n")
sys.stderr.flush()
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        break
    time.sleep(wait)
"""


class _InitGuard:
    """A child process that ends this one with ``message`` unless the ``with`` block finishes
    within ``timeout`` seconds. It stands down when this process closes the pipe or dies."""

    def __init__(self, timeout: float, message: str):
        self.timeout, self.message, self.proc = timeout, message, None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARD_CODE, str(os.getpid()), repr(self.timeout), self.message],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError:
            self.proc = None  # no guard is better than no training; the launcher still watches
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return False


# ----------------------------------------------------------------------------------------------
# collectives with a watchdog


class _WatchState:
    __slots__ = ("since", "what", "hint", "rank", "size", "timeout", "stop")


def _watch(state: _WatchState) -> None:
    poll = min(1.0, max(state.timeout / 20, 0.05))
    while not state.stop.wait(poll):
        since = state.since
        if since is not None and time.monotonic() - since > state.timeout:
            msg = (
                f"mlx-lora: rank {state.rank} of {state.size} waited {state.timeout:g} s for the other ranks "
                f"in {state.what} and got no answer: a rank hangs, died, or lost the network (see its "
                f"output). Exiting so the job does not hang forever.{state.hint} Raise the limit with "
                f"--dist-timeout if a rank is just slow (e.g. tokenizing a big data set).\n"
            )
            try:
                os.write(2, msg.encode())
            except OSError:
                pass
            # The main thread is blocked inside a collective that nothing can interrupt; ending the
            # process is the only way out (checkpoints are atomic, so nothing is left half-written).
            os._exit(EXIT_CODE)


class Collectives:
    """The collective operations training uses, on ``group``, each guarded by a watchdog.

    While a rank is inside a collective, a background thread checks how long it has waited; past
    ``timeout_s`` it prints what the rank was waiting for (plus :attr:`hint`) and ends the
    process with :data:`EXIT_CODE`. A collective that fails because a peer closed its connection
    raises :class:`DistributedError`. With a group of one every method is a plain local operation.
    """

    def __init__(self, group: mx.distributed.Group, timeout_s: Optional[float] = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.timeout_s = resolve_timeout(timeout_s)
        st = self._state = _WatchState()
        st.since, st.what, st.hint = None, "", ""
        st.rank, st.size, st.timeout, st.stop = self.rank, self.size, self.timeout_s, threading.Event()
        if self.size > 1:
            # The thread sees only the state, so dropping this object stops it.
            threading.Thread(target=_watch, args=(st,), name="mlx-lora-watchdog", daemon=True).start()
            weakref.finalize(self, st.stop.set)

    @property
    def hint(self) -> str:
        """Appended to failure messages, e.g. how to resume."""
        return self._state.hint.strip()

    @hint.setter
    def hint(self, text: str) -> None:
        self._state.hint = f" {text}" if text else ""

    def close(self) -> None:
        self._state.stop.set()

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Run the block as one collective wait named ``what`` (shown if it fails)."""
        if self.size == 1:
            yield
            return
        st = self._state
        st.what, st.since = what, time.monotonic()
        try:
            yield
        except RuntimeError as e:
            text = str(e)
            if not any(mark in text.lower() for mark in _COMM_ERROR_MARKS):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.size} lost the connection to another rank in {what} ({text}): that "
                f"rank crashed, was stopped, or its machine left the network; see its output.{st.hint}"
            ) from None
        finally:
            st.since = None

    def eval(self, *trees, what: str) -> None:
        """``mx.eval`` of a computation that contains collectives (e.g. the compiled update)."""
        with self.waiting(what):
            mx.eval(*trees)

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Sum each float over the ranks (float32), in one call."""
        values = [float(v) for v in values]
        if self.size == 1:
            return values
        with self.waiting(what):
            return mx.distributed.all_sum(mx.array(values, mx.float32), group=self.group, stream=mx.cpu).tolist()

    def broadcast_json(self, obj, what: str):
        """Rank 0's JSON-serialisable ``obj`` on every rank (others pass anything, e.g. None)."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        with self.waiting(what):
            n = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=self.group, stream=mx.cpu).item()
            buf = mx.array(np.frombuffer(data, np.uint8)) if self.rank == 0 else mx.zeros((n,), mx.uint8)
            out = mx.distributed.all_sum(buf, group=self.group, stream=mx.cpu)
            mx.eval(out)
        return json.loads(bytes(np.array(out)).decode())

    def broadcast_arrays(self, arrays: Optional[dict], what: str) -> dict:
        """Rank 0's ``{name: array}`` on every rank, bit for bit (the others add zeros)."""
        if self.size == 1:
            return arrays
        meta = self.broadcast_json(
            [[k, list(v.shape), str(v.dtype)] for k, v in arrays.items()] if self.rank == 0 else None, what
        )
        if self.rank == 0:
            values = [arrays[k] for k, _, _ in meta]
        else:
            values = [mx.zeros(tuple(shape), _DTYPES[dtype]) for _, shape, dtype in meta]
        with self.waiting(what):
            values = all_sum_arrays(values, self.group, stream=mx.cpu)
            mx.eval(values)
        return {k: v for (k, _, _), v in zip(meta, values)}

    def broadcast_parameters(self, model, what: str = "sharing the initial adapter") -> None:
        """Give every rank rank 0's trainable parameters (so ranks start identical whatever
        their random number generators did)."""
        if self.size == 1:
            return
        params = dict(tree_flatten(model.trainable_parameters()))
        model.update(tree_unflatten(list(self.broadcast_arrays(params, what).items())))

    def identical(self, arrays: Sequence[mx.array], what: str) -> bool:
        """Whether ``arrays`` are bit-identical on every rank (compares fingerprints, not data)."""
        if self.size == 1:
            return True
        digest = np.frombuffer(fingerprint(arrays), np.uint8).astype(np.int32)
        table = np.zeros((self.size, digest.size), np.int32)
        table[self.rank] = digest
        with self.waiting(what):
            table = np.array(mx.distributed.all_sum(mx.array(table), group=self.group, stream=mx.cpu))
        return bool((table == table[0]).all())


def fingerprint(arrays: Sequence[mx.array]) -> bytes:
    """A 16-byte digest of the arrays' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        # numpy has no bfloat16; widening to float32 is exact, so the digest still sees every bit
        h.update(np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).tobytes())
    return h.digest()


# ----------------------------------------------------------------------------------------------
# gradients and positions


def all_sum_arrays(
    arrays: Sequence[mx.array], group: mx.distributed.Group, bucket_bytes: int = BUCKET_BYTES, stream=None
) -> list[mx.array]:
    """Sum each array over the ranks with few collective calls: arrays of one dtype are flattened
    and concatenated into buckets of about ``bucket_bytes``, summed, and split back. Traceable,
    so it can sit inside ``mx.compile``. The sum is element-wise, so grouping changes no value."""
    out: list[Optional[mx.array]] = [None] * len(arrays)
    by_dtype: dict = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        buckets, current, size = [], [], 0
        for i in idx:
            current.append(i)
            size += arrays[i].size * dtype.size
            if size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        for bucket in buckets:
            if len(bucket) == 1:
                i = bucket[0]
                out[i] = mx.distributed.all_sum(arrays[i], group=group, stream=stream)
                continue
            flat = mx.concatenate([arrays[i].reshape(-1) for i in bucket])
            total = mx.distributed.all_sum(flat, group=group, stream=stream)
            offsets = np.cumsum([arrays[i].size for i in bucket])[:-1].tolist()
            for i, part in zip(bucket, mx.split(total, offsets)):
                out[i] = part.reshape(arrays[i].shape)
    return out


def all_sum_gradients(grads, ntoks: mx.array, group: mx.distributed.Group):
    """(grads summed over ranks, ntoks summed over ranks), in one collective call for LoRA-sized
    gradients. Traceable (used inside the compiled update)."""
    flat = tree_flatten(grads)
    summed = all_sum_arrays([g for _, g in flat] + [ntoks.astype(mx.float32).reshape(1)], group)
    grads = tree_unflatten([(k, v) for (k, _), v in zip(flat, summed)])
    return grads, summed[-1].reshape(ntoks.shape).astype(ntoks.dtype)


def convert_position(batch_index: int, old_global_batch: int, new_global_batch: int) -> int:
    """The next global batch when a run that stopped before global batch ``batch_index`` (of
    ``old_global_batch`` examples) continues with ``new_global_batch`` examples per step.

    The position in examples, ``batch_index * old_global_batch``, is kept, rounded down to a whole
    new batch: examples are re-read rather than skipped. With equal batch sizes the index is
    unchanged, and so is the data order (it depends on the global batch size only)."""
    if old_global_batch < 1 or new_global_batch < 1 or batch_index < 0:
        raise ValueError(f"bad position: batch {batch_index}, global batch {old_global_batch} -> {new_global_batch}")
    return (batch_index * old_global_batch) // new_global_batch


def share_checkpoint(loaded, sync: Collectives):
    """Rank 0's ``(adapter, optimizer state, TrainState)`` on every rank; other ranks pass None.

    Only rank 0 reads the run folder, so the other machines need no copy of it, and every rank
    resumes from the very same bits."""
    if sync.size == 1:
        return loaded

    what = "sharing the checkpoint from rank 0"
    adapter, opt, state = loaded if sync.rank == 0 else (None, None, None)
    adapter = sync.broadcast_arrays(adapter, what)
    opt = sync.broadcast_arrays(dict(tree_flatten(opt)) if sync.rank == 0 else None, what)
    fields = sync.broadcast_json(dict(state.__dict__) if sync.rank == 0 else None, what)
    return adapter, tree_unflatten(list(opt.items())), TrainState(**fields)


def check_same_config(text: str, sync: Collectives) -> None:
    """Raise on every rank unless all ranks run with the same resolved config ``text`` (YAML).

    Ranks with different batch sizes or LoRA shapes would exchange mismatched gradients, which
    hangs or silently trains garbage; a different data file breaks the shared batch order."""
    if sync.size == 1:
        return

    what = "comparing the configurations of the ranks"
    reference = sync.broadcast_json(text if sync.rank == 0 else None, what)
    mine = reference != text
    flags = sync.sum([1.0 if (mine and r == sync.rank) else 0.0 for r in range(sync.size)], what)
    differing = [r for r, f in enumerate(flags) if f]
    if not differing:
        return
    detail = ""
    if mine:
        lines = [
            l
            for l in difflib.unified_diff(reference.splitlines(), text.splitlines(), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---"))
        ]
        detail = " Here (rank {}) vs rank 0: {}.".format(sync.rank, "; ".join(lines[:8]))
    raise DistributedError(
        f"rank{'s' if len(differing) > 1 else ''} {', '.join(map(str, differing))} resolved a different "
        f"configuration than rank 0; every rank must run the same command with the same config file.{detail}"
    )


def batch_lines(batch_size: int, grad_accum: int, world: int, lr: float, backend: str = "") -> list[str]:
    """Banner lines that explain the group's effective batch and the learning-rate guidance."""
    if world < 2:
        return []
    per_rank = batch_size * grad_accum
    total = per_rank * world
    via = f" ({backend})" if backend else ""
    return [
        f"scale-out {world} ranks{via}: each rank takes {per_rank} of the {total} examples of every step; "
        f"a step equals one process with batch {total} (same lr {lr:g})",
        f"          to reproduce a 1-process run of batch B use batch_size B/{world}; a k-times larger "
        f"global batch needs ~1/k the iters, and Adam ~sqrt(k) x the lr",
    ]
