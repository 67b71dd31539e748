"""Models: loading any source with mlx-lm, LoRA/DoRA layers, adapters, base-model fingerprints."""
