"""Resolve a model from any source and load it with mlx-lm's architectures.

Sources: a local Hugging Face folder (HF tensor names; mlx-lm's ``sanitize`` maps them), an
MLX-converted folder (possibly quantized: QLoRA base), a Hugging Face repo id (downloaded with
huggingface-hub), or a ``.gguf`` file (imported once into a cache folder by ``converters``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ModelError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]


@dataclass
class ModelInfo:
    source: str            # what the user asked for
    local_path: Path       # the folder actually loaded
    kind: str              # "folder", "hub" or "gguf"
    model_type: str
    config: dict
    quantization: Optional[dict]
    dtype: Any             # compute dtype (mx.Dtype)


def cache_root() -> Path:
    root = os.environ.get("MLX_LORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-lora"


def _hub_download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        from huggingface_hub import is_offline_mode
    except ImportError:
        try:
            from huggingface_hub.utils import is_offline_mode
        except ImportError:  # the hub's own truth test for the variable
            def is_offline_mode():
                return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        name = type(e).__name__
        if is_offline_mode():
            raise ModelError(
                f"'{repo_id}' is not a local path and is not in the Hugging Face cache, and offline "
                f"mode is on (HF_HUB_OFFLINE=1). Download it first with network access, or pass a "
                f"local folder or .gguf file."
            ) from None
        if "RepositoryNotFound" in name or "404" in str(e):
            raise ModelError(f"'{repo_id}': no such local path, and no such Hugging Face repository") from None
        if "GatedRepo" in name or "401" in str(e) or "403" in str(e):
            raise ModelError(f"'{repo_id}' is gated or private: run `huggingface-cli login` and accept "
                             f"its license on the hub") from None
        raise ModelError(f"could not download '{repo_id}' from the Hugging Face hub ({name}: {e}). "
                         f"Check the network, or pass a local folder or .gguf file.") from None


def resolve(source: str, revision: Optional[str] = None, keep_quantized: bool = False) -> tuple[Path, str]:
    """Turn a model reference into a local folder; returns (folder, kind)."""
    if not source:
        raise ModelError("no model given: pass --model PATH_OR_HF_ID")
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        try:
            from converters.gguf_import import gguf_cache_dir, import_gguf
        except ImportError as e:
            raise ModelError(f"{path}: GGUF import is unavailable ({e})") from None
        out = gguf_cache_dir(path, keep_quantized=keep_quantized)
        if not (out / "config.json").is_file():
            import_gguf(path, out, keep_quantized=keep_quantized)
        return out, "gguf"
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; expected a model folder (config.json + *.safetensors) or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder: it has no config.json")
        if not any(path.glob("*.safetensors")):
            hint = " (PyTorch .bin weights: convert them to safetensors first)" if any(path.glob("*.bin")) else ""
            raise ModelError(f"{path} has no *.safetensors weight files{hint}")
        return path, "folder"
    if source.startswith((".", "/", "~")) or not REPO_ID.match(source):
        raise ModelError(f"model path does not exist: {path}")
    return _hub_download(source, revision), "hub"


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path}: cannot read ({e})") from None


def _name_damaged_weight_file(folder: Path) -> None:
    """Raise a ModelError naming the truncated or corrupt weight file and tensor, if one is."""
    from .integrity import check_safetensors

    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)


def load_model(source: str, *, dtype: str = "auto", revision: Optional[str] = None,
               trust_remote_code: bool = False, keep_quantized: bool = False,
               with_tokenizer: bool = True):
    """Load (model, tokenizer, ModelInfo). Float weights are cast to the compute dtype; quantized
    weights stay packed (QLoRA); LoRA weights are float32 whatever the compute dtype."""
    # Resolve first: a wrong path is reported before the multi-second mlx-lm import.
    folder, kind = resolve(source, revision, keep_quantized=keep_quantized)

    import mlx.core as mx
    from mlx_lm.utils import _get_classes, load_model as mlx_lm_load_model, load_tokenizer

    from .backend import compute_dtype

    config = read_config(folder)
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError(f"{folder / 'config.json'}: field 'model_type' is missing")
    try:
        _get_classes(config)
    except (ValueError, ImportError, ModuleNotFoundError):
        raise ModelError(
            f"{folder / 'config.json'}: architecture '{model_type}' is not supported by the installed "
            f"mlx-lm; upgrade mlx-lm or use a supported model"
        ) from None
    try:
        model, config = mlx_lm_load_model(folder, lazy=True, strict=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e)
        raise ModelError(f"{folder}: weights do not match the '{model_type}' architecture: {msg[:400]}") from None
    except FileNotFoundError as e:
        raise ModelError(f"{folder}: {e}") from None
    except Exception as e:  # truncated / corrupt safetensors surface here
        _name_damaged_weight_file(folder)
        raise ModelError(f"{folder}: cannot read the weights ({type(e).__name__}: {str(e)[:300]})") from None

    target = compute_dtype(dtype)
    model.set_dtype(target, lambda x: mx.issubdtype(x, mx.floating))
    try:
        mx.eval(model.parameters())
    except Exception as e:
        _name_damaged_weight_file(folder)
        raise ModelError(f"{folder}: cannot read the weights ({type(e).__name__}: {str(e)[:300]})") from None
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
        except Exception as e:
            raise ModelError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
    info = ModelInfo(source=source, local_path=folder, kind=kind, model_type=model_type, config=config,
                     quantization=config.get("quantization"), dtype=target)
    return model, tokenizer, info
