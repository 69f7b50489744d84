"""The embedded web server: waitress, with every part of a request it buffers bounded.

waitress reads whole requests on one I/O thread before a worker thread sees them, so slow
clients cost a buffer, not a thread. But waitress 3.0.2 (the newest) never bounds the
chunk-size line or the trailer of a chunked body, and rescans the whole line on every read:
a chunk-size line that never ends keeps its I/O thread busy for minutes, and with it every
other client. `BoundedChunkedReceiver` refuses such a line or trailer as soon as it is too
long, and `create_server` also caps the body at the site's `MAX_CONTENT_LENGTH`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import waitress
import waitress.parser
from flask import Flask
from waitress.receiver import ChunkedReceiver
from waitress.utilities import BadRequest

log = logging.getLogger(__name__)
MAX_CHUNK_LINE = 4096  # a chunk size and its extensions; real clients send a dozen bytes
MAX_TRAILER = 64 * 1024  # trailer fields after the last chunk (browsers send none)
BODY_SLACK = 64 * 1024  # multipart boundaries around the largest body Flask accepts


class BoundedChunkedReceiver(ChunkedReceiver):
    """waitress's chunked-body reader, refusing a chunk-size line or trailer that is too long."""

    def received(self, s: bytes) -> int:
        # waitress keeps an unfinished line and prepends it to the next read, so bounding what
        # it keeps after each read bounds each read's work; one read is at most 8 KiB
        consumed = super().received(s)
        if len(self.control_line) > MAX_CHUNK_LINE:
            self._refuse(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
        elif len(self.trailer) > MAX_TRAILER:
            self._refuse(f"chunked trailer longer than {MAX_TRAILER} bytes")
        return consumed

    def _refuse(self, reason: str) -> None:
        self.error = BadRequest(reason)
        self.all_chunks_received = True  # as waitress does for a bad chunk size
        self.control_line = self.trailer = b""


def install_bounds() -> None:
    """Make waitress's request parser read chunked bodies with `BoundedChunkedReceiver`."""
    if not issubclass(waitress.parser.ChunkedReceiver, BoundedChunkedReceiver):
        waitress.parser.ChunkedReceiver = BoundedChunkedReceiver


def create_server(app: Flask, host: str, port: int, sockets: list | None = None):
    """A waitress server for `app` on host:port (or on pre-bound `sockets`), with bounded
    requests; `.run()` serves."""
    install_bounds()
    where = {"sockets": sockets} if sockets else {"host": host, "port": port}
    return waitress.create_server(
        app,
        **where,
        threads=server_threads(app),
        max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]) + BODY_SLACK,
        ident="tastebud",
    )


def settle_heap() -> None:
    """Move every object made so far (the app, its modules, templates) out of the garbage
    collector's sight before serving. Otherwise each full collection walks those ~185,000
    objects, about 90 ms with the GIL held, while every request in flight waits
    (bench/rating_load.py, one process on PostgreSQL: 232 ratings/s before, 255 after)."""
    gc.collect()
    gc.freeze()


def server_threads(app: Flask) -> int:
    """Worker threads per web process: SERVER_THREADS, or with 0 two per core shared among
    the processes, from 1 to 4 each. Python runs one thread at a time per process, so threads
    only overlap waits, and several processes already overlap one another's: on 2 cores, 4
    threads for one process, 2 each for two, 1 each for four (bench/rating_load.py, PostgreSQL,
    4 processes: p99 226 and 257 ms with 1 thread each, 275 and 316 ms with 2)."""
    return int(app.config["SERVER_THREADS"]) or min(4, max(1, 2 * cores() // web_processes(app)))


def web_processes(app: Flask) -> int:
    """How many processes serve the site: WEB_PROCESSES, 0 meaning one per core."""
    return max(1, int(app.config["WEB_PROCESSES"]) or cores())


def cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class ServerProcesses:
    """Several processes serving one listening socket, each a whole app with its own threads:
    Python runs one thread at a time per process, so on several cores more processes answer
    more requests. The database coordinates them, as it does separate machines.

    The parent binds the socket and starts the servers (`python -m rating.server --fd N`, each
    inheriting the socket), replaces one that dies, and stops them all when told to.
    """

    def __init__(self, host: str, port: int, processes: int):
        self.processes = processes
        self.socket = socket.create_server((host, port), backlog=1024)
        self.socket.set_inheritable(True)
        self.port = self.socket.getsockname()[1]
        self.children: list[subprocess.Popen] = []
        self.stopping = False

    def start(self) -> ServerProcesses:
        self.children = [self._start_one() for _ in range(self.processes)]
        return self

    def _start_one(self) -> subprocess.Popen:
        fd = self.socket.fileno()
        return subprocess.Popen(
            [sys.executable, "-m", "rating.server", "--fd", str(fd)],
            cwd=Path(__file__).resolve().parents[1],
            pass_fds=[fd],
        )

    def supervise(self, every: float = 1.0) -> None:
        """Keep the servers running (one that dies is replaced) until `stop()`; then reap."""
        while not self.stopping:
            for n, child in enumerate(self.children):
                if child.poll() is not None:
                    log.warning(
                        "web process %d ended (%s); starting another", child.pid, child.returncode
                    )
                    self.children[n] = self._start_one()
            time.sleep(every)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every server process: SIGTERM, then SIGKILL for one still there after `grace`."""
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=grace)
        self.socket.close()


def serve_inherited(fd: int) -> None:
    """A server process of `ServerProcesses`: the app, serving the socket it inherited."""
    from app import create_app  # the factory lives beside this package

    stop_on_sigterm()
    listener = socket.socket(fileno=fd)
    try:
        web = create_server(create_app(), "", 0, sockets=[listener])
        settle_heap()
        web.run()
    except KeyboardInterrupt:
        pass


def stop_on_sigterm() -> None:
    """Stop on SIGTERM as on Ctrl-C (KeyboardInterrupt), so cleanup runs: workers, children."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the app on an inherited socket.")
    parser.add_argument("--fd", type=int, required=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve_inherited(parser.parse_args().fd)
