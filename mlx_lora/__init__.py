"""mlx-lora: LoRA, QLoRA and DoRA fine-tuning on MLX, with fuse and export to GGUF, PEFT and Ollama.

The Python API mirrors the CLI::

    import mlx_lora
    cfg = mlx_lora.config.build("recipes/chat-sft.yaml", ["train.iters=200"])
    result = mlx_lora.train(cfg)
    print(mlx_lora.generate("path/to/model", "Hello", adapter=cfg.out, chat=True))

Submodules load lazily, so ``import mlx_lora`` is cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {"train", "evaluate", "evaluate_generate", "generate", "doctor", "load_for_inference"}


def __getattr__(name):
    if name in _API:
        return getattr(import_module(".api", __name__), name)
    if name in {"config", "data", "adapters", "lora", "models", "trainer", "backend", "errors", "losses"}:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mlx_lora' has no attribute {name!r}")
