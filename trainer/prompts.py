"""The bundled prompt set (trainer/prompts.txt): training prompts and held-out evaluation ones."""

from __future__ import annotations

from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
SECTIONS = ("train", "eval")


def read_prompts(section: str, path: str | Path = PROMPTS_FILE) -> list[str]:
    """Return the prompts of one section ("train" or "eval"), skipping comments and blanks."""
    if section not in SECTIONS:
        raise ValueError(f"unknown prompt section {section!r}; expected one of {SECTIONS}")
    found: dict[str, list[str]] = {}
    current = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = found.setdefault(line[1:-1], [])
        elif current is not None:
            current.append(line)
    return found.get(section, [])
