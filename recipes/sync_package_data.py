"""Refresh the recipes' memory figures and mirror the recipes into the package.

    python recipes/sync_package_data.py

1. Rewrites the ``# memory:`` and ``# fits:`` header lines of every ``recipes/*.yaml`` with what
   :func:`mlx_lora.recipes.estimate_for_config` says for its config (run it after changing a
   recipe's model, lengths, batch size or memory settings, or the estimator).
2. Copies every ``recipes/*.yaml`` and the scripts in :data:`SHIPPED_SCRIPTS` to
   ``mlx_lora/recipes_data/`` (what a wheel ships) and removes files there that no longer exist here.

``tests/test_recipes.py`` fails when a header figure is stale or the two folders differ.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_COPY = HERE.parent / "mlx_lora" / "recipes_data"
SHIPPED_SCRIPTS = ("train_fuse_export.py", "prepare_data.py")



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

def shipped_files(folder: Path = HERE) -> list[Path]:
    return sorted(folder.glob("*.yaml")) + [folder / name for name in SHIPPED_SCRIPTS]


def refresh_memory_lines(path: Path) -> bool:
    """Rewrite ``path``'s memory and fits header lines from the estimator; True if they changed."""
    sys.path.insert(0, str(HERE.parent))
    from mlx_lora import config
    from mlx_lora.recipes import estimate_for_config, memory_text

    est = estimate_for_config(config.build(str(path), check=False))
    if est is None:
        raise SystemExit(f"{path}: its model is not in mlx_lora.recipes.KNOWN_MODELS; add its config facts there")
    mem, fits = memory_text(est)
    text = path.read_text(encoding="utf-8")
    new = re.sub(r"^# memory: .*$", f"# memory:  {mem}", text, count=1, flags=re.M)
    new = re.sub(r"^# fits: .*$", f"# fits:    {fits}", new, count=1, flags=re.M)
    if new != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(new)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    return new != text


def sync(dest: Path = PACKAGE_COPY) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in shipped_files()}
    for src in shipped_files():
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{src.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest / src.name)
    for stale in dest.iterdir():
        if stale.is_file() and stale.name not in wanted:
            stale.unlink()
    return sorted(wanted)


if __name__ == "__main__":
    for recipe in sorted(HERE.glob("*.yaml")):
        if refresh_memory_lines(recipe):
            print(f"updated the memory figures of {recipe.name}")
    names = sync()
    print(f"{PACKAGE_COPY}: {len(names)} files ({', '.join(names)})")
    sys.exit(0)
