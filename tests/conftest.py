"""Shared fixtures. Tiny random models live in fixtures_models.py, the real SmolLM2 model in
fixtures_smollm.py; both are registered here so every test can request them by name."""

import os

# Tests never reach a model hub; code that would download says so clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["fixtures_models", "fixtures_smollm"]
