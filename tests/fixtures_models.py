"""Tiny random Hugging Face-format models (hidden 64, 2 layers, vocab 512), built once per session.

``tiny_model_dir(arch, **kwargs)`` builds (and caches) any variant that
:func:`mlx_lora.testing.make_tiny_model` accepts; ``tiny_models`` maps every architecture to
its default folder; ``tiny_llama`` is the llama one most tests use. The folders are shared by
the whole session: tests must copy a folder before changing anything in it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mlx_lora.testing import ARCHITECTURES, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(arch, **make_tiny_model_kwargs) -> Path``; equal arguments return the same folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple, Path] = {}

    def build(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            suffix = "".join(f"-{k}={v}" for k, v in key[1])
            cache[key] = make_tiny_model(arch, root / f"{arch}{suffix}", **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir) -> dict[str, Path]:
    """Architecture name -> folder of its default tiny model, for every supported architecture."""
    return {arch: tiny_model_dir(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> Path:
    """The default tiny llama folder (untied lm_head, grouped-query attention, float32)."""
    return tiny_model_dir("llama")
