"""The README's promises stay true: generated blocks (config reference, the "fits my Mac?" table)
match the code, the recipes table matches the recipe headers, and the two commands exist."""

import re
from pathlib import Path

from mlx_lora.config import reference_markdown
from mlx_lora.converters.gguf_arch import support_matrix_markdown
from mlx_lora.commands.recipes import list_recipes, memory_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
# block name in the README's <!-- name:start --> / <!-- name:end --> markers -> its generator
GENERATED = {"config-reference": reference_markdown, "mac-table": memory_table_markdown,
             "support-matrix": support_matrix_markdown}


def _block(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", re.S)


def sync_readme() -> None:
    """Rewrite the README's generated blocks from the code (run this file as a script)."""
    text = README.read_text(encoding="utf-8")
    for name, make in GENERATED.items():
        text = _block(name).sub(lambda m, name=name, make=make: f"<!-- {name}:start -->\n{make()}\n<!-- {name}:end -->",
                                text)
    README.write_text(text, encoding="utf-8")


def test_readme_generated_blocks_match_the_code():
    text = README.read_text(encoding="utf-8")
    for name, make in GENERATED.items():
        m = _block(name).search(text)
        assert m, f"README lacks the {name} block"
        assert m.group(1).strip() == make().strip(), f"README {name} is stale: run `python tests/test_docs.py`"


def test_readme_recipes_table_states_each_headers_memory_and_mac():
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `([\w-]+)` \|(.*)\|$", README.read_text(encoding="utf-8"), re.M)}
    yamls = [r for r in list_recipes() if r.path.suffix == ".yaml"]
    assert yamls
    for r in yamls:
        assert r.name in rows, f"README recipes table lacks {r.name}"
        *_, memory, fits = rows[r.name]
        assert r.get("memory").startswith(memory + " "), (r.name, memory, r.get("memory"))
        assert fits == r.get("fits"), (r.name, fits, r.get("fits"))


def test_readme_two_commands_exist():
    text = README.read_text(encoding="utf-8")
    root = README.parent
    for script in re.findall(r"^bash (\.ci/\w+)", text, re.M):
        assert (root / script).is_file(), script


if __name__ == "__main__":
    sync_readme()
