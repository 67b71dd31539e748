"""The pass@1 sandbox contains what it runs: each test is an attack a data row's `tests` can make,
run through every backend this machine has (bubblewrap, unshare), and where it helps the same
attack unconfined (level "none") to show the check can fail. Plus the level choice, the
--unsafe-exec gate, doctor, and an end-to-end `eval --generate --metric pass@1` whose rows attack
the evaluating process."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from cli_harness import assert_refused, cli_env, diff, run_main, snapshot, write
from cli_harness import rows as jsonl

from mlx_lora.plumbing import sandbox as S

HERE = [b for b in ("bwrap", "unshare") if not S.probe(b)]
ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0

_env = pytest.fixture(scope="module")(cli_env)


def run(source: str, backend: str, **kw) -> S.RunResult:
    kw.setdefault("timeout_s", 60.0)
    return S.run_python(source, backend=backend, **kw)


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_this_machine_has_a_backend_to_test():
    """The containment tests below run per backend present; on Linux CI both are (.ci/setup
    installs bubblewrap), so an empty list here means the claims went untested."""
    if not sys.platform.startswith("linux"):
        pytest.skip("namespaces are Linux only")
    if not HERE:
        pytest.skip(
            f"this machine offers no namespaces, the claims are untested here: "
            f"{ {b: S.probe(b) for b in ('bwrap', 'unshare')} }"
        )
    assert S.containment().backend == HERE[0]


# ---------------------------------------------------------------------------------------------
# the attacks


@pytest.mark.parametrize("backend", HERE)
def test_code_cannot_kill_the_caller_or_its_other_processes(backend):
    """os.kill of its parent, of the caller's real pid, of pid 1, of every process it may signal
    (-1) and of its process group (0): the caller and a sibling process of the caller live on,
    and the row is a failure."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        code = (
            f"import os, signal\n"
            f"for pid in (os.getppid(), {os.getpid()}, {sibling.pid}, 1, -1, 0):\n"
            f"    try:\n"
            f"        os.kill(pid, signal.SIGKILL)\n"
            f"    except OSError as e:\n"
            f"        print(pid, e)\n"
        )
        r = run(code, backend)
        assert not r.passed and r.status in ("crashed", "failed"), r
        assert sibling.poll() is None, "the sandboxed code killed a process of the caller's"
    finally:
        sibling.kill()
        sibling.wait()


SURVIVOR = r"""
import os, sys, time
loop = '''
import pathlib, sys, time
pathlib.Path('/tmp/running-' + sys.argv[2]).touch()
while True:
    for p in (sys.argv[1], '/tmp/later'):
        try:
            with open(p, 'a') as f:
                f.write('x')
        except OSError:
            pass
    time.sleep(0.05)
'''
for k in range(5):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', loop, LATER, str(k), MARKER])
        os._exit(0)
deadline = time.monotonic() + 100
while not all(os.path.exists('/tmp/running-%d' % k) for k in range(5)):
    assert time.monotonic() < deadline, 'the grandchildren did not start'
    time.sleep(0.01)
print('grandchildren running', flush=True)
"""


def survivor_program(tmp_path: Path, marker: str, then: str) -> tuple[str, Path]:
    later = tmp_path / "later.txt"
    return f"LATER = {str(later)!r}\nMARKER = {marker!r}\n" + SURVIVOR + then, later


@pytest.mark.parametrize("ending", ["exits", "times out", "caller kills"])
@pytest.mark.parametrize("backend", HERE)
def test_setsid_and_double_fork_do_not_outlive_the_run(backend, ending, tmp_path, monkeypatch):
    """Five grandchildren in their own sessions, each looping to write a file: when run_python
    returns none of them exists, whether the program exited, ran into its timeout (the
    namespace's init ends it), or the caller's own deadline fired first (as if that init hung)."""
    marker = f"mlx-lora-survivor-{uuid.uuid4().hex}"
    then = "" if ending == "exits" else "while True:\n    pass\n"
    source, later = survivor_program(tmp_path, marker, then)
    timeout = {"exits": 60.0, "times out": 30.0, "caller kills": 120.0}[ending]
    if ending == "caller kills":
        monkeypatch.setattr(S, "STARTUP_GRACE_S", 30.0 - timeout)
    r = run(source, backend, timeout_s=timeout)
    assert "grandchildren running" in r.output, r
    assert r.status == ("passed" if ending == "exits" else "timeout"), r
    assert processes_with(marker) == []
    assert not later.exists()


CALLER = r"""
import sys
from mlx_lora.plumbing import sandbox
sandbox.run_python(open(sys.argv[2]).read(), backend=sys.argv[1], timeout_s=600)
"""


@pytest.mark.parametrize("backend", HERE)
def test_a_killed_caller_takes_the_run_with_it(backend, tmp_path):
    """The caller is SIGKILLed while its program's setsid grandchildren run (with 600 s left on
    the timeout): every one of them is gone soon after, not when the timeout would have ended them."""
    marker = f"mlx-lora-survivor-{uuid.uuid4().hex}"
    source, later = survivor_program(tmp_path, marker, "while True:\n    pass\n")
    program = write(tmp_path / "program.py", source)
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, backend, str(program)], env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        wait_for(lambda: len(processes_with(marker)) == 5, "the grandchildren to start")
    finally:
        caller.kill()
        caller.wait()
    wait_for(lambda: processes_with(marker) == [], "the grandchildren to die with the caller")
    assert not later.exists()


def test_the_survivor_check_finds_survivors_of_an_unconfined_run(tmp_path):
    """The same program at the level "none" (a plain process group) leaves its grandchildren
    running and writing to the host folder: the check above can fail."""
    marker = f"mlx-lora-survivor-{uuid.uuid4().hex}"
    source, later = survivor_program(tmp_path, marker, "")
    try:
        r = S.run_python(source, backend="none", timeout_s=60.0)
        assert "grandchildren running" in r.output, r
        assert processes_with(marker)
        wait_for(later.exists, "the survivors to write the host file")
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


SECRET_CALLER = r"""
import json, os, sys
from mlx_lora.plumbing import sandbox
code = '''
import glob, os
seen = [repr(os.environ)]
for p in ['/proc/self/environ', '/proc/%d/environ' % os.getppid(), '/proc/CALLER/environ',
          *glob.glob('/proc/*/environ'), *glob.glob('/proc/*/cmdline'), 'TOKEN_FILE']:
    try:
        seen.append(open(p, 'rb').read().decode(errors='replace'))
    except OSError as e:
        seen.append('%s: %s' % (p, e.strerror))
import re
print(sorted(set(re.findall('hunter2-[0-9a-f]{32}', ' '.join(seen)))))
print(len(seen), 'read')
'''.replace('CALLER', str(os.getpid())).replace('TOKEN_FILE', sys.argv[2])
r = sandbox.run_python(code, backend=sys.argv[1], timeout_s=60)
print(json.dumps([r.status, r.output]))
"""


@pytest.mark.parametrize("backend", HERE + ["none"])
def test_code_cannot_read_the_callers_secrets(backend, tmp_path, monkeypatch):
    """A caller started with SECRET_TOKEN in its environment (and a file holding it): the code
    reads its own environment, /proc/<parent>/environ, /proc/<caller>/environ, every environ and
    cmdline in /proc, and the file. Contained, the token is nowhere; unconfined, it leaks (so the
    check can fail)."""
    secret = f"hunter2-{uuid.uuid4().hex}"
    token_file = write(tmp_path / "token.txt", secret)
    monkeypatch.setenv("SECRET_TOKEN", secret)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-c", SECRET_CALLER, backend, str(token_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    status, output = json.loads(p.stdout.strip().splitlines()[-1])
    assert status == "passed" and " read" in output, output
    if backend == "none":
        assert secret in output
    else:
        assert secret not in output, output


def _unix_server(path_or_name: str, hits: list, stop: threading.Event) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path_or_name)
    s.listen(8)
    s.settimeout(0.2)

    def accept():
        while not stop.is_set():
            try:
                hits.append(s.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    return s


def socket_places(tmp_path: Path) -> list[str]:
    """Filesystem socket paths outside the sandbox's folder: the test's folder, /tmp, and /run and
    /dev/shm where this user may create one."""
    places = [str(tmp_path / "s.sock"), tempfile.mkdtemp(dir="/tmp") + "/s.sock"]
    for d in ("/run", "/dev/shm"):
        if os.access(d, os.W_OK):
            places.append(f"{d}/mlx-lora-test-{uuid.uuid4().hex[:12]}.sock")
    return places


CONNECT = r"""
import _socket, json
got = {}
for name in PLACES:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(name)
        s.send(b'leak')
        got[name] = 'connected'
    except OSError as e:
        got[name] = e.strerror
print(json.dumps(got))
"""


@pytest.mark.parametrize("backend", HERE + ["none"])
def test_unix_sockets_outside_are_unreachable(backend, tmp_path):
    """Servers on filesystem sockets in the test's folder, /tmp, /run, /dev/shm and on an abstract
    socket: the code connects to none of them (through _socket, around the prelude). Unconfined,
    the filesystem ones answer."""
    hits, stop, servers = [], threading.Event(), []
    places = socket_places(tmp_path)
    abstract = f"\0mlx-lora-test-{uuid.uuid4().hex}"
    try:
        for p in places + [abstract]:
            servers.append(_unix_server(p, hits, stop))
        r = run(CONNECT.replace("PLACES", repr(places + [abstract])), backend)
        assert r.passed, r
        got = json.loads(r.output)
        if backend == "none":
            assert all(got[p] == "connected" for p in places), got
            wait_for(lambda: len(hits) >= len(places), "the unconfined connections")
        else:
            assert "connected" not in got.values(), got
            assert hits == []
    finally:
        stop.set()
        for s in servers:
            s.close()
        for p in places:
            Path(p).unlink(missing_ok=True)


WRITER = r"""
import ctypes, json, os, sys
got = {}
for p in TARGETS:
    try:
        with open(p, 'w') as f:
            f.write('overwritten')
        got[p] = 'written'
    except OSError as e:
        got[p] = e.errno
libc = ctypes.CDLL(None, use_errno=True)
# MS_REMOUNT | MS_BIND of / and /usr read-write; a new user namespace (to be root in one)
got['remount /'] = libc.mount(None, b'/', None, 32 | 4096, None) == 0 or ctypes.get_errno()
got['remount /usr'] = libc.mount(None, b'/usr', None, 32 | 4096, None) == 0 or ctypes.get_errno()
got['unshare user'] = libc.unshare(0x10000000) == 0 or ctypes.get_errno()
print(json.dumps(got))
"""


@pytest.mark.parametrize("backend", HERE)
def test_code_cannot_write_outside_its_tmpfs(backend, tmp_path):
    """Writes to an existing host file, a new file in the caller's folder, and a file in /, /usr,
    /etc, /dev, /proc, /run, /var/tmp, /home, the home folder and the Python installation all fail;
    it can neither remount a folder read-write nor become root in a new user namespace; /tmp (its
    tmpfs) takes a write. The host is unchanged, by hash."""
    keep = write(tmp_path / "keep.txt", "mine")
    prefix = Path(sys.prefix)
    targets = [
        str(keep),
        str(tmp_path / "new.txt"),
        "/x",
        "/usr/x",
        "/etc/x",
        "/dev/x",
        "/proc/x",
        "/run/x",
        "/var/tmp/x",
        "/home/x",
        os.path.expanduser("~/mlx-lora-x"),
        str(prefix / "mlx-lora-x"),
        str(Path(sys.executable).parent / "mlx-lora-x"),
        "/tmp/x",
    ]
    before = snapshot(tmp_path, prefix / "mlx-lora-x", Path(os.path.expanduser("~/mlx-lora-x")))
    r = run(WRITER.replace("TARGETS", repr(targets)), backend)
    assert r.passed, r
    got = json.loads(r.output)
    assert got.pop("/tmp/x") == "written"
    assert all(v != "written" for v in got.values()), got
    assert got["remount /"] is not True and got["remount /usr"] is not True and got["unshare user"] is not True, got
    assert diff(before, snapshot(tmp_path, prefix / "mlx-lora-x", Path(os.path.expanduser("~/mlx-lora-x")))) == []


FILLER = r"""
import errno, os
total, k = 0, 0
chunk = b'x' * (1 << 20)
try:
    while True:
        with open('/tmp/fill-%d' % k, 'wb') as f:
            for _ in range(4):
                f.write(chunk)
                f.flush()
                total += len(chunk)
        k += 1
except OSError as e:
    print(total, e.errno)
"""


@pytest.mark.parametrize("backend", HERE)
def test_filling_the_tmpfs_fails_at_its_limit(backend):
    """Files of 4 MiB written until a write fails: it fails with ENOSPC, at the tmpfs's size
    (16 MiB here), not at the per-file cap or the host's free space."""
    limit = 16 << 20
    r = run(FILLER, backend, tmpfs_bytes=limit)
    assert r.passed, r
    total, err = map(int, r.output.split())
    assert err == errno.ENOSPC, r.output
    assert limit - (1 << 20) <= total <= limit, total


@pytest.mark.parametrize("backend", HERE)
def test_code_cannot_reach_the_network(backend):
    """A TCP server on the caller's loopback and an outside address: raw _socket connections
    fail, the server sees nothing, and the only interface is a loopback that is down."""
    hits, stop = [], threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]

    def accept():
        while not stop.is_set():
            try:
                hits.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    code = (
        f"import _socket, json, socket\ngot = {{}}\n"
        f"for addr in (('127.0.0.1', {port}), ('1.1.1.1', 53)):\n"
        f"    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        f"    s.settimeout(5)\n"
        f"    try:\n"
        f"        s.connect(addr)\n"
        f"        got[addr[0]] = 'connected'\n"
        f"    except OSError as e:\n"
        f"        got[addr[0]] = str(e)\n"
        f"got['interfaces'] = [n for _, n in socket.if_nameindex()]\n"
        f"print(json.dumps(got))"
    )
    try:
        r = run(code, backend)
        assert r.passed, r
        got = json.loads(r.output)
        assert got["127.0.0.1"] != "connected" and got["1.1.1.1"] != "connected", got
        assert got["interfaces"] == ["lo"], got
        assert hits == []
    finally:
        stop.set()
        server.close()


@pytest.mark.parametrize("backend", HERE)
def test_clean_environment_limits_and_results(backend):
    """A fixed environment, the folder /tmp holding only the program, the rlimits, and every
    kind of result: passed, failed (exit 3), crashed (SIGKILL of itself), timeout."""
    r = run(
        "import os, json, resource\nprint(json.dumps([os.getcwd(), dict(os.environ), os.listdir('.'), "
        "resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0], "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[0], resource.getrlimit(resource.RLIMIT_FSIZE)[0], "
        "resource.getrlimit(resource.RLIMIT_CORE)[0]]))",
        backend,
        timeout_s=5,
    )
    assert r.passed, r
    cwd, env, files, memory, cpu, nofile, fsize, core = json.loads(r.output)
    # (plus the top folder of a Python installed below /tmp, bound read-only on top of the tmpfs)
    pythons = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable)} | {
        sys.prefix,
        sys.base_prefix,
        sys.executable,
    }
    below = sorted({Path(p).relative_to("/tmp").parts[0] for p in pythons if p.startswith("/tmp/")})
    assert (cwd, env, sorted(files)) == ("/tmp", S.ENV, sorted(["main.py", *below]))
    assert (memory, cpu, nofile, fsize, core) == (S.MEMORY_BYTES, 7, S.OPEN_FILES, S.FILE_BYTES, 0)
    caps = run(
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', "
        "'CapBnd', 'NoNewPrivs'))])",
        backend,
    )
    assert caps.output.strip() == str(["0" * 16, "0" * 16, "0" * 16, "1"]), caps
    assert (run("raise SystemExit(3)", backend).status, run("raise SystemExit(3)", backend).returncode) == ("failed", 3)
    crashed = run("import os\nos.kill(os.getpid(), 9)", backend)
    assert (crashed.status, crashed.returncode) == ("crashed", -9)
    timeout = run("while True:\n    pass", backend, timeout_s=1.5)
    assert (timeout.status, timeout.passed) == ("timeout", False)


@pytest.mark.parametrize("backend", HERE)
def test_code_cannot_fake_a_pass(backend):
    """A failing program that first tries to write "exit 0" into every file descriptor of the
    namespace's init (which reports the verdict), to trace it, and to signal it (an alarm, an
    interrupt, a child's end, a stop): still a plain failure, reported when it ends."""
    code = (
        "import ctypes, glob, os\ntried = []\n"
        "for fd in glob.glob('/proc/1/fd/*'):\n"
        "    try:\n"
        "        with open(fd, 'w') as f:\n"
        "            f.write('ready\\nexit 0\\n')\n"
        "        tried.append(fd)\n"
        "    except OSError as e:\n"
        "        tried.append(e.strerror)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(tried, libc.ptrace(16, 1, None, None), flush=True)\n"  # PTRACE_ATTACH
        "import signal, time\n"
        "for sig in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGSTOP):\n"
        "    os.kill(1, sig)\n"
        "time.sleep(1)\n"  # room for a wrongly handled signal to end the run early
        "raise SystemExit(1)\n"
    )
    r = run(code, backend)
    assert (r.status, r.passed, r.returncode) == ("failed", False, 1), r
    assert "-1" in r.output, r.output


# ---------------------------------------------------------------------------------------------
# levels, the gate, doctor


def test_the_level_is_chosen_and_can_be_forced(monkeypatch):
    monkeypatch.setenv(S.ENV_VAR, "none")
    level = S.containment()
    assert not level.contained and "--unsafe-exec" in level.description
    with pytest.raises(S.MlxLoraError, match="--unsafe-exec"):
        S.require_isolation(False)
    assert S.require_isolation(True).backend == "none"
    monkeypatch.setenv(S.ENV_VAR, "jail")
    with pytest.raises(S.MlxLoraError, match="MLX_LORA_SANDBOX='jail'"):
        S.containment()
    monkeypatch.delenv(S.ENV_VAR)
    if HERE:
        assert S.containment().backend == HERE[0] and S.containment().contained
    for b in HERE:
        monkeypatch.setenv(S.ENV_VAR, b)
        assert S.containment().backend == b and "read-only root" in S.containment().description


def test_macos_profile_denies_network_and_writes_outside_its_folder():
    folder = '/private/var/folders/x/a "quoted\\ folder'
    profile = S.macos_profile(folder)
    lines = profile.splitlines()
    assert lines[:4] == ["(version 1)", "(allow default)", "(deny network*)", "(deny file-write*)"]
    assert '(subpath "/private/var/folders/x/a \\"quoted\\\\ folder")' in lines[4]
    assert lines[4].startswith("(allow file-write* ") and "/dev/null" in lines[4]
    assert lines[5:7] == ["(deny signal)", "(allow signal (target same-sandbox))"]
    assert profile.count("(") == profile.count(")")


def test_doctor_names_the_containment_level(capsys, monkeypatch, _env):
    code, out, err = run_main(capsys, ["doctor", "--json"])
    assert code == 0, err
    assert json.loads(out)["sandbox"] == S.containment().description
    monkeypatch.setenv(S.ENV_VAR, "none")
    code, out, err = run_main(capsys, ["doctor"])
    assert code == 0, err
    assert [l for l in out.splitlines() if l.startswith("sandbox")] == [
        "sandbox        none: pass@1 needs --unsafe-exec (MLX_LORA_SANDBOX=none)"
    ]


# ---------------------------------------------------------------------------------------------
# end to end: eval --generate --metric pass@1


CODE_ROWS = [{"prompt": f"Write f{i}.", "completion": "...", "tests": f"assert f{i}(2) == 4"} for i in range(4)]


def test_without_isolation_pass_at_1_needs_unsafe_exec(tiny_llama, tmp_path, capsys, monkeypatch, _env):
    """No sandbox: one line saying how to get one, before the model loads and with nothing
    written; with --unsafe-exec the rows run (a line says so)."""
    from mlx_lora.inference import evaluation

    data = write(tmp_path / "code.jsonl", jsonl(*CODE_ROWS[:1]))
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv(S.ENV_VAR, "none")
    argv = [
        "eval",
        "--generate",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--metric",
        "pass@1",
        "--out",
        str(out),
        "--max-tokens",
        "2",
    ]
    msg = assert_refused(
        capsys,
        argv,
        ["pass@1", "no sandbox", "MLX_LORA_SANDBOX=none", "install bubblewrap", "--unsafe-exec"],
        [tmp_path],
    )
    assert len(msg.splitlines()) == 1
    monkeypatch.setattr(
        evaluation,
        "generate",
        lambda model, tok, prompts, max_tokens, **kw: ["def f0(x):\n    return 2 * x"] * len(prompts),
    )
    code, stdout, err = run_main(capsys, argv + ["--unsafe-exec"])
    assert code == 0, err
    assert "sandbox   none: each row's code runs WITHOUT isolation" in err
    assert [json.loads(l)["sandbox"]["base"] for l in out.read_text().splitlines()] == ["passed"]
    if HERE:  # with a sandbox the same command needs no flag and names the level first
        monkeypatch.delenv(S.ENV_VAR)
        code, stdout, err = run_main(capsys, argv + ["--overwrite"])
        assert code == 0, err
        assert err.splitlines()[0] == f"sandbox   {S.containment().description}"
    assert_refused(
        capsys,
        ["eval", "--model", str(tiny_llama), "--data", str(data), "--unsafe-exec"],
        ["--unsafe-exec needs --generate"],
        [tmp_path],
    )


EVAL_DRIVER = r"""
import json, sys
from mlx_lora.inference import evaluation
from mlx_lora.commands.cli import main
answers = json.loads(open(sys.argv[1]).read())
evaluation.generate = lambda model, tok, prompts, max_tokens, **kw: answers[:len(prompts)]
main(sys.argv[2:])
"""


@pytest.mark.skipif(not HERE, reason="no sandbox backend on this machine")
def test_eval_generate_survives_rows_that_attack_it(tiny_llama, tmp_path):
    """The real command in its own process, with canned answers (a random model writes no code):
    rows that kill the evaluating process, leave setsid grandchildren, write outside and fill the
    disk. The eval completes, writes --out, scores each attack a failure and the honest row a pass;
    no grandchild outlives it."""
    marker = f"mlx-lora-survivor-{uuid.uuid4().hex}"
    survivor, later = survivor_program(tmp_path, marker, "raise SystemExit(1)\n")
    keep = write(tmp_path / "keep.txt", "mine")
    answers = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\nos.kill(0, 9)",
        survivor,
        f"open({str(keep)!r}, 'w').write('gone')",
        "```python\ndef f3(x):\n    return 2 * x\n```",
    ]
    answers_file = write(tmp_path / "answers.json", json.dumps(answers))
    data = write(tmp_path / "code.jsonl", jsonl(*CODE_ROWS))
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_LORA_NO_BLAS_REEXEC="1", SECRET_TOKEN="hunter2")
    env.pop(S.ENV_VAR, None)
    before = snapshot(keep)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            EVAL_DRIVER,
            str(answers_file),
            "eval",
            "--generate",
            "--model",
            str(tiny_llama),
            "--data",
            str(data),
            "--metric",
            "pass@1",
            "--out",
            str(out),
            "--timeout",
            "60",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["scores"] == {"base": {"pass@1": 0.25}}
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["scores"]["base"]["pass@1"] for r in records] == [0.0, 0.0, 0.0, 1.0]
    assert records[0]["sandbox"]["base"] in ("crashed", "failed")
    assert processes_with(marker) == [] and not later.exists()
    assert diff(before, snapshot(keep)) == []
