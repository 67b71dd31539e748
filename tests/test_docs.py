"""The README's and the guides' promises stay true: generated blocks (config reference, the "fits my
Mac?" table, the support matrix) match the code, the recipes table matches the recipe headers, the two
commands exist, the README stays a front page, and every relative link resolves."""

import re
from pathlib import Path

from mlx_lora.commands.recipes import list_recipes, memory_table_markdown
from mlx_lora.config import reference_markdown
from mlx_lora.converters.gguf_arch import support_matrix_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# block name in a <!-- name:start --> / <!-- name:end --> marker pair -> (the file that holds it, its generator)
GENERATED = {
    "config-reference": (DOCS / "configuration.md", reference_markdown),
    "mac-table": (DOCS / "memory-and-speed.md", memory_table_markdown),
    "support-matrix": (README, support_matrix_markdown),
}
README_MAX_LINES = 300


def _block(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", re.S)


def sync_readme() -> None:
    """Rewrite the generated blocks from the code (run this file as a script)."""
    for name, (path, make) in GENERATED.items():
        text = path.read_text(encoding="utf-8")
        text = _block(name).sub(
            lambda m, name=name, make=make: f"<!-- {name}:start -->\n{make()}\n<!-- {name}:end -->", text
        )
        path.write_text(text, encoding="utf-8")


def test_generated_blocks_match_the_code():
    for name, (path, make) in GENERATED.items():
        m = _block(name).search(path.read_text(encoding="utf-8"))
        assert m, f"{path.name} lacks the {name} block"
        assert m.group(1).strip() == make().strip(), f"{path.name} {name} is stale: run `python tests/test_docs.py`"


def test_readme_recipes_table_states_each_headers_memory_and_mac():
    rows = {
        m.group(1): [c.strip() for c in m.group(2).split("|")]
        for m in re.finditer(r"^\| `([\w-]+)` \|(.*)\|$", (DOCS / "recipes.md").read_text(encoding="utf-8"), re.M)
    }
    yamls = [r for r in list_recipes() if r.path.suffix == ".yaml"]
    assert yamls
    for r in yamls:
        assert r.name in rows, f"docs/recipes.md's table lacks {r.name}"
        *_, memory, fits = rows[r.name]
        assert r.get("memory").startswith(memory + " "), (r.name, memory, r.get("memory"))
        assert fits == r.get("fits"), (r.name, fits, r.get("fits"))


def test_readme_two_commands_exist():
    text = README.read_text(encoding="utf-8")
    root = README.parent
    for script in re.findall(r"^bash (\.ci/\w+)", text, re.M):
        assert (root / script).is_file(), script


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    for guide in sorted(DOCS.glob("*.md")):
        assert f"(docs/{guide.name})" in text, f"README does not link the guide docs/{guide.name}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    h = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    out, fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"^#{1,6} ", line):
            out.add(_slug(line.lstrip("#")))
    return out


def test_every_relative_link_resolves():
    """Each link to a file of the repository (and each #anchor) in README.md, ARCHITECTURE.md,
    bench/README.md and docs/ points at something that exists."""
    broken = []
    for page in [README, ROOT / "ARCHITECTURE.md", ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


if __name__ == "__main__":
    sync_readme()
