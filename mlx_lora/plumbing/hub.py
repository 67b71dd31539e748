"""Model snapshots from the Hugging Face hub: the files a model needs, downloaded once into the
hub's own cache.

:func:`snapshot` gets one, raising whatever the hub raised; :func:`download` turns any failure
into one :class:`~mlx_lora.plumbing.errors.ModelError` that says what to do (offline mode, no such
repository, a gated one, no network). With ``timeout_s`` a cached snapshot is used without asking
the hub, and otherwise the hub must answer a metadata request within that time, since hub
clients have no overall deadline of their own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Optional, TypeVar

from mlx_lora.plumbing.errors import ModelError

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
"""The files of a repository a model needs (weights, config, tokenizer, chat template, custom code)."""

T = TypeVar("T")


def offline_mode() -> bool:
    """Whether huggingface-hub is in offline mode (``HF_HUB_OFFLINE``)."""
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:
        try:
            from huggingface_hub.utils import is_offline_mode
        except ImportError:  # the hub's own truth test for the variable
            return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(is_offline_mode())


def with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn()`` in a daemon thread; its result, or TimeoutError after ``timeout_s`` (the
    thread is abandoned: hub clients have no overall deadline of their own)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="hub-probe")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def snapshot(repo_id: str, revision: Optional[str] = None, timeout_s: Optional[float] = None) -> Path:
    """A local snapshot of ``repo_id`` (the files of :data:`DOWNLOAD_PATTERNS`); raises what the
    hub raised. Without ``timeout_s`` the hub client decides (it checks a cached copy is current);
    with it, see the module docstring."""
    from huggingface_hub import HfApi, snapshot_download

    if timeout_s is None:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True)
        )
    except Exception:  # not cached (every hub error type means the same here)
        pass
    with_deadline(lambda: HfApi().model_info(repo_id, revision=revision, timeout=timeout_s), timeout_s + 2)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, etag_timeout=timeout_s))


def download(repo_id: str, revision: Optional[str] = None, timeout_s: Optional[float] = None) -> Path:
    """:func:`snapshot`, with any failure reported as one :class:`ModelError` saying what to do."""
    try:
        return snapshot(repo_id, revision, timeout_s)
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        name = type(e).__name__
        if offline_mode():
            raise ModelError(
                f"'{repo_id}' is not a local path and is not in the Hugging Face cache, and offline "
                f"mode is on (HF_HUB_OFFLINE=1). Download it first with network access, or pass a "
                f"local folder or .gguf file."
            ) from None
        if "RepositoryNotFound" in name or "404" in str(e):
            raise ModelError(f"'{repo_id}': no such local path, and no such Hugging Face repository") from None
        if "GatedRepo" in name or "401" in str(e) or "403" in str(e):
            raise ModelError(
                f"'{repo_id}' is gated or private: run `huggingface-cli login` and accept its license on the hub"
            ) from None
        raise ModelError(
            f"could not download '{repo_id}' from the Hugging Face hub ({name}: {e}). "
            f"Check the network, or pass a local folder or .gguf file."
        ) from None
