"""What every bad-input and ownership test needs: snapshots of folders by hash, the CLI run
in-process, and the one-line error check.

A case runs :func:`mlx_lora.commands.cli.main` in the test process (a subprocess pays seconds of imports
per call), then :func:`assert_one_error_message` checks the contract every user mistake must
keep: a non-zero exit, one ``error:`` line naming the file, line or key, no traceback; and
:func:`snapshot` / :func:`diff` prove nothing on disk changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from mlx_lora.plumbing import backend, native

REPO = Path(__file__).resolve().parent.parent


def fresh_env(**extra) -> dict:
    """The environment of a user's shell for a child process: the repository importable, no BLAS
    preload, no re-exec or debug flags and no small-kernel switch from the test run; then ``extra``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    for key in ("LD_PRELOAD", "MLX_LORA_NO_BLAS_REEXEC", backend.REEXEC_FLAG, "MLX_LORA_DEBUG", native.SWITCH):
        env.pop(key, None)
    return {**env, **extra}


def snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` -> (kind, mode, size, mtime_ns, sha256 of a file's bytes)."""
    out = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        paths = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
        for p in paths:
            st = p.lstat()
            if p.is_file():
                out[str(p)] = (
                    "file",
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
            else:
                out[str(p)] = ("dir" if p.is_dir() else "other", st.st_mode, None, st.st_mtime_ns, None)
    return out


def diff(before: dict, after: dict) -> list[str]:
    return [
        f"{'created' if k not in before else 'removed' if k not in after else 'changed'}: {k}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    from mlx_lora.commands.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_message(code: int, out: str, err: str, fragments) -> str:
    """Non-zero exit, nothing on stdout, and stderr is one message: an ``error:`` line, followed
    only by indented lines when it lists several problems (e.g. every mismatched tensor)."""
    assert code != 0, f"exit code 0\n{err}"
    assert "Traceback" not in out + err, err
    assert out == "", out
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("error: "), err
    assert all(l.startswith("  ") for l in lines[1:]), err
    message = err.strip()
    for f in fragments:
        assert str(f) in message, f"{f!r} not in: {message}"
    return message


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def rows(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def make_read_only(path: Path) -> None:
    """Deny writes into ``path`` for this process: chmod for users, the immutable flag for root
    (root ignores permission bits)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root and the immutable flag is unavailable here ({r.stderr.strip()})")


def make_writable(root: Path) -> None:
    for p in [root, *root.rglob("*")] if root.exists() else []:
        if p.is_dir():
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(p)], capture_output=True)
            p.chmod(0o755)


def assert_refused(capsys, argv: list[str], fragments, watched, code: Optional[int] = None) -> str:
    """Run ``argv``; it must end in one error message containing ``fragments`` (with exit status
    ``code`` when given) and leave every path under ``watched`` exactly as it was. Returns the
    message."""
    before = snapshot(*watched)
    got, out, err = run_main(capsys, argv)
    message = assert_one_error_message(got, out, err, fragments)
    if code is not None:
        assert got == code, err
    assert diff(before, snapshot(*watched)) == [], message
    return message


def cli_env(tmp_path_factory):
    """The environment every in-process CLI test runs in (use as a module fixture): its own data
    cache, no re-exec for the BLAS preload over the test process, no --debug from outside. Yields
    the cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("MLX_LORA_CACHE", str(cache))
        mp.setenv("MLX_LORA_NO_BLAS_REEXEC", "1")  # main() must never exec over the test process
        mp.delenv("MLX_LORA_DEBUG", raising=False)
        yield cache
