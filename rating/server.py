"""The embedded web server: waitress, with every part of a request it buffers bounded.

waitress reads whole requests on one I/O thread before a worker thread sees them, so slow
clients cost a buffer, not a thread. But waitress 3.0.2 (the newest) never bounds the
chunk-size line or the trailer of a chunked body, and rescans the whole line on every read:
a chunk-size line that never ends keeps its I/O thread busy for minutes, and with it every
other client. `BoundedChunkedReceiver` refuses such a line or trailer as soon as it is too
long, and `create_server` also caps the body at the site's `MAX_CONTENT_LENGTH`.
"""

from __future__ import annotations

import waitress
import waitress.parser
from flask import Flask
from waitress.receiver import ChunkedReceiver
from waitress.utilities import BadRequest

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


def create_server(app: Flask, host: str, port: int):
    """A waitress server for `app` on host:port, with bounded requests; `.run()` serves."""
    install_bounds()
    return waitress.create_server(
        app,
        host=host,
        port=port,
        threads=int(app.config["SERVER_THREADS"]),
        max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]) + BODY_SLACK,
        ident="tastebud",
    )
