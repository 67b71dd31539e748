"""A base model with an adapter, ready to generate or score: what every inference command loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, TextIO

from mlx_lora.config import CHOICES, check_options
from mlx_lora.model import adapters
from mlx_lora.model.integrity import check_adapter_base
from mlx_lora.model.loading import load_model
from mlx_lora.plumbing.backend import warn_if_slow_blas
from mlx_lora.plumbing.errors import MlxLoraError

logger = logging.getLogger(__name__)


def load_for_inference(
    model_path: str,
    adapter: Optional[str] = None,
    dtype: str = "auto",
    *,
    strict: bool = False,
    stream: Optional[TextIO] = None,
    dequantize_on_cpu: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer, info) with the adapter applied, in eval mode.

    An adapter trained on another base model than ``model_path`` (by the fingerprint it records)
    loads with a warning (logged), or raises AdapterError when ``strict``. Messages go through
    :mod:`logging` (``stream`` is not written to).
    ``dequantize_on_cpu``: see :func:`mlx_lora.model.loading.load_model` (None keeps a quantized base's
    layers quantized, for callers that inspect them). ``trust_remote_code``: let the model folder
    run the code it ships (``auto_map``, ``model_file``); otherwise a folder that needs it is refused."""
    check_options([("dtype", dtype, CHOICES["model.dtype"])])
    warn_if_slow_blas()  # a script that did not start through the mlx-lora command: one line on how
    model, tokenizer, info = load_model(
        model_path, dtype=dtype, dequantize_on_cpu=dequantize_on_cpu, trust_remote_code=trust_remote_code is True
    )
    if adapter:
        attach_adapter(model, info, adapter, strict=strict, stream=stream)
    model.eval()
    return model, tokenizer, info


def attach_adapter(model, info, adapter: str, *, strict: bool = False, stream: Optional[TextIO] = None) -> None:
    """Load ``adapter`` onto a model :func:`load_for_inference` loaded without one (``info``: its
    load info), warning (or with ``strict`` refusing) when it was trained on another base."""
    ainfo = adapters.load_adapter(model, adapter)
    msg = check_adapter_base(ainfo, info.local_path, strict=strict, adapter_name=str(adapter))
    if msg:
        logger.warning(msg)
    model.eval()


def eval_data_file(data: str) -> Path:
    """The file ``eval`` reads: ``data`` itself, or a folder's test.jsonl (else valid.jsonl)."""
    path = Path(data)
    if path.is_dir():
        for name in ("test.jsonl", "valid.jsonl"):
            if (path / name).is_file():
                return path / name
        raise MlxLoraError(f"{data}: no test.jsonl or valid.jsonl in this folder")
    return path
