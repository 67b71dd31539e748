"""Inference: the generation engine, prompts and sampling, evaluation and its metrics."""
