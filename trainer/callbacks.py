"""The two callbacks every trainer entry point takes, and their do-nothing defaults.

The contract: `progress` only reports, and never stops anything. `should_stop` is checked
between units of work (an image batch, an epoch, a step); when it says stop, an entry point
that made something usable returns it, marked stopped (a LoRA run, a scorer, a grid), and one
that has nothing whole to return (encoding images) raises `Stopped`. The caller decides what
a stop means for it: the site's jobs end as "cancelled" either way.
"""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # progress(step, total, message)
StopCheck = Callable[[], bool]  # should_stop(): True once the caller wants the work to end


class Stopped(Exception):  # noqa: N818 - a request honoured, not an error
    """should_stop() said stop before the work had anything whole to return."""


def no_progress(step: int, total: int, message: str) -> None:
    """Ignore a progress report."""


def never_stop() -> bool:
    """Never ask the work to stop."""
    return False
