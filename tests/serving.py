"""Serve an app with the site's own waitress server on a free 127.0.0.1 port, in a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask
from waitress import wasyncore

from rating.server import create_server


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Yield the address `app` is served at until the block ends, then stop the server."""
    server = create_server(app, "127.0.0.1", 0)
    stop = threading.Event()

    def serve() -> None:
        # Short polls until told to stop, then close the sockets here: closing them from the
        # test thread while this loop sits in select() fails it with EBADF now and then.
        while not stop.is_set():
            wasyncore.loop(timeout=0.1, map=server._map, count=1)
        wasyncore.close_all(server._map)  # the listener and open keep-alive channels

    thread = threading.Thread(target=serve, name="waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop.set()
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()
