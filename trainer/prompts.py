"""Prompt sets: training prompts and held-out evaluation ones, one file per set.

Two ship here: prompts.txt (SD prose, for real bases) and prompts_demo.txt (the demo world's
own words). Any base can bring its own file in the same format.
"""

from __future__ import annotations

from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
DEMO_PROMPTS_FILE = Path(__file__).with_name("prompts_demo.txt")
SECTIONS = ("train", "eval")


def read_prompts(section: str, path: str | Path = PROMPTS_FILE) -> list[str]:
    """Return the prompts of one section ("train" or "eval"), skipping comments and blanks."""
    if section not in SECTIONS:
        raise ValueError(f"unknown prompt section {section!r}; expected one of {SECTIONS}")
    if not Path(path).is_file():
        raise ValueError(f"no prompt file at {path}")
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
    if not found.get(section):
        raise ValueError(f"prompt file {path} has no [{section}] prompts")
    return found[section]
