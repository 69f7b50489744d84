"""Wait for work by polling with a bound, never by sleeping a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check, limit: float, what: str, details: Callable[[], str] = str):
    """Poll `check` every 0.02–0.1 s until it returns something true, and return that; fail
    after `limit` seconds, saying `what` did not happen (and `details()`, e.g. server logs)."""
    deadline, pause = time.monotonic() + limit, 0.02
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    raise AssertionError(f"{what}: not within {limit} s\n{details()}")
