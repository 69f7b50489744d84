"""Background jobs: the huey queue, the Job rows it runs, and their progress reporting."""

from __future__ import annotations

import logging
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flask import Flask, current_app
from huey import MemoryHuey, RedisHuey, SqliteHuey

from rating.models import Job, db, utcnow

log = logging.getLogger(__name__)

# kind -> function(job, progress) that does the work; modules register theirs at import.
HANDLERS: dict[str, Callable[[Job, JobProgress], dict | None]] = {}


class JobCancelled(Exception):
    """Raised inside a job when its owner pressed Cancel."""


def handler(kind: str):
    """Register the decorated function as the runner of jobs of `kind`."""

    def register(fn):
        HANDLERS[kind] = fn
        return fn

    return register


class JobProgress:
    """The `progress(step, total, message)` callback a job gets; it also notices Cancel."""

    min_interval = 0.5  # seconds between commits: SQLite serialises writes, progress can wait

    def __init__(self, job: Job):
        self.job = job
        self._last_commit = 0.0

    def __call__(self, step: int, total: int, message: str = "") -> None:
        """Record progress, commit it now and then, and raise JobCancelled if asked to stop."""
        self.job.progress, self.job.total = step, total
        if message:
            self.job.message = message[:500]
        now = time.monotonic()
        if now - self._last_commit >= self.min_interval or step >= total:
            db.session.commit()
            self._last_commit = now
            if self.should_stop():
                raise JobCancelled()

    def should_stop(self) -> bool:
        """Return whether Cancel was pressed (reads the row afresh)."""
        db.session.refresh(self.job, ["stop_requested"])
        return self.job.stop_requested


def make_queue(app: Flask):
    """Build the huey instance the settings ask for."""
    name = "tastebud"
    kind = app.config["QUEUE"]
    if kind == "immediate":
        return MemoryHuey(name, immediate=True)
    if kind == "redis" or app.config["REDIS_URL"]:
        return RedisHuey(name, url=app.config["REDIS_URL"])
    return SqliteHuey(name, filename=str(Path(app.instance_path) / "queue.db"))


def init_app(app: Flask) -> None:
    """Attach the queue and its one task, `run_job`, to the app."""
    huey = make_queue(app)

    @huey.task(name="run_job")
    def run_job_task(job_id: int) -> None:
        with app.app_context():
            run_job(job_id)

    app.extensions["huey"] = huey
    app.extensions["run_job_task"] = run_job_task


def enqueue(kind: str, owner_id: int | None, **params) -> Job:
    """Create a Job row and queue it; the worker picks it up by id."""
    if kind not in HANDLERS:
        raise ValueError(f"unknown job kind {kind!r}")
    job = Job(kind=kind, owner_id=owner_id, params=params, message="Waiting for a worker…")
    db.session.add(job)
    db.session.commit()
    current_app.extensions["run_job_task"](job.id)
    db.session.refresh(job)  # an immediate queue (tests) has already run it in another session
    return job


def run_here(kind: str, **params) -> Job:
    """Run a job in this process now, not on the queue (command-line tools use this)."""
    job = Job(kind=kind, params=params)
    db.session.add(job)
    db.session.commit()
    run_job(job.id)
    db.session.refresh(job)
    return job


def run_job(job_id: int) -> None:
    """Run one job and always leave it in a final state, whatever happens."""
    job = db.session.get(Job, job_id)
    if job is None or job.done:
        return
    if job.stop_requested:
        _finish(job, "cancelled", "Cancelled before it started.")
        return
    job.status, job.started_at = "running", utcnow()
    db.session.commit()
    status, message, error = "failed", "", None
    try:
        job.result = HANDLERS[job.kind](job, JobProgress(job)) or {}
        status, message = "succeeded", job.message or "Done."
    except JobCancelled:
        status, message = "cancelled", "Cancelled. What finished before the cancel is kept."
    except Exception as exc:
        log.exception("job %s (%s) failed", job.id, job.kind)
        db.session.rollback()
        message = f"Failed: {exc}"
        error = "".join(traceback.format_exception(exc)[-8:])[-4000:]
    finally:
        _finish(job, status, message, error)


def _finish(job: Job, status: str, message: str, error: str | None = None) -> None:
    job.status, job.message, job.error, job.finished_at = status, message[:500], error, utcnow()
    db.session.commit()


def request_stop(job: Job) -> None:
    """Ask a job to stop; a queued one is cancelled at once."""
    job.stop_requested = True
    if job.status == "queued":
        job.status, job.message, job.finished_at = "cancelled", "Cancelled.", utcnow()
    db.session.commit()


def fail_orphaned_jobs() -> int:
    """Mark jobs a dead worker left running as failed, so no progress bar stays stuck."""
    orphans = db.session.scalars(db.select(Job).where(Job.status == "running")).all()
    for job in orphans:
        _finish(job, "failed", "Failed: the worker stopped while this was running; start it again.")
    return len(orphans)


def start_embedded_worker(app: Flask, workers: int = 2):
    """Run huey's consumer on threads inside this process (the embedded default)."""
    consumer = app.extensions["huey"].create_consumer(workers=workers, worker_type="thread")
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    saved = {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in names}
    consumer.start()
    # huey installs handlers meant for its own main loop; the server's (Ctrl-C) must stay.
    for signum, previous in saved.items():
        signal.signal(signum, previous)
    return consumer
