"""Run untrusted Python (a model's generated code and a row's tests) where it can neither harm the
caller nor outlive its run.

On Linux each run gets its own user, PID, mount, network, IPC and UTS namespaces, through
``bwrap`` (bubblewrap) when it is installed, else util-linux ``unshare`` plus the mount setup below
(:data:`INIT`). Inside, the program sees:

- a root made only of what Python needs, read-only: ``/usr``, ``/bin``, ``/lib*``, a few files of
  ``/etc`` and the Python installation (never ``/tmp``, ``/run``, ``/var``, ``/home`` or the
  caller's folders, so no filesystem socket outside is reachable);
- a fresh ``/proc`` of its own PID namespace (the caller's processes do not exist there), a minimal
  ``/dev`` and a private tmpfs of ``tmpfs_bytes`` at ``/tmp``: the only writable place (working
  folder, ``HOME``, ``TMPDIR`` and ``/dev/shm``);
- an environment of a few fixed variables (nothing of the caller's), no capabilities, no new
  privileges and no nested user namespaces;
- the rlimits (CPU seconds, address space, file size, open files, no core dumps) and the timeout.

A small init process (:data:`INIT`) is PID 1 of the namespace: it starts the program, waits for it
(or for the timeout) and exits, and the kernel then kills every process left in the namespace
before the run returns; ``--die-with-parent`` / ``--kill-child`` and a parent-death signal on
bwrap / unshare do the same if the caller dies.

On macOS ``sandbox-exec`` runs the program under a profile (:func:`macos_profile`) that denies
network and writes outside its folder. Where neither works the level is ``none``: the program
runs as a plain subprocess (the old rlimits, timeout and socket prelude) and ``eval --generate
--metric pass@1`` requires ``--unsafe-exec`` (:func:`require_isolation`). ``MLX_LORA_SANDBOX``
(``auto``, ``bwrap``, ``unshare``, ``sandbox-exec`` or ``none``) picks a level. What is and is not
contained, each claim with its test: docs/sandbox.md.

A timeout, a crash or any non-zero exit status is a failure result, never an exception in the
caller.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlx_lora.plumbing.errors import MlxLoraError

try:
    import resource
except ImportError:  # Windows
    resource = None

logger = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1

DEFAULT_TIMEOUT_S = 10.0
MEMORY_BYTES = 2 << 30  # address space: generous for tests, small enough that a runaway list fails fast
FILE_BYTES = 64 << 20  # largest file the code may write
OPEN_FILES = 256
OUTPUT_CHARS = 2000  # how much of stdout/stderr a result keeps
TMPFS_BYTES = 256 << 20  # the private tmpfs: all the code may write, together
TMPFS_INODES = 16384  # files in it (unshare backend; bubblewrap offers no such option)
STARTUP_GRACE_S = 60.0  # the caller's own deadline past the timeout, in case the init itself is stuck
PROBE_TIMEOUT_S = 60.0

ENV_VAR = "MLX_LORA_SANDBOX"
BACKENDS = ("bwrap", "unshare", "sandbox-exec", "none")
WORK = "/tmp"  # the program's folder inside the namespaces
ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": WORK,
    "TMPDIR": WORK,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
}
HOW_TO_ISOLATE = (
    "install bubblewrap (apt-get install bubblewrap) or enable unprivileged user namespaces "
    "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces), or pass --unsafe-exec "
    "to run it without isolation"
)

# Read-only inside: the system folders Python and its libraries live in, and these files of /etc.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/nix/store", "/gnu/store")
ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "protocols",
    "services",
    "alternatives",
    "os-release",
    "mime.types",
)
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("shm", WORK),
)
"""/dev/shm (POSIX semaphores, multiprocessing) is the tmpfs: one writable place, one size limit."""
PIVOT_ROOT = {
    "x86_64": 155,
    "amd64": 155,
    "aarch64": 41,
    "arm64": 41,
    "riscv64": 41,
    "loongarch64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
    "i386": 217,
    "i686": 217,
    "armv7l": 218,
}
"""The pivot_root system call's number per machine (glibc has no wrapper); elsewhere: chroot."""

# Runs before the code: no socket can connect, bind, send to an address or resolve a name (a belt
# where the network namespace is the braces, and all there is at the level "none").
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

# PID 1 of the namespaces, run by the caller's Python in isolated mode without site (-I -S).
# Reads the program from stdin; with the unshare backend builds the root first (bubblewrap has
# built it); drops every privilege; starts the program; reports "ready", then "exit N" (N < 0: killed
# by signal -N) or "timeout" on the status pipe; and exits, which kills whatever is left.
INIT = r"""
import ctypes, json, os, re, resource, signal, sys, time
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
os.set_inheritable(status, False)
source = sys.stdin.buffer.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))

check(libc.prctl(4, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")  # the program cannot trace or read this process
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NOATIME, NODIRATIME, RELATIME, STRICTATIME = 1024, 2048, 1 << 21, 1 << 24

def mount(src, dst, fstype, flags, data=None):
    b = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(b(src), b(dst), b(fstype), flags, b(data)), "mount %s on %s" % (src, dst))

def kept(path):
    # a remount may not clear the flags a mount inherited from the caller's namespace
    f = os.statvfs(path).f_flag
    flags = sum(m for st, m in ((2, NOSUID), (4, NODEV), (8, NOEXEC), (2048, NODIRATIME)) if f & st)
    return flags | (NOATIME if f & 1024 else RELATIME if f & 4096 else STRICTATIME)

def mounts_under(top):
    with open("/proc/self/mountinfo", "rb") as f:
        points = [re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4])
                  for line in f]
    return sorted({p for p in map(os.fsdecode, points) if p == top or p.startswith(top + "/")})

def bind_read_only(src, dst):
    mount(src, dst, None, BIND | REC)
    for point in mounts_under(dst):  # the bound folder and every mount below it
        mount(None, point, None, REMOUNT | BIND | RDONLY | kept(point))

def build_root(root):
    mount(None, "/", None, REC | PRIVATE)  # nothing mounted here reaches the caller's namespace
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=0755")
    # The writable tmpfs first: a Python installed below its path stays visible, bound on top.
    os.makedirs(root + cfg["work"], exist_ok=True)
    mount("tmpfs", root + cfg["work"], "tmpfs", NOSUID | NODEV,
          "size=%d,nr_inodes=%d,mode=1777" % (cfg["tmpfs_bytes"], cfg["tmpfs_inodes"]))
    for kind, dst, src in cfg["binds"]:
        path = root + dst
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "symlink":
            os.symlink(src, path)
            continue
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
        else:
            open(path, "a").close()
        bind_read_only(src, path)
    os.mkdir(root + "/proc")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    with open(root + "/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")  # this namespace's own limit: the program cannot make one and be root in it
    os.mkdir(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,mode=0755")
    for name in cfg["devices"]:
        open(root + "/dev/" + name, "a").close()
        mount("/dev/" + name, root + "/dev/" + name, None, BIND)
    for name, target in cfg["dev_links"]:
        os.symlink(target, root + "/dev/" + name)
    mount(None, root + "/dev", None, REMOUNT | BIND | RDONLY | NOSUID | NOEXEC)
    os.chdir(root)
    if cfg["pivot_root"]:  # the caller's root leaves this namespace altogether
        check(libc.syscall(cfg["pivot_root"], b".", b"."), "pivot_root")
        check(libc.umount2(b".", 2), "umount the old root")
    else:
        os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    check(libc.prctl(28, 3, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")  # root gains no capability at exec
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL (older kernels have no ambient set)

if cfg["backend"] == "unshare":
    build_root(cfg["root"])
check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
with open(cfg["work"] + "/main.py", "wb") as f:
    f.write(source)

# No handler the program could trigger: PID 1 ignores signals from its own namespace unless it
# handles them, so SIGINT is ignored and SIGCHLD blocked (read with sigtimedwait); the timeout is
# a monotonic deadline, not an alarm.
try:
    os.setsid()  # kill(0, ...) from the program reaches only the namespace
except OSError:
    pass  # bubblewrap's --new-session made it a session leader already
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
os.write(status, b"ready\n")
pid = os.fork()
if pid == 0:
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        os.closerange(3, 1 << 16)
        os.chdir(cfg["work"])
        for name, value in cfg["limits"]:
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass  # a hard limit already lower than ours stays
        python = cfg["python"]
        os.execve(python, [python, "-I", "-c", cfg["prelude"], cfg["work"] + "/main.py"], cfg["env"])
    except BaseException as e:
        os.write(2, ("sandbox: cannot start the program: %r\n" % (e,)).encode())
    os._exit(127)
deadline = time.monotonic() + cfg["timeout_s"]
verdict = None
while verdict is None:
    while True:  # reap every child that ended: the program, and orphans the kernel hands to PID 1
        try:
            done, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if done == 0:
            break
        if done == pid:
            verdict = b"exit %d" % os.waitstatus_to_exitcode(st)
    if verdict is None:
        left = deadline - time.monotonic()
        if left <= 0:
            verdict = b"timeout"
        else:
            signal.sigtimedwait({signal.SIGCHLD}, left)
os.write(status, verdict + b"\n")
os._exit(0)
"""


@dataclass
class RunResult:
    passed: bool
    """Exit status 0 within the timeout."""
    status: str
    """"passed", "failed" (non-zero exit), "timeout", "crashed" (killed by a signal) or "error" (the
    sandbox itself could not start; logged)."""
    returncode: Optional[int]
    output: str
    """The end of stdout and stderr together (at most OUTPUT_CHARS characters)."""
    seconds: float


@dataclass(frozen=True)
class Containment:
    """Where :func:`run_python` runs code on this machine."""

    backend: str
    """One of :data:`BACKENDS`."""
    description: str
    """One line for ``mlx-lora doctor`` and the eval log."""

    @property
    def contained(self) -> bool:
        return self.backend != "none"


def describe(backend: str, why: str = "", tmpfs_bytes: int = TMPFS_BYTES) -> str:
    """The one-line description of a containment level."""
    if backend in ("bwrap", "unshare"):
        name = "bubblewrap" if backend == "bwrap" else "unshare"
        return (
            f"{name} (user, pid, mount, net namespaces; read-only root; {tmpfs_bytes >> 20} MiB tmpfs; "
            f"all processes killed at the end)"
        )
    if backend == "sandbox-exec":
        return "sandbox-exec (no network; writes only in its own folder; reads and processes not contained)"
    return "none: pass@1 needs --unsafe-exec" + (f" ({why})" if why else "")


# ---------------------------------------------------------------------------------------------
# choosing a level


def containment(backend: Optional[str] = None) -> Containment:
    """The level ``run_python`` uses: ``backend`` if given, else ``$MLX_LORA_SANDBOX`` if set,
    else the first of bwrap, unshare (Linux) or sandbox-exec (macOS) that runs a program here.
    Naming a backend that does not work here raises :class:`MlxLoraError`."""
    wanted = backend or os.environ.get(ENV_VAR) or "auto"
    if wanted not in BACKENDS + ("auto",):
        raise MlxLoraError(f"{ENV_VAR}={wanted!r}: expected one of auto, {', '.join(BACKENDS)}")
    if wanted == "none":
        return Containment("none", describe("none", f"{ENV_VAR}=none" if not backend else "asked for"))
    if wanted != "auto":
        why = probe(wanted)
        if why:
            raise MlxLoraError(f"sandbox {wanted} does not work here: {why}")
        return Containment(wanted, describe(wanted))
    candidates = (
        ("bwrap", "unshare")
        if sys.platform.startswith("linux")
        else ("sandbox-exec",)
        if sys.platform == "darwin"
        else ()
    )
    reasons = []
    for b in candidates:
        why = probe(b)
        if not why:
            return Containment(b, describe(b))
        reasons.append(f"{b}: {why}")
    return Containment("none", describe("none", "; ".join(reasons) or f"no sandbox on {sys.platform}"))


@functools.lru_cache(maxsize=None)
def probe(backend: str) -> str:
    """Why ``backend`` cannot run a program here, or "" when it can (a real run, cached)."""
    tool = {"bwrap": "bwrap", "unshare": "unshare", "sandbox-exec": "sandbox-exec"}.get(backend)
    if tool is None:
        return f"unknown sandbox {backend!r}"
    if shutil.which(tool) is None:
        return f"no {tool} command"
    if backend in ("bwrap", "unshare") and not sys.platform.startswith("linux"):
        return "Linux only"
    try:
        r = _run(backend, "print('ok')", PROBE_TIMEOUT_S, MEMORY_BYTES, TMPFS_BYTES)
    except OSError as e:
        return str(e)
    if r.passed and r.output.strip() == "ok":
        return ""
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    return f"a test program {r.status}" + (f": {lines[-1][:200]}" if lines else "")


def require_isolation(unsafe_exec: bool) -> Containment:
    """The level for running untrusted code; refuses (one line saying how to get isolation) when
    there is none and ``unsafe_exec`` is not given."""
    level = containment()
    if not level.contained and not unsafe_exec:
        why = level.description.partition("(")[2].rstrip(")")
        raise MlxLoraError(
            f"pass@1 runs each row's code and this machine offers no sandbox for it"
            f"{f' ({why})' if why else ''}: {HOW_TO_ISOLATE}"
        )
    return level


# ---------------------------------------------------------------------------------------------
# running


def run_python(
    source: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = MEMORY_BYTES,
    isolate_network: bool = True,
    backend: Optional[str] = None,
    tmpfs_bytes: int = TMPFS_BYTES,
) -> RunResult:
    """Run the Python program ``source`` at the containment level :func:`containment` picks (or
    ``backend``); never raises for what the program does. ``isolate_network`` matters only at the
    level "none" (elsewhere the network namespace is always empty)."""
    level = containment(backend)
    if not level.contained:
        _warn_unconfined(level.description)
    return _run(level.backend, source, timeout_s, memory_bytes, tmpfs_bytes, isolate_network=isolate_network)


@functools.lru_cache(maxsize=None)
def _warn_unconfined(description: str) -> None:
    logger.warning("running untrusted code without isolation (sandbox: %s)", description)


def _run(
    backend: str, source: str, timeout_s: float, memory_bytes: int, tmpfs_bytes: int, *, isolate_network: bool = True
) -> RunResult:
    if backend in ("bwrap", "unshare"):
        return _run_namespaced(backend, source, timeout_s, memory_bytes, tmpfs_bytes)
    return _run_process_group(
        source, timeout_s, memory_bytes, sandbox_exec=backend == "sandbox-exec", isolate_network=isolate_network
    )


def _limits(cpu_s: int, memory: int) -> list[tuple[str, int]]:
    return [
        ("RLIMIT_CPU", cpu_s),
        ("RLIMIT_AS", memory),
        ("RLIMIT_FSIZE", FILE_BYTES),
        ("RLIMIT_NOFILE", OPEN_FILES),
        ("RLIMIT_CORE", 0),
    ]


def _binds() -> list[tuple[str, str, str]]:
    """(kind, path inside, path outside) for the read-only root: "dir", "file" or "symlink" (then
    the third item is the link's target)."""
    out: list[tuple[str, str, str]] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            out.append(("symlink", d, os.readlink(d)))
        elif os.path.isdir(d):
            out.append(("dir", d, d))
    for name in ETC_FILES:
        p = f"/etc/{name}"
        if os.path.exists(p):
            out.append(("dir" if os.path.isdir(p) else "file", p, os.path.realpath(p)))
    # The Python installation, at its own path and (when a link leads there) at its real path.
    pythons = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.dirname(sys.executable)),
        os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
    }
    home = os.path.realpath(os.path.expanduser("~"))
    for prefix in sorted(pythons):
        real = os.path.realpath(prefix)
        # A Python installed straight into the home folder (or /): only its bin and lib folders.
        parts = (
            [""] if real != home and not (home + "/").startswith(real.rstrip("/") + "/") else ["/bin", "/lib", "/lib64"]
        )
        for part in parts:
            for inside in sorted({os.path.abspath(prefix) + part, real + part}):
                out.append(("dir", inside, real + part))

    def covered(path: str, by: list[tuple[str, str, str]]) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for k, d, _ in by if k != "file")

    kept: list[tuple[str, str, str]] = []
    for entry in sorted(out, key=lambda e: (e[1].count("/"), e[1])):
        if (
            entry[1] != "/"
            and os.path.exists(entry[2] if entry[0] != "symlink" else entry[1])
            and not covered(entry[1], kept)
        ):
            kept.append(entry)
    return kept


def _command(backend: str, cfg: dict) -> list[str]:
    python = sys.executable
    init = [python, "-I", "-S", "-c", INIT, json.dumps(cfg)]
    if backend == "unshare":
        return [
            shutil.which("unshare") or "unshare",
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--net",
            "--ipc",
            "--uts",
        ] + init
    cmd = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--as-pid-1",
        "--new-session",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--clearenv",
        # the writable tmpfs first: a Python installed below its path stays visible, bound on top
        "--size",
        str(cfg["tmpfs_bytes"]),
        "--tmpfs",
        WORK,
    ]
    for kind, dst, src in cfg["binds"]:
        cmd += ["--symlink", src, dst] if kind == "symlink" else ["--ro-bind", src, dst]
    cmd += ["--proc", "/proc", "--dir", "/dev"]
    for name in cfg["devices"]:
        cmd += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, target in DEV_LINKS:
        cmd += ["--symlink", target, f"/dev/{name}"]
    cmd += ["--remount-ro", "/", "--chdir", "/"]
    return cmd + init


def _die_with_caller(caller: int) -> None:
    """Runs in bwrap / unshare between fork and exec (nothing here may import): SIGKILL it when
    the caller's thread ends, so its namespace dies with a caller that is killed mid-run."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != caller:  # the caller died before the line above
        os._exit(1)


def _namespace_children(pid: int) -> list[int]:
    """The processes ``pid`` started (the namespace's init), from /proc."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _kill_namespace(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (bwrap / unshare) and its namespace's init, and return only once that init
    is gone: the kernel has then killed every process of the namespace."""
    if proc.poll() is not None:
        return  # it reaped the init, which left only after the kernel emptied its namespace
    inits = _namespace_children(proc.pid)
    handles = []
    for pid in inits:
        try:
            handles.append(os.pidfd_open(pid))
        except (OSError, AttributeError):
            pass
    for pid in [proc.pid, *inits]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    for fd in handles:
        try:
            select.select([fd], [], [], 120)  # readable once the process has exited
        finally:
            os.close(fd)


def _read_report(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            b = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks).decode(errors="replace").split()


def _run_namespaced(backend: str, source: str, timeout_s: float, memory_bytes: int, tmpfs_bytes: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="mlx-lora-sandbox-") as tmp:
        folder = Path(tmp)
        log = folder / "output.txt"
        root = folder / "root"  # unshare: where the new root is mounted, in its own mount namespace only
        root.mkdir()
        read_end, write_end = os.pipe()
        cfg = {
            "backend": backend,
            "status_fd": write_end,
            "root": str(root),
            "binds": _binds(),
            "devices": [d for d in DEVICES if os.path.exists(f"/dev/{d}")],
            "dev_links": DEV_LINKS,
            "work": WORK,
            "tmpfs_bytes": int(tmpfs_bytes),
            "tmpfs_inodes": TMPFS_INODES,
            "timeout_s": max(float(timeout_s), 0.01),  # 0 would disarm the init's timer
            "limits": _limits(int(timeout_s) + 2, memory_bytes),
            "python": sys.executable,
            "prelude": PRELUDE,
            "env": ENV,
            "pivot_root": PIVOT_ROOT.get(platform.machine().lower(), 0),
        }
        t0 = time.perf_counter()
        timed_out = False
        try:
            with open(log, "wb") as out:
                caller = os.getpid()
                proc = subprocess.Popen(
                    _command(backend, cfg),
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=ENV,
                    start_new_session=True,
                    pass_fds=(write_end,),
                    preexec_fn=lambda: _die_with_caller(caller),
                )
                os.close(write_end)
                write_end = -1
                try:
                    proc.communicate(source.encode("utf-8", errors="replace"), timeout=timeout_s + STARTUP_GRACE_S)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_namespace(proc)
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            report = _read_report(read_end)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        seconds = time.perf_counter() - t0
        output = _tail(log)
    if "ready" not in report and not timed_out:
        logger.warning(
            "the %s sandbox did not start (exit status %s): %s", backend, proc.returncode, output.strip()[-500:]
        )
        return RunResult(False, "error", proc.returncode, output, seconds)
    if timed_out or "timeout" in report:
        return RunResult(False, "timeout", None, output, seconds)
    if "exit" in report:
        code = int(report[report.index("exit") + 1])
        status = "passed" if code == 0 else "crashed" if code < 0 else "failed"
        return RunResult(code == 0, status, code, output, seconds)
    return RunResult(False, "crashed", proc.returncode, output, seconds)  # its init was killed from outside


# ---------------------------------------------------------------------------------------------
# sandbox-exec and none: a process group


def macos_profile(folder: str) -> str:
    """The sandbox-exec profile: everything the user may do, except any network (unix sockets
    included), writes outside ``folder`` (and the harmless devices), and signals to processes
    outside the sandbox."""

    def quoted(path: str) -> str:
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "(version 1)",
            "(allow default)",
            "(deny network*)",
            "(deny file-write*)",
            f'(allow file-write* (subpath {quoted(os.path.realpath(folder))}) (literal "/dev/null") '
            '(literal "/dev/zero") (literal "/dev/dtracehelper"))',
            "(deny signal)",
            "(allow signal (target same-sandbox))",
            "",
        ]
    )


@functools.lru_cache(maxsize=None)
def network_isolation() -> Optional[list[str]]:
    """The command prefix that starts a process in an empty network namespace here, or None when
    the kernel or the user cannot have one (the socket prelude then stands alone). Level "none"
    only."""
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


def _set_limits(cpu_s: int, memory: int) -> None:
    """Runs in the child between fork and exec: nothing here may import (another thread of the
    parent may have held the import lock at the fork)."""
    if resource is None:  # not on this OS
        return
    for name, value in _limits(cpu_s, memory):
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


def _run_process_group(
    source: str, timeout_s: float, memory_bytes: int, *, sandbox_exec: bool, isolate_network: bool
) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="mlx-lora-sandbox-") as tmp:
        folder = Path(tmp)
        script, log = folder / "main.py", folder / "output.txt"
        script.write_text(source, encoding="utf-8", errors="replace")
        env = dict(ENV, HOME=str(folder), TMPDIR=str(folder))
        if sandbox_exec:
            prefix = [shutil.which("sandbox-exec") or "sandbox-exec", "-p", macos_profile(str(folder))]
        else:
            prefix = (network_isolation() or []) if isolate_network else []
        cmd = prefix + [sys.executable, "-I", "-c", PRELUDE, str(script)]
        preexec = (lambda: _set_limits(int(timeout_s) + 2, memory_bytes)) if os.name == "posix" else None
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
            try:
                code = proc.wait(timeout=timeout_s)
                status = "passed" if code == 0 else "crashed" if code < 0 else "failed"
            except subprocess.TimeoutExpired:
                code, status = None, "timeout"
            finally:
                # The whole group: code that started children must not leave them running (a child
                # that made its own session escapes this; only the namespaces above contain it).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        return RunResult(status == "passed", status, code, _tail(log), time.perf_counter() - t0)
