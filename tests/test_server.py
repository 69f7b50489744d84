"""The embedded waitress server: chunked bodies with bounded lines, a bounded body size."""

from __future__ import annotations

import gc
import select
import socket
import time
from urllib.parse import urlsplit

import pytest
from flask import Flask, request

from rating import server
from rating.server import MAX_CHUNK_LINE, MAX_TRAILER, server_threads, settle_heap, web_processes
from tests.serving import serving

HEAD = (
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n"
)


@pytest.fixture(scope="module")
def echo_url():
    app = Flask(__name__)
    app.config.update(SERVER_THREADS=2, MAX_CONTENT_LENGTH=256 * 1024)

    @app.post("/echo")
    def echo():
        return f"{len(request.get_data())} bytes"

    @app.get("/ping")
    def ping():
        return "pong"

    with serving(app) as url:
        yield url


def _exchange(url: str, parts: list[bytes], timeout: float = 10.0) -> str:
    """Send `parts` on one connection, stopping as soon as the server answers, and return
    the answer's status line and body."""
    address = urlsplit(url)
    answer = b""
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        try:
            for part in parts:
                sock.sendall(part)
                if select.select([sock], [], [], 0.01)[0]:
                    break  # answered (refused) before the end: stop sending, read it
            else:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed on data it would not read; what it said came first
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return head.splitlines()[0] + "\n" + body if head else ""


def test_chunked_bodies_still_arrive_whole(echo_url):
    body = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    assert _exchange(echo_url, [HEAD, body]) == "HTTP/1.1 200 OK\n11 bytes"


def test_a_chunk_size_line_that_never_ends_is_refused_at_once(echo_url):
    # waitress alone would keep reading (and rescanning) this line for as long as it is sent
    started = time.perf_counter()
    answer = _exchange(echo_url, [HEAD] + [b"f" * 8192] * 64)  # 512 KiB, never a line end
    assert answer.startswith("HTTP/1.1 400 Bad Request\n")
    assert f"chunk-size line longer than {MAX_CHUNK_LINE} bytes" in answer
    assert time.perf_counter() - started < 5


def test_a_trailer_that_never_ends_is_refused(echo_url):
    parts = [HEAD, b"1\r\na\r\n0\r\n"] + [b"X-Pad: " + b"p" * 8000 + b"\r\n"] * 16
    answer = _exchange(echo_url, parts)
    assert answer.startswith("HTTP/1.1 400 Bad Request\n")
    assert f"chunked trailer longer than {MAX_TRAILER} bytes" in answer


def test_a_chunked_body_over_the_site_limit_is_refused(echo_url):
    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
    answer = _exchange(echo_url, [HEAD] + [chunk] * 8)  # 512 KiB against 256 KiB + slack
    assert answer.startswith("HTTP/1.1 413 Request Entity Too Large\n")


def test_other_clients_are_served_while_one_sends_a_bad_line(echo_url):
    address = urlsplit(echo_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as attacker:
        attacker.sendall(HEAD + b"f" * 2048)  # a long but still allowed, unfinished line
        assert _exchange(
            echo_url, [b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
        ).endswith("pong")


def test_web_processes_share_two_threads_a_core(monkeypatch):
    monkeypatch.setattr(server, "cores", lambda: 2)
    app = Flask(__name__)
    app.config.update(SERVER_THREADS=0, WEB_PROCESSES=0)
    assert (web_processes(app), server_threads(app)) == (2, 2)  # one process per core
    for processes, threads in ((1, 4), (2, 2), (3, 1), (4, 1), (16, 1)):
        app.config.update(WEB_PROCESSES=processes)
        assert server_threads(app) == threads
    monkeypatch.setattr(server, "cores", lambda: 16)
    app.config.update(WEB_PROCESSES=1)
    assert server_threads(app) == 4  # never more: they would only contend for the GIL
    app.config.update(SERVER_THREADS=6)
    assert server_threads(app) == 6  # as set


def test_a_web_process_serves_with_what_it_made_at_start_out_of_the_collectors_sight():
    made = [{"object": n} for n in range(10_000)]  # long-lived, as the app and its modules
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(made)
        assert not any(o is made for o in gc.get_objects())  # a full collection walks none
    finally:
        gc.unfreeze()
