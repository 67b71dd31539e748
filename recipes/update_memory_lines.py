"""Refresh the recipes' memory figures.

    python recipes/update_memory_lines.py

Rewrites the ``# memory:`` and ``# fits:`` header lines of every ``recipes/*.yaml`` with what
:func:`mlx_lora.commands.recipes.estimate_for_config` says for its config (run it after changing a recipe's
model, lengths, batch size or memory settings, or the estimator). ``tests/test_recipes.py`` fails
when a header figure is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def refresh_memory_lines(path: Path) -> bool:
    """Rewrite ``path``'s memory and fits header lines from the estimator; True if they changed."""
    sys.path.insert(0, str(HERE.parent))
    from mlx_lora import config
    from mlx_lora.commands.recipes import estimate_for_config, memory_text
    from mlx_lora.plumbing.io import atomic_write_text

    est = estimate_for_config(config.build(str(path), check=False))
    if est is None:
        raise SystemExit(
            f"{path}: its model is not in mlx_lora.commands.recipes.KNOWN_MODELS; add its config facts there"
        )
    mem, fits = memory_text(est)
    text = path.read_text(encoding="utf-8")
    new = re.sub(r"^# memory: .*$", f"# memory:  {mem}", text, count=1, flags=re.M)
    new = re.sub(r"^# fits: .*$", f"# fits:    {fits}", new, count=1, flags=re.M)
    if new != text:
        atomic_write_text(path, new)
    return new != text


if __name__ == "__main__":
    for recipe in sorted(HERE.glob("*.yaml")):
        if refresh_memory_lines(recipe):
            print(f"updated the memory figures of {recipe.name}")
