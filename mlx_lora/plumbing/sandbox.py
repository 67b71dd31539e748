"""Run untrusted Python (a model's generated code and a row's tests) in a subprocess that cannot
hang the caller, reach the network or fill the disk.

Each run gets a fresh temporary folder as its working directory and home, an environment with
nothing but ``PATH`` and a locale, Python's isolated mode (``-I``: no ``PYTHON*`` variables, no
user site-packages, the script's folder not on ``sys.path``), and:

- **no network**: a new, empty network namespace (``unshare -n``, or ``unshare -rn`` as an
  unprivileged user) when the kernel allows it; in every case a prelude that replaces the socket
  functions that open connections with ones that raise, before the code runs;
- **limits** (``resource.setrlimit`` where the OS has it): CPU seconds, address space, file size,
  open files, no core dumps;
- **a timeout**: past it the whole process group is killed. A timeout, a crash or any non-zero
  exit status is a failure, never an exception in the caller.

The prelude is a belt to ``unshare``'s braces: code can reach ``_socket`` itself, so the
namespace is what stops a determined program where it is available. This is not a container:
the program can read (and write) whatever files the user can outside its folder.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    import resource
except ImportError:  # Windows
    resource = None

DEFAULT_TIMEOUT_S = 10.0
MEMORY_BYTES = 2 << 30   # address space: generous for tests, small enough that a runaway list fails fast
FILE_BYTES = 64 << 20    # largest file the code may write
OPEN_FILES = 256
OUTPUT_CHARS = 2000      # how much of stdout/stderr a result keeps

# Runs before the code: no socket can connect, bind, send to an address or resolve a name.
PRELUDE = r"""
import socket as _s, sys as _sys, runpy as _runpy
def _no_network(*args, **kwargs):
    raise OSError(101, "network access is disabled in this sandbox")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(_s.socket, _name, _no_network)
_s.create_connection = _s.create_server = _s.getaddrinfo = _s.gethostbyname = _s.gethostbyname_ex = _no_network
_s.socketpair = _s.fromfd = _no_network
del _s
_sys.argv = _sys.argv[1:]
_runpy.run_path(_sys.argv[0], run_name="__main__")
"""


@dataclass
class RunResult:
    passed: bool
    """Exit status 0 within the timeout."""
    status: str
    """"passed", "failed" (non-zero exit), "timeout" or "crashed" (killed by a signal)."""
    returncode: Optional[int]
    output: str
    """The end of stdout and stderr together (at most OUTPUT_CHARS characters)."""
    seconds: float


@functools.lru_cache(maxsize=None)
def network_isolation() -> Optional[list[str]]:
    """The command prefix that starts a process in an empty network namespace here, or None when
    the kernel or the user cannot have one (the socket prelude then stands alone)."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    for prefix in ([unshare, "-n"], [unshare, "-rn"]):
        try:
            if subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _limits(cpu_s: int, memory: int) -> None:
    """Runs in the child between fork and exec: nothing here may import (another thread of the
    parent may have held the import lock at the fork)."""
    if resource is None:  # not on this OS
        return
    for name, value in (("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory), ("RLIMIT_FSIZE", FILE_BYTES),
                        ("RLIMIT_NOFILE", OPEN_FILES), ("RLIMIT_CORE", 0)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # a hard limit already lower than ours stays


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * OUTPUT_CHARS))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-OUTPUT_CHARS:]


def run_python(source: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = MEMORY_BYTES,
               isolate_network: bool = True) -> RunResult:
    """Run the Python program ``source`` under the rules above; never raises for what the program
    does (an OSError starting the interpreter itself does raise)."""
    import time

    prefix = (network_isolation() or []) if isolate_network else []
    with tempfile.TemporaryDirectory(prefix="mlx-lora-sandbox-") as tmp:
        folder = Path(tmp)
        script, log = folder / "main.py", folder / "output.txt"
        script.write_text(source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "TMPDIR": str(folder), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = prefix + [sys.executable, "-I", "-c", PRELUDE, str(script)]
        preexec = (lambda: _limits(int(timeout_s) + 2, memory_bytes)) if os.name == "posix" else None
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
            try:
                code = proc.wait(timeout=timeout_s)
                status = "passed" if code == 0 else "crashed" if code < 0 else "failed"
            except subprocess.TimeoutExpired:
                code, status = None, "timeout"
            finally:
                # The whole group: code that started children must not leave them running.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        return RunResult(status == "passed", status, code, _tail(log), time.perf_counter() - t0)
