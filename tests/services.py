"""Real PostgreSQL and Redis servers for the scale-out tests, started on 127.0.0.1 from Debian's
packages (`postgresql`, `redis-server`) in a throw-away folder, and stopped afterwards.

`make test` (and so `.ci/run`) runs the tests that matter a second time against them, with
`--services`: every test then gets a database of its own on the PostgreSQL server, and the
Redis server, flushed, as its job queue (through TASTEBUD_DATABASE_URL and TASTEBUD_REDIS_URL,
so even an app a test builds itself uses them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class ServiceMissing(RuntimeError):
    """A server's program is not installed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, limit: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:port (at most `limit` s)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {limit} s")


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if not found:
        raise ServiceMissing("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(found[-1]).parent


def _version(path: str) -> int:
    number = Path(path).parent.parent.name
    return int(number) if number.isdigit() else 0


class Postgres:
    """A PostgreSQL server of our own: `url(name)` for a database, `restart()` to bounce it."""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # False: no fsync (test databases); True: as deployed (benches)
        self.bin = postgres_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tastebud-pg-"))
        self.data = self.root / "data"
        # PostgreSQL refuses to run as root: as root (CI), it runs as the package's own user.
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync")
        self.start()

    def _run(self, program: str, *args) -> str:
        command = [str(self.bin / program), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        """Start the server (unless durable, without fsync: throw-away test databases)."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        options += " -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", self.data, "-l", self.root / "log", "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect everyone, as a restart does)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser, outside any transaction (CREATE DATABASE)."""
        self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            self.port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            statement,
        )

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """A Redis server of our own, with no persistence: `kill()` loses what it held, like a
    crash of a Redis kept in memory only."""

    def __init__(self) -> None:
        self.program = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.program).exists():
            raise ServiceMissing("Redis is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.program,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        """kill -9: whatever was queued in it is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def flush(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.port).flushall()

    def close(self) -> None:
        self.kill()
