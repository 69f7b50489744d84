"""Checks on the bundled prompt list in trainer/prompts.txt."""

from pathlib import Path

import pytest

PROMPTS_PATH = Path(__file__).parent.parent / "trainer" / "prompts.txt"
SECTIONS = ("train", "eval")


def _parse(text: str) -> dict[str, list[str]]:
    """Split the prompts file into its sections; comments and blank lines are skipped."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            assert current in SECTIONS, f"line {lineno}: unknown section {line!r}"
            assert current not in sections, f"line {lineno}: section {line!r} repeated"
            sections[current] = []
            continue
        assert current is not None, f"line {lineno}: prompt before any section header"
        sections[current].append(line)
    return sections


@pytest.fixture(scope="module")
def sections() -> dict[str, list[str]]:
    return _parse(PROMPTS_PATH.read_text(encoding="utf-8"))


def test_sections_present(sections):
    assert set(sections) == set(SECTIONS)
    assert len(sections["train"]) > 0
    assert len(sections["eval"]) >= 30


def test_total_count(sections):
    assert sum(len(v) for v in sections.values()) >= 200


def test_no_empty_prompts(sections):
    for name, prompts in sections.items():
        for prompt in prompts:
            assert prompt.strip(), f"empty prompt in [{name}]"


def test_no_duplicates(sections):
    seen: set[str] = set()
    for prompts in sections.values():
        for prompt in prompts:
            key = prompt.casefold()
            assert key not in seen, f"duplicate prompt: {prompt!r}"
            seen.add(key)


def test_train_eval_disjoint(sections):
    train = {p.casefold() for p in sections["train"]}
    held_out = {p.casefold() for p in sections["eval"]}
    assert not train & held_out


def test_prompts_fit_clip_window(sections):
    # CLIP truncates at 77 tokens; 40 whitespace words is a conservative stand-in.
    for prompts in sections.values():
        for prompt in prompts:
            assert len(prompt.split()) <= 40, f"prompt too long: {prompt!r}"


def test_parser_skips_comments_and_blanks():
    parsed = _parse("# header\n\n[train]\na cat\n\n# note\n[eval]\na dog\n")
    assert parsed == {"train": ["a cat"], "eval": ["a dog"]}
