"""The project's own documents stay true to the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def test_the_architecture_document_names_every_module():
    text = ARCHITECTURE.read_text()
    modules = [
        path
        for folder in ("rating", "rating/sources", "trainer")
        for path in sorted((ROOT / folder).glob("*.py"))
        if path.name != "__init__.py"
    ]
    missing = [str(p.relative_to(ROOT)) for p in modules if not re.search(rf"\b{p.name}\b", text)]
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"


def test_the_readme_links_the_architecture_document_users_have():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/ARCHITECTURE.md)" in readme and "shared folder" not in readme
