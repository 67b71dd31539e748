"""The shape of the code: folders that are the layers, one direction of dependencies (as
ARCHITECTURE.md's table says), no import loops, one top-level import name in the built wheel, mlx-lm
internals touched in one module only."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("plumbing", "formats", "core", "commands")
PACKAGES = {"mlx_lora": ROOT / "mlx_lora", "mlx_lora.converters": ROOT / "converters"}
MLX_LM_COMPAT = "mlx_lora.plumbing.mlx_lm_compat"
# The layer each folder of mlx_lora/ holds (converters/ holds two: formats and exports, by the table).
FOLDER_LAYERS = {
    "plumbing": "plumbing",
    "data": "core",
    "model": "core",
    "training": "core",
    "inference": "core",
    "commands": "commands",
}
# Inside the layers, a finer order of groups; an import pointing back up it is an exception listed here.
GROUP_ORDER = ("plumbing", "formats", "data", "config", "model", "inference", "training", "testing", "commands")
BACK_UP = {
    # the data containers are typed by the one config's data section (DataConfig): data -> config
    ("mlx_lora.data.examples", "mlx_lora.config"),
    ("mlx_lora.data.mixture", "mlx_lora.config"),
    # the config checks GRPO reward names with the rewards module's own parser (one grammar, not two)
    ("mlx_lora.config", "mlx_lora.training.rewards"),
}


def module_name(path: Path) -> str:
    for pkg, folder in PACKAGES.items():
        if folder in path.parents:
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            return ".".join([pkg, *parts])
    raise AssertionError(f"{path} is outside the packages")


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))}


def tabled_modules() -> dict[str, Path]:
    """Every module but the subpackages' own __init__ files (which only name their folder)."""
    return {
        n: p
        for n, p in source_modules().items()
        if not (p.name == "__init__.py" and p.parent.parent == PACKAGES["mlx_lora"])
    }


def layer_of(name: str, layers: dict[str, str]) -> str:
    if name in layers:
        return layers[name]
    return FOLDER_LAYERS[name.split(".")[1]]  # a subpackage's __init__


def group_of(name: str, layers: dict[str, str]) -> str:
    parts = name.split(".")
    if parts[1] == "converters":
        return "formats" if layer_of(name, layers) == "formats" else "commands"
    if len(parts) == 2:
        return {"config": "config", "mlx_lm_config": "config", "testing": "testing", "__main__": "commands"}.get(
            parts[1], "plumbing"
        )
    return parts[1] if parts[1] in GROUP_ORDER else FOLDER_LAYERS[parts[1]]


def documented_layers() -> dict[str, str]:
    """module -> layer, from the table in ARCHITECTURE.md."""
    out = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([\w/]+\.py)` \| (\w+) \|", line)
        if m:
            out[module_name(ROOT / m.group(1))] = m.group(2)
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in ("mlx_lora", "converters")}
    modules = source_modules()
    return {t for t in found if t in modules} | {
        t.rpartition(".")[0] for t in found if t not in modules and t.rpartition(".")[0] in modules
    }


def test_every_module_is_in_the_architecture_table():
    documented, actual = documented_layers(), tabled_modules()
    assert set(documented) == set(actual), (
        f"ARCHITECTURE.md lists modules that do not exist: {sorted(set(documented) - set(actual))}; "
        f"modules missing from it: {sorted(set(actual) - set(documented))}"
    )
    assert set(documented.values()) <= set(LAYERS)


def test_imports_point_one_way():
    layers = documented_layers()
    rank = {name: LAYERS.index(layer) for name, layer in layers.items()}
    wrong = []
    for name, path in source_modules().items():
        for target in sorted(imports_of(name, path) - {name}):
            if rank.get(target, LAYERS.index(layer_of(target, layers))) > rank.get(
                name, LAYERS.index(layer_of(name, layers))
            ):
                wrong.append(f"{name} ({layer_of(name, layers)}) imports {target} ({layer_of(target, layers)})")
    assert not wrong, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_folders_are_the_layers():
    """A module's folder says its layer: ARCHITECTURE.md's table agrees with the folder."""
    layers = documented_layers()
    wrong = [
        f"{name}: table says {layer}, folder {name.split('.')[1]}/ holds {FOLDER_LAYERS[name.split('.')[1]]}"
        for name, layer in layers.items()
        if len(name.split(".")) > 2
        and name.split(".")[1] in FOLDER_LAYERS
        and FOLDER_LAYERS[name.split(".")[1]] != layer
    ]
    assert not wrong, "\n".join(wrong)
    assert len([p for p in PACKAGES["mlx_lora"].glob("*.py")]) <= 5, "mlx_lora/ keeps its modules in subpackages"


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {
        name: {t for t in imports_of(name, path) - {name} if t in modules and t != "mlx_lora"}
        for name, path in modules.items()
    }


def test_no_import_loops():
    """No module reaches itself through imports, counting imports written inside functions."""
    graph = import_graph()
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(" <-> ".join(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_imports_pointing_back_up_are_the_named_exceptions():
    layers = documented_layers()
    back = {
        (name, t)
        for name, targets in import_graph().items()
        for t in targets
        if GROUP_ORDER.index(group_of(t, layers)) > GROUP_ORDER.index(group_of(name, layers))
    }
    assert back <= BACK_UP, f"imports pointing back up the order {GROUP_ORDER}: {sorted(back - BACK_UP)}"
    assert len(BACK_UP) <= 3


# Folders whose modules may reach into mlx-lm only through MLX_LM_COMPAT. bench/ runs mlx-lm's own
# trainer for comparison, and tests compare against mlx-lm's own code, so both are left out.
MLX_LM_CHECKED = ("mlx_lora", "converters", "recipes")
MLX_LM_INTERNALS = ("mlx_lm.models.cache", "mlx_lm.tuner")


def mlx_lm_internals(path: Path) -> list[str]:
    """What ``path`` imports of mlx-lm beyond its public API: a private name, or a module of
    :data:`MLX_LM_INTERNALS` (or below it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            pairs = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            pairs = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in pairs:
            if module.split(".")[0] != "mlx_lm":
                continue
            dotted = module if name is None else f"{module}.{name}"
            private = any(part.startswith("_") for part in dotted.split("."))
            internal = any(dotted == m or dotted.startswith(m + ".") for m in MLX_LM_INTERNALS)
            if private or internal:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {dotted}")
    return found


def test_mlx_lm_internals_are_used_in_one_module_only():
    compat = ROOT / (MLX_LM_COMPAT.replace(".", "/") + ".py")
    assert mlx_lm_internals(compat), f"{compat} no longer uses mlx-lm internals: update this test"
    offenders = [
        hit
        for folder in MLX_LM_CHECKED
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != compat
        for hit in mlx_lm_internals(p)
    ]
    assert not offenders, (
        "mlx-lm internals used outside mlx_lora/plumbing/mlx_lm_compat.py (add what you need there):\n"
        + "\n".join(offenders)
    )


def test_no_import_names_the_repository_folder():
    """Code imports mlx_lora.converters, never the folder name converters (which is not installed)."""
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in (ROOT / "mlx_lora", ROOT / "converters", ROOT / "tests", ROOT / "recipes", ROOT / "bench")
        for p in folder.rglob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s*(from|import) converters\b", line)
    ]
    assert not offenders


def test_the_wheel_installs_one_top_level_name(tmp_path):
    """Build the wheel from the tracked files alone: mlx_lora is its only import name, with the
    converters and the recipes inside it."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked files")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mlx_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mlx_lora"}
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["mlx_lora"]
    for p in (ROOT / "converters").glob("*.py"):
        assert f"mlx_lora/converters/{p.name}" in names
    recipes = {Path(n).name for n in names if n.startswith("mlx_lora/recipes_data/")}
    assert {p.name for p in (ROOT / "recipes").glob("*.yaml")} <= recipes
    assert {"train_fuse_export.py", "prepare_data.py"} <= recipes
    assert "mlx_lora/templates/chatml.jinja" in names
    assert any(n.startswith("mlx_lora/demo_data/triage/") for n in names)
    assert {Path(n).name for n in names if n.startswith("mlx_lora/demo_data/")} >= {
        p.name for p in (ROOT / "mlx_lora" / "demo_data").rglob("*.jsonl")
    }
    # The build is quiet: no deprecation (the license is an SPDX expression), no data folder left
    # out of the packages; and the metadata says MIT in the field tools read.
    assert "Deprecat" not in r.stderr and "absent from the `packages`" not in r.stderr, r.stderr[-3000:]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines()
