"""Plumbing: errors, atomic writes, output ownership, caches, hub downloads, progress, logging, the
sandbox, backend facts and the one module that touches mlx-lm internals. Knows nothing of models."""
