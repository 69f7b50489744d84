"""Read a job widget's state from HTML as a browser would: by element and attribute."""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser

FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobState:
    id: int
    status: str
    phase: str

    @property
    def done(self) -> bool:
        return self.status in FINAL


class _FirstJob(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: JobState | None = None

    def handle_starttag(self, tag, attrs):
        given = dict(attrs)
        if self.found is None and "job" in (given.get("class") or "").split():
            self.found = JobState(
                id=int(given["id"].removeprefix("job-")),
                status=given["data-status"],
                phase=given.get("data-phase") or "",
            )


def job_state(html: str) -> JobState:
    """The first job widget in `html`: its id, status and phase (AssertionError if none)."""
    parser = _FirstJob()
    parser.feed(html)
    assert parser.found is not None, f"no job widget in {html[:300]!r}"
    return parser.found
