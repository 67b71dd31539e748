"""Ctrl-C in an interactive command reaches the main thread at once, wherever the signal lands.

Python runs a signal's handler only when the main thread looks for it: when a blocking call
returns with EINTR. A SIGINT that the kernel hands to another thread (the generation engine's, a
BLAS worker's), or that arrives just before the main thread blocks (``input()`` prints its prompt,
then waits), would otherwise sit pending while the prompt waits for another key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from mlx_lora.plumbing.interrupts import ctrl_c_on_terminal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job or a CI runner starts us
    with ctrl_c_on_terminal():
        go = threading.Event()
        threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGINT))).start()
        # The main thread blocks SIGINT, so the kernel delivers it to another thread: the main
        # thread's read never returns with EINTR by itself.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        print("waiting", flush=True)
        try:
            go.set()
            sys.stdin.readline()  # nothing is ever written
            print("read returned")
        except KeyboardInterrupt:
            print("interrupted")
    print("handlers restored:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
          signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)
    """
)


def test_a_ctrl_c_delivered_to_another_thread_interrupts_a_blocked_read():
    env = dict(os.environ, PYTHONPATH=str(REPO), MLX_LORA_NO_BLAS_REEXEC="1")
    r, w = os.pipe()  # stdin: open, never written, so readline() blocks until interrupted
    try:
        # The timeout only ends a truly stuck child; a working one answers in milliseconds.
        done = subprocess.run(
            [sys.executable, "-c", CHILD], stdin=r, capture_output=True, text=True, env=env, timeout=300
        )
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["waiting", "interrupted", "handlers restored: True True"], done.stdout
