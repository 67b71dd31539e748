"""mlx-lora: LoRA, QLoRA and DoRA fine-tuning on MLX, with fuse and export to GGUF, PEFT and Ollama.

The Python API mirrors the CLI::

    import mlx_lora
    cfg = mlx_lora.config.build("recipes/chat-sft.yaml", ["train.iters=200"])
    result = mlx_lora.train(cfg)
    print(mlx_lora.generate("path/to/model", "Hello", adapter=cfg.out, chat=True))

The package is laid out by concern: ``plumbing`` (errors, writes, ownership, logging), ``data``,
``model``, ``training``, ``inference``, ``commands`` (CLI and this API), and ``converters`` (weight
formats and exports). Submodules load lazily, so ``import mlx_lora`` is cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {"train", "evaluate", "evaluate_generate", "generate", "doctor", "load_for_inference"}
_MODULES = {
    "config": "mlx_lora.config",
    "data": "mlx_lora.data.examples",
    "adapters": "mlx_lora.model.adapters",
    "lora": "mlx_lora.model.lora",
    "models": "mlx_lora.model.loading",
    "trainer": "mlx_lora.training.trainer",
    "backend": "mlx_lora.plumbing.backend",
    "errors": "mlx_lora.plumbing.errors",
    "losses": "mlx_lora.training.losses",
}


def __getattr__(name):
    if name in _API:
        return getattr(import_module("mlx_lora.commands.api"), name)
    if name in _MODULES:
        return import_module(_MODULES[name])
    raise AttributeError(f"module 'mlx_lora' has no attribute {name!r}")
