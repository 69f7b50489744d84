"""The house rules of the layout: the trainer stands alone, the web process never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB_ONLY = ("flask", "flask_login", "flask_wtf", "sqlalchemy", "rating", "werkzeug", "huey")


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a Python file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_trainer_never_imports_the_web_side():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & set(WEB_ONLY))
        for path in sorted((ROOT / "trainer").rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_web_process_never_loads_torch_or_diffusers():
    # A fresh interpreter: this one has torch loaded by the other tests.
    code = (
        "import sys, app; app.create_app({'TESTING': True, 'SECRET_KEY': 't'},"
        f" instance_path={str(ROOT / 'test-artifacts' / 'layout-instance')!r});"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
