"""The database connection's care: SQLite's settings, a server's connections checked after
they sat idle, one process at a time migrating, one writer at a time waiting its turn without
SQLite's sleeps, and a request's session ended cleanly even when the server dropped its
connection."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from functools import wraps

try:
    import fcntl
except ImportError:  # Windows: threads of one process still take turns
    fcntl = None

from filelock import FileLock
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from rating.models import db

log = logging.getLogger(__name__)
MIGRATION_LOCK = 0x7A57EB0D  # the advisory lock key of migrations (any fixed number)


def ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection to a database server before use, but only one that sat idle.

    SQLAlchemy's `pool_pre_ping` pings on every checkout, and a request checks out twice (its
    rating's commit returns the connection): two extra round trips per key press, a quarter of
    them. A connection busy a moment ago is alive; one idle across a server restart is not,
    and the pool swaps it for a fresh one here (DisconnectionError), so the morning's first
    request does not fail. A restart under load fails the one request that meets it first,
    and SQLAlchemy then renews the whole pool, as it does for any dropped connection."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise DisconnectionError(f"a pooled connection is gone: {error}") from error


@contextmanager
def migration_lock():
    """Let one process at a time migrate the database: the web and its workers may start
    together (Compose, or a worker beside `python app.py`), and two upgrades at once would
    both create the same tables. PostgreSQL: an advisory lock; SQLite: a lock file beside it."""
    if db.engine.dialect.name == "sqlite":
        database = db.engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with FileLock(f"{database}.migrate-lock"):
            yield
        return
    if db.engine.dialect.name != "postgresql":
        yield
        return
    with db.engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()


_WRITE_TURN = threading.Lock()
_write_lock_files: dict[str, int] = {}


@contextmanager
def write_turn():
    """Hold SQLite's write turn for a short write transaction (execute, then commit inside).

    SQLite lets one connection write at a time; one that finds the database locked sleeps in
    growing steps (1, 2, 5, 10… ms) before trying again, so under many raters a rating could
    go on sleeping tens of milliseconds after the writer before it had finished. Here writers
    queue instead: on a lock of this process's threads, then on a lock file beside the
    database shared by every process, and each wakes as soon as the one before is done.
    Other databases queue writers themselves: for them this does nothing."""
    database = db.engine.url.database if db.engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with _WRITE_TURN:
        if fcntl is None:
            yield
            return
        descriptor = _write_lock_files.get(database)
        if descriptor is None:
            descriptor = os.open(f"{database}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
            _write_lock_files[database] = descriptor
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # blocks without the GIL; wakes on release
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)


def statement_by_statement(view):
    """Run a view with each statement its own transaction (autocommit), for a hot path whose
    one write is a single atomic statement and whose reads need no common snapshot.

    A server database then sees no BEGIN and no COMMIT: two round trips fewer on every call,
    each a wait for another process's turn on a busy machine. The setting lasts while the
    request holds its connection; the pool restores the usual transactions when it returns.
    Outermost, above `login_required`, so that loading the person is a statement like the
    rest."""

    @wraps(view)
    def each_statement_commits(*args, **kwargs):
        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        return view(*args, **kwargs)

    return each_statement_commits


def end_session(_error) -> None:
    """End the request's database session, even when the server dropped its connection (a
    restart): the answer, already made, must not turn into a bare 500 while cleaning up."""
    try:
        db.session.remove()
    except Exception as error:  # the connection is gone; the pool opens a new one next time
        log.warning("database session not closed cleanly: %s", error)
        db.session.registry.clear()


def tune_sqlite(dbapi_connection, _record) -> None:
    """Use WAL (readers never wait for the writer) and wait, not fail, on a locked database."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit reaches the disk before the server answers, so an acknowledged rating
    # survives even a power cut (NORMAL would only survive a crash of this process).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
