"""The two callbacks every trainer entry point takes, and their do-nothing defaults."""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # progress(step, total, message)
StopCheck = Callable[[], bool]  # should_stop(): True once the caller wants the work to end


def no_progress(step: int, total: int, message: str) -> None:
    """Ignore a progress report."""


def never_stop() -> bool:
    """Never ask the work to stop."""
    return False
