"""Benchmarks (run as scripts: python bench/train_vs_mlx_lm.py); see bench/README.md."""
