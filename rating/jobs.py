"""Background jobs: the huey queue, the Job rows it runs, and their progress reporting."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from huey import MemoryHuey, RedisHuey, SqliteHuey
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import ServiceUnavailable

from rating.models import Job, db, utcnow
from trainer.callbacks import Stopped

log = logging.getLogger(__name__)

# kind -> function(job, progress) that does the work; modules register theirs at import.
HANDLERS: dict[str, Callable[[Job, JobProgress], dict | None]] = {}
# Kinds that need the GPU: they go to their own queue, whose worker runs one at a time.
GPU_KINDS: set[str] = set()
# kind -> function(job) that keeps what a dead worker's job finished (a LoRA checkpoint).
SALVAGE: dict[str, Callable[[Job], None]] = {}
# One GPU job at a time in this process, even if someone starts the GPU queue with more threads.
GPU_LOCK = threading.Lock()
LOG_CHARS = 4000  # how much of a job's log the row keeps (the tail)
WORKER = f"{socket.gethostname()}:{os.getpid()}"
WORKER_NICENESS = 10  # embedded job threads run this much nicer than the server (Linux)


class JobCancelled(Exception):
    """Raised inside a job when its owner pressed Cancel."""


class QueueDown(ServiceUnavailable):
    """The job queue could not be reached (Redis down): the job was not started, is marked
    failed, and holds no lock; the person is told to try again (HTTP 503)."""

    description = "Nothing was started and nothing is lost; try again in a moment."


class JobBusy(Exception):
    """A job with the same lock key is already queued or running; `job` is that one."""

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} is already {job.status}")
        self.job = job


@dataclass(frozen=True)
class JobKind:
    """A kind of job: the function that runs it, its queue, how a dead worker's is salvaged."""

    name: str
    run: Callable[[Job, JobProgress], dict | None]
    gpu: bool = False  # the GPU queue: one at a time per worker
    salvage: Callable[[Job], None] | None = None  # run when its worker died mid-run


def register(kind: JobKind) -> None:
    """Make the queues run jobs of this kind (rating/job_kinds.py lists the site's)."""
    HANDLERS[kind.name] = kind.run
    if kind.gpu:
        GPU_KINDS.add(kind.name)
    if kind.salvage is not None:
        SALVAGE[kind.name] = kind.salvage


def handler(kind: str, *, gpu: bool = False, salvage: Callable[[Job], None] | None = None):
    """Register the decorated function as a job kind (for one-offs such as tests)."""

    def decorate(fn):
        register(JobKind(kind, fn, gpu, salvage))
        return fn

    return decorate


class JobProgress:
    """The `progress(step, total, message)` callback a job gets; it also notices Cancel."""

    min_interval = 0.5  # seconds between commits: SQLite serialises writes, progress can wait

    def __init__(self, job: Job):
        self.job = job
        self._last_commit = self._last_check = 0.0

    def __call__(self, step: int, total: int, message: str = "") -> None:
        """Record progress and raise JobCancelled if Cancel was pressed: for the job's own
        loops. Trainer code gets `report` and `should_stop` (trainer/callbacks.py)."""
        self.report(step, total, message)
        self.check()

    def check(self, *, fresh: bool = False) -> None:
        """Raise JobCancelled if Cancel was pressed (read at most twice a second, or now)."""
        if fresh:
            self._sync(time.monotonic())
        if self.should_stop():
            raise JobCancelled()

    def report(self, step: int, total: int, message: str = "", shown: str = "") -> None:
        """Record progress and commit it now and then; never raises. The page shows `shown`
        where given (plain words for a trainer's figures), the log keeps `message`."""
        if step == 0 or total != self.job.total:
            # A count starts: the phase's pace, and so its ETA, is measured from now, not
            # from the loading and setup before it.
            self.job.phase_started_at = utcnow()
        self.job.progress, self.job.total = step, total
        if shown or message:
            self.job.message = (shown or message)[:500]
        now = time.monotonic()
        if now - self._last_commit >= self.min_interval or step >= total:
            if message:
                self.log(message)
            self._sync(now)

    def _sync(self, now: float) -> None:
        """Commit what changed (a heartbeat too), then read whether Cancel was pressed."""
        self.job.heartbeat_at = utcnow()
        db.session.commit()  # ends the transaction, so the refresh sees the latest row
        db.session.refresh(self.job, ["stop_requested"])
        self._last_commit = self._last_check = now

    def part(self, before: int, total: int) -> Callable[..., None]:
        """A `report` for one part of a longer count: its own steps shown after `before` of
        `total`, so a phase made of several parts fills one bar that never starts over."""
        return lambda step, _of, message="": self.report(before + step, total, message)

    def in_words(self, shown: str) -> Callable[..., None]:
        """A `report` for a trainer whose messages are figures ("epoch 3: loss 0.412"): the
        page says `shown`, and the figures go to the log."""
        return lambda step, total, message="": self.report(step, total, message, shown)

    def should_stop(self) -> bool:
        """Return whether Cancel was pressed (reads the row afresh, at most twice a second)."""
        now = time.monotonic()
        if now - self._last_check >= self.min_interval:
            self._sync(now)
        return self.job.stop_requested

    def phase(self, name: str, message: str) -> None:
        """Start the next phase: its own counter and ETA; raise JobCancelled if asked to stop."""
        self.job.phase, self.job.phase_started_at = name, utcnow()
        self.job.progress, self.job.total, self.job.message = 0, 0, message[:500]
        self.log(f"[{name}] {message}")
        self._sync(time.monotonic())
        if self.job.stop_requested:
            raise JobCancelled()

    def log(self, line: str) -> None:
        """Add a line to the job's log, keeping the last LOG_CHARS characters."""
        stamp = utcnow().strftime("%H:%M:%S")
        self.job.log = ((self.job.log or "") + f"{stamp} {line}\n")[-LOG_CHARS:]


def make_queue(app: Flask, name: str):
    """Build a huey instance of the kind the settings ask for."""
    kind = app.config["QUEUE"]
    if kind == "immediate":
        return MemoryHuey(name, immediate=True)
    if kind == "redis" or app.config["REDIS_URL"]:
        return RedisHuey(name, url=app.config["REDIS_URL"])
    return SqliteHuey(name, filename=str(Path(app.instance_path) / "queue.db"))


def init_app(app: Flask, kinds: Iterable[JobKind]) -> None:
    """Register the job kinds, and attach two queues to the app: light jobs, and GPU jobs
    (whose worker runs one at a time). Imports never wait behind a training: each queue has its
    own consumer.
    """
    for kind in kinds:
        register(kind)
    huey, gpu_huey = make_queue(app, "tastebud"), make_queue(app, "tastebud-gpu")

    @huey.task(name="run_job")
    def run_job_task(job_id: int) -> None:
        with app.app_context():
            run_job(job_id)

    @gpu_huey.task(name="run_gpu_job")
    def run_gpu_job_task(job_id: int) -> None:
        with GPU_LOCK, app.app_context():
            run_job(job_id)

    app.extensions.update(
        huey=huey, gpu_huey=gpu_huey, run_job_task=run_job_task, run_gpu_job_task=run_gpu_job_task
    )
    app.cli.add_command(cli)


def enqueue(kind: str, owner_id: int | None, *, lock_key: str | None = None, **params) -> Job:
    """Create a Job row and queue it; the worker picks it up by id.

    With `lock_key`, raise JobBusy (carrying the unfinished job) when one holds the key.
    """
    if kind not in HANDLERS:
        raise ValueError(f"unknown job kind {kind!r}")
    job = Job(
        kind=kind, owner_id=owner_id, params=params, lock_key=lock_key, message=waiting_text(kind)
    )
    db.session.add(job)
    try:
        db.session.commit()
    except IntegrityError:  # the unique lock key: another job holds it, in the database's eyes
        db.session.rollback()
        busy = db.session.scalar(db.select(Job).where(Job.lock_key == lock_key))
        if busy is None or fail_if_orphaned(busy):  # it ended, or its worker is gone: again
            return enqueue(kind, owner_id, lock_key=lock_key, **params)
        raise JobBusy(busy) from None
    try:
        _queue_task(job)
    except Exception as error:  # the queue's store is unreachable: nothing will ever run it
        log.error("job %s (%s) could not be queued: %s", job.id, kind, error)
        said = "Not started: the job queue could not be reached. Try again in a moment."
        _finish(job, "failed", said, f"{type(error).__name__}: {error}")  # frees its lock
        raise QueueDown() from error
    db.session.refresh(job)  # an immediate queue (tests) has already run it in another session
    return job


def enqueue_once(kind: str, owner_id: int | None, lock_key: str, **params) -> Job:
    """Queue a job unless one holding `lock_key` is unfinished; return the one that runs."""
    try:
        return enqueue(kind, owner_id, lock_key=lock_key, **params)
    except JobBusy as busy:
        return busy.job


def latest(owner_id: int, kind: str, **params) -> Job | None:
    """A person's newest job of `kind` whose params include `params` (among their last 100)."""
    found = db.session.scalars(
        db.select(Job)
        .where(Job.owner_id == owner_id, Job.kind == kind)
        .order_by(Job.id.desc())
        .limit(100)
    )
    return next((j for j in found if params.items() <= j.params.items()), None)


def waiting_text(kind: str) -> str:
    """Say what a queued job waits for."""
    if kind in GPU_KINDS:
        return "Queued for the training worker, which runs one training at a time…"
    return "Queued for a worker…"


def starting_text(kind: str) -> str:
    """Say what a job does before its first report."""
    if kind in GPU_KINDS:  # importing torch and diffusers takes seconds in a fresh process
        return "Starting: loading torch and the model code…"
    return "Starting…"


def run_here(kind: str, **params) -> Job:
    """Run a job in this process now, not on the queue (command-line tools use this)."""
    job = Job(kind=kind, params=params)
    db.session.add(job)
    db.session.commit()
    run_job(job.id)
    db.session.refresh(job)
    return job


def run_job(job_id: int) -> None:
    """Run one job and always leave it in a final state, whatever happens.

    The job is claimed atomically (queued → running), so a task handed out twice (re-queued
    after the queue seemed to lose it) runs once. While it runs, a thread of its own beats its
    heartbeat (`Heartbeat`), so a live worker is never taken for a dead one.
    """
    job = db.session.get(Job, job_id)
    if job is None or job.status != "queued":
        return  # done, or another worker already runs it
    if job.stop_requested:
        _finish(job, "cancelled", "Cancelled before it started.")
        return
    now = utcnow()
    claimed = db.session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="running", started_at=now, heartbeat_at=now, worker=WORKER)
        .values(message=starting_text(job.kind))
    ).rowcount
    db.session.commit()
    if not claimed:
        return
    db.session.refresh(job)
    status, message, error = "failed", "", None
    every = float(current_app.config["JOB_HEARTBEAT_SECONDS"])
    try:
        with Heartbeat(db.engine, job_id, every):
            job.result = HANDLERS[job.kind](job, JobProgress(job)) or {}
        status, message = "succeeded", job.message or "Done."
    except (JobCancelled, Stopped):  # the job's own check, or a trainer's (callbacks.py)
        status, message = "cancelled", "Cancelled. What finished before the cancel is kept."
    except Exception as exc:
        log.exception("job %s (%s) failed", job.id, job.kind)
        db.session.rollback()
        message = f"Failed: {exc}"
        error = "".join(traceback.format_exception(exc)[-8:])[-4000:]
    finally:
        if _still_mine(job):
            _finish(job, status, message, error)


def _still_mine(job: Job) -> bool:
    """Tell whether `job` is still running under this worker: not failed meanwhile by another
    process that took this one for dead (its heartbeat could not reach the database)."""
    try:
        db.session.refresh(job, ["status", "worker"])
    except Exception:  # the database is away: write the outcome when it answers (or fail)
        db.session.rollback()
        return True
    if job.status == "running" and job.worker == WORKER:
        return True
    log.warning("job %s ended here but was already %s elsewhere", job.id, job.status)
    return False


def _finish(job: Job, status: str, message: str, error: str | None = None) -> None:
    job.status, job.message, job.error, job.finished_at = status, message[:500], error, utcnow()
    job.lock_key = None  # the next job of its kind may start
    db.session.commit()


class Heartbeat:
    """Beat a running job's heartbeat every `every` seconds from a thread of its own.

    Jobs report progress only between steps, and a step (loading a model, encoding a pool)
    can take minutes; the heartbeat says the worker lives whatever the job is doing. It writes
    with its own connection, so it never touches the job's session.
    """

    def __init__(self, engine, job_id: int, every: float):
        self.engine, self.job_id, self.every = engine, job_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.engine.begin() as connection:
                    connection.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.status == "running")
                        .where(Job.worker == WORKER)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as error:  # the database is away for now: beat again later
                log.warning("job %s: heartbeat not written: %s", self.job_id, error)


def request_stop(job: Job) -> None:
    """Ask a job to stop; a queued one is cancelled at once."""
    job.stop_requested = True
    if job.status == "queued":
        job.status, job.message, job.finished_at = "cancelled", "Cancelled.", utcnow()
        job.lock_key = None
    db.session.commit()


def _worker_gone(job: Job, stale_after: timedelta) -> bool:
    """Tell whether the process running `job` is dead (same host) or silent for too long."""
    if not job.worker or ":" not in job.worker:
        return True
    host, _, pid = job.worker.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, under another user
        if int(pid) == os.getpid():
            return False
    beat = job.heartbeat_at or job.started_at
    return beat is None or utcnow() - beat > stale_after


def fail_orphaned_jobs(stale_after: float | None = None) -> int:
    """Mark jobs a dead worker left running as failed, so no progress bar stays stuck.

    A job belongs to a dead worker when its process on this host is gone, or when it has
    not beaten its heartbeat for `stale_after` seconds (a worker on another machine that died).
    """
    running = db.session.scalars(db.select(Job).where(Job.status == "running")).all()
    return sum(fail_if_orphaned(job, stale_after) for job in running)


def fail_if_orphaned(job: Job, stale_after: float | None = None) -> bool:
    """Fail a running job whose worker is gone (see `fail_orphaned_jobs`), salvaging what it
    finished; return whether it was. Any live process may ask, at any time: the web does
    when it shows a job or a click meets the job's lock, and every process's sweeper
    (`Sweeper`) does every JOB_SWEEP_SECONDS. The row changes only if it is as it was seen
    (no heartbeat came meanwhile), so two processes never both fail and salvage it."""
    if stale_after is None:
        stale_after = current_app.config["JOB_STALE_SECONDS"]
    if job.status != "running" or not _worker_gone(job, timedelta(seconds=stale_after)):
        return False
    said = "Failed: the worker stopped while this was running; start it again."
    seen_beat = (
        Job.heartbeat_at.is_(None)
        if job.heartbeat_at is None
        else Job.heartbeat_at == job.heartbeat_at
    )
    won = db.session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running", Job.worker == job.worker, seen_beat)
        .values(status="failed", message=said, finished_at=utcnow(), lock_key=None)
    ).rowcount
    db.session.commit()
    db.session.refresh(job)
    if not won:
        return False
    log.warning("job %s (%s): its worker %s stopped; failed", job.id, job.kind, job.worker)
    if job.kind in SALVAGE:
        try:
            SALVAGE[job.kind](job)
        except Exception:  # salvaging is a bonus; the job is failed either way
            log.exception("could not salvage job %s", job.id)
            db.session.rollback()
    return True


def queued_ids(queue) -> set[int]:
    """The job ids waiting in a huey queue (raises when the queue can't be reached)."""
    return {task.args[0] for task in queue.pending() if task.args}


def requeue_lost_jobs(after: float | None = None) -> int:
    """Queue again the jobs whose rows say "queued" but which no queue holds (Redis lost them
    in a crash or a restart without persistence); return how many.

    Only jobs queued at least `after` seconds ago count, since a task being handed to a worker
    is briefly in neither place; and `run_job` claims a job atomically, so one queued twice
    still runs once.
    """
    if after is None:
        after = current_app.config["JOB_REQUEUE_AFTER_SECONDS"]
    if current_app.config["QUEUE"] == "immediate":
        return 0  # tests: jobs run as they are queued
    waiting = queued_ids(current_app.extensions["huey"])
    waiting |= queued_ids(current_app.extensions["gpu_huey"])
    cutoff = utcnow() - timedelta(seconds=after)
    lost = db.session.scalars(
        db.select(Job).where(
            Job.status == "queued", Job.created_at <= cutoff, Job.id.not_in(waiting or [-1])
        )
    ).all()
    for job in lost:
        log.warning("job %s (%s) was lost by the queue; queued again", job.id, job.kind)
        JobProgress(job).log("The job queue had lost this job (restarted?); queued it again.")
        db.session.commit()
        _queue_task(job)
    return len(lost)


def _queue_task(job: Job) -> None:
    """Hand a job to its queue (raises when the queue can't be reached)."""
    task = "run_gpu_job_task" if job.kind in GPU_KINDS else "run_job_task"
    current_app.extensions[task](job.id)


def sweep() -> dict[str, int]:
    """Fail the jobs of dead workers and re-queue the jobs the queue lost; return the counts."""
    failed = fail_orphaned_jobs()
    try:
        requeued = requeue_lost_jobs()
    except Exception as error:  # the queue is down: its jobs wait until it is back
        log.warning("could not look for lost jobs: %s", error)
        db.session.rollback()
        requeued = 0
    return {"failed": failed, "requeued": requeued}


class Sweeper:
    """Run `sweep` every JOB_SWEEP_SECONDS on a thread of this process, until stopped.

    Every process that serves the site or runs jobs has one, so a job is never left stuck
    for want of a restart: a dead worker's job is failed within JOB_STALE_SECONDS +
    JOB_SWEEP_SECONDS, and a job the queue lost is queued again.
    """

    def __init__(self, app: Flask):
        self.app, self.every = app, float(app.config["JOB_SWEEP_SECONDS"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with self.app.app_context():
                try:
                    sweep()
                except Exception:  # the database is away: look again next time
                    log.warning("job sweep failed", exc_info=True)
                finally:
                    db.session.remove()


class Workers:
    """The consumers of both queues, started together and stopped together."""

    def __init__(self, consumers: list):
        self.consumers = consumers

    def stop(self, graceful: bool = False) -> None:
        """Stop every consumer (graceful: let running jobs finish first)."""
        for consumer in self.consumers:
            consumer.stop(graceful=graceful)


def yield_to_requests() -> None:
    """Lower the calling thread's CPU priority (Linux), so the server's threads come first.

    Embedded workers share the machine with the threads that answer raters; decoding uploads
    or training runs mostly outside the GIL, where the kernel's scheduler decides who runs.
    """
    if sys.platform.startswith("linux"):  # elsewhere the call would lower the whole process
        thread = threading.get_native_id()
        try:
            nice = os.getpriority(os.PRIO_PROCESS, thread) + WORKER_NICENESS
            os.setpriority(os.PRIO_PROCESS, thread, min(nice, 19))
        except OSError:
            log.warning("could not lower a job worker thread's priority", exc_info=True)


def start_embedded_worker(app: Flask, workers: int | None = None, gpu: bool | None = None):
    """Run huey's consumers on threads inside this process (the embedded default).

    Light jobs get `workers` threads (LIGHT_WORKERS); GPU jobs get one thread of their own,
    unless EMBEDDED_GPU_WORKER is off because GPU machines run `flask jobs worker --gpu`.
    Each worker thread runs at a lower priority than the server's (`yield_to_requests`).
    """
    workers = workers or int(app.config["LIGHT_WORKERS"])
    gpu = app.config["EMBEDDED_GPU_WORKER"] if gpu is None else gpu
    queues = [("huey", workers)] + ([("gpu_huey", 1)] if gpu else [])
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    saved = {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in names}
    consumers = []
    for queue, threads in queues:
        # max_delay: an idle worker looks for new jobs at least every second, not every 10 s
        app.extensions[queue].on_startup("yield_to_requests")(yield_to_requests)
        consumer = app.extensions[queue].create_consumer(
            workers=threads, worker_type="thread", max_delay=1.0
        )
        consumer.start()
        consumers.append(consumer)
    # huey installs handlers meant for its own main loop; the server's (Ctrl-C) must stay.
    for signum, previous in saved.items():
        signal.signal(signum, previous)
    return Workers(consumers)


cli = AppGroup("jobs", help="Run job workers outside the web server.")


@cli.command("worker")
@click.option("--gpu", is_flag=True, help="Run the GPU queue (one job at a time).")
@click.option("--threads", type=click.IntRange(1, 64), help="Light-queue threads.")
def worker_command(gpu: bool, threads: int | None) -> None:
    """Run one queue's worker here until Ctrl-C; it also sweeps for stuck and lost jobs."""
    app = current_app._get_current_object()
    found = sweep()
    if found["failed"]:
        click.echo(f"marked {found['failed']} job(s) left running by a stopped worker as failed")
    workers = 1 if gpu else threads or int(app.config["LIGHT_WORKERS"])
    queue = app.extensions["gpu_huey" if gpu else "huey"]
    click.echo(f"running the {'GPU' if gpu else 'light'} queue with {workers} thread(s)")
    sweeper = Sweeper(app).start()
    try:
        queue.create_consumer(workers=workers, worker_type="thread", max_delay=1.0).run()
    finally:
        sweeper.stop()
