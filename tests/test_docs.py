"""The README's promises stay true: the config reference matches the code."""

import re
from pathlib import Path

from mlx_lora.config import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", re.S)


def sync_readme() -> None:
    """Rewrite the README's config reference from the dataclasses (run this file as a script)."""
    text = README.read_text(encoding="utf-8")
    new = BLOCK.sub(lambda m: f"<!-- config-reference:start -->\n{reference_markdown()}\n<!-- config-reference:end -->", text)
    README.write_text(new, encoding="utf-8")


def test_readme_config_reference_matches_code():
    m = BLOCK.search(README.read_text(encoding="utf-8"))
    assert m, "README lacks the config-reference block"
    assert m.group(1).strip() == reference_markdown().strip(), (
        "README config reference is stale: run `python tests/test_docs.py`")


def test_readme_two_commands_exist():
    text = README.read_text(encoding="utf-8")
    root = README.parent
    for script in re.findall(r"^bash (\.ci/\w+)", text, re.M):
        assert (root / script).is_file(), script


if __name__ == "__main__":
    sync_readme()
