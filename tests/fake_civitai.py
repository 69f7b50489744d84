"""A stand-in for civitai: a real HTTP server on 127.0.0.1 with API pages, images and mischief.

Use it with `pytest_plugins = ("tests.fake_civitai",)` and ask for the `fake_civitai` fixture
(and `http_session` for a requests session). Read its constants from the fixture's attributes:
importing from this module at the top of a test module imports it before pytest can register it
as a plugin, which pytest reports (a warning, so an error here). What it serves:

- GET /api/v1/images: three pages of civitai-shaped items. Page 1 gives `nextCursor`; page 2
  gives `nextCursor: null` and the cursor only inside `nextPage`; page 3 ends the listing.
  Query filters are ignored: every page is the same whatever is asked. The very first request
  is answered 429 with `Retry-After: 1`. PAGES says what each item is: an exact duplicate (same
  pixels, other bytes and URL), a resized near-duplicate, a corrupt file, a PNG claiming
  100000×100000 px, `meta: null` and no `meta`, `nsfwLevel` as numbers and as names (one Soft,
  one X), an item without a URL, a video, and items pointing at the misbehaving paths below.
- images under /img/ (Pillow-made at test time, at least 256 px) and a civitai-style
  `/xG1nkqKTMzGDvpLrqFT7WA/<uuid>/original=true/7001.jpeg` whose `/width=512/` rendition is a
  smaller JPEG; /img/flaky.png answers 503 once; `fake.images` maps each path to its
  (content type, bytes).
- /redirect-to-loopback (to http://localhost:<port>/img/a.png), /redirect-to-127-0-0-2,
  /redirect-relative, /redirect-loop, /not-an-image (text/html), /img/oversized.png (streams
  more than STREAMED_OVERSIZE bytes with no Content-Length), /img/declared-huge.png (declares
  DECLARED_SIZE bytes).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import sys
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
from PIL import Image, ImageDraw

from rating.sources.fetch import FetchPolicy
from tests.images import picture

CDN_PREFIX = "/xG1nkqKTMzGDvpLrqFT7WA/5f3b2c1e-7a4d-4c8e-9b1f-2d6e8a0c4b7f"
ORIGINAL_PATH = f"{CDN_PREFIX}/original=true/7001.jpeg"  # 1024×768
RENDITION_PATH = f"{CDN_PREFIX}/width=512/7001.jpeg"  # 512×384
CURSOR_2 = "75363|932023|257749"  # opaque, with characters that need quoting
CURSOR_3 = "feed:p3 xyz"
STREAMED_OVERSIZE = 2 * 2**20
DECLARED_SIZE = 10**10
DROP = object()  # an override that removes the field from the item


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased

    def param(self, name: str) -> str | None:
        """Return the first value of query parameter `name`, or None."""
        return self.query.get(name, [None])[0]


# (id, path, overrides) per page; the base item is a well-formed PG image by "alice"
PAGES = [
    [
        (101, "/img/a.png", {"meta": {"prompt": "a red to blue gradient", "seed": 1}}),
        (102, ORIGINAL_PATH, {"meta": None, "nsfwLevel": "None", "width": 1024, "height": 768}),
        (103, "/img/a-copy.png", {"meta": DROP, "nsfwLevel": "1"}),  # same pixels as a.png
        (104, "/img/a-near.jpg", {"username": None, "width": 320, "height": 256}),  # resized a
    ],
    [
        (105, "/img/b.jpg", {"nsfwLevel": "Soft", "browsingLevel": 2, "nsfw": True}),
        (106, "/img/corrupt.png", {}),
        (107, "/img/huge.png", {"width": 100_000, "height": 100_000}),
        (108, "/img/flaky.png", {}),
        (109, None, {"url": DROP}),  # no URL: skipped
    ],
    [
        (110, "/not-an-image", {}),
        (111, "/img/oversized.png", {}),
        (112, "/img/c.png", {"stats": None, "baseModel": "SDXL 1.0"}),
        (113, "/redirect-to-loopback", {}),
        (114, "/img/d.png", {"nsfwLevel": 8, "browsingLevel": 8, "nsfw": True}),  # X
        (115, "/img/clip.mp4", {"type": "video"}),  # not an image: skipped
    ],
]
CURSORS = [None, CURSOR_2, CURSOR_3]


def _item(civitai_id: int, url: str | None, overrides: dict) -> dict:
    item = {
        "id": civitai_id,
        "url": url,
        "hash": "UA8N5},:Ioni~C#laKxaoznNwvx]XmRkVstR",
        "width": 400,
        "height": 320,
        "type": "image",
        "nsfw": False,
        "nsfwLevel": 1,
        "browsingLevel": 1,
        "createdAt": "2025-04-17T21:28:57.225Z",
        "postId": 1981754,
        "username": "alice",
        "baseModel": "SD 1.5",
        "modelVersionIds": [9208, 249861],
        "stats": {
            "cryCount": 0,
            "laughCount": 1,
            "likeCount": 12,
            "dislikeCount": 0,
            "heartCount": 5,
            "commentCount": 2,
        },
        "meta": {"prompt": f"test image {civitai_id}", "negativePrompt": "blurry", "steps": 20},
    }
    for key, value in overrides.items():
        if value is DROP:
            item.pop(key, None)
        else:
            item[key] = value
    return item


def api_page(index: int, base_url: str) -> dict:
    """Return page `index` (0, 1, 2) of the fake listing, with URLs on `base_url`."""
    items = [_item(i, path and base_url + path, o) for i, path, o in PAGES[index]]
    if index == 0:
        metadata = {
            "nextCursor": CURSOR_2,
            "nextPage": f"{base_url}/api/v1/images?cursor={quote(CURSOR_2)}",
        }
    elif index == 1:
        metadata = {
            "nextCursor": None,
            "nextPage": f"{base_url}/api/v1/images?limit=100&cursor={quote(CURSOR_3)}",
        }
    else:
        metadata = {"pageSize": len(items)}
    return {"items": items, "metadata": metadata}


def huge_png(width: int, height: int) -> bytes:
    """Return a few hundred bytes of PNG whose header claims `width`×`height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 256))
        + chunk(b"IEND", b"")
    )


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _shapes(size, background, colour, seed: int) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for n in range(12):
        x, y = (seed * 37 + n * 53) % size[0], (seed * 11 + n * 71) % size[1]
        draw.ellipse((x - 30, y - 20, x + 30 + n * 3, y + 20 + n * 2), fill=colour, outline="white")
    return image


@functools.cache
def image_files() -> dict[str, tuple[str, bytes]]:
    """Return path → (content type, body) of every image the fake serves, made once per run."""
    # smooth random textures: perceptual hashes tell them apart (plain gradients all look alike)
    a = picture(11, (400, 320))
    original = picture(13, (1024, 768))
    return {
        "/img/a.png": ("image/png", _encode(a, "PNG", compress_level=9)),
        "/img/a-copy.png": ("image/png", _encode(a, "PNG", compress_level=1)),  # other bytes
        "/img/a-near.jpg": ("image/jpeg", _encode(a.resize((320, 256)), "JPEG", quality=90)),
        "/img/b.jpg": ("image/jpeg", _encode(_shapes((300, 300), "ivory", "teal", 1), "JPEG")),
        "/img/c.png": ("image/png", _encode(_shapes((288, 352), "black", "orange", 2), "PNG")),
        "/img/d.png": ("image/png", _encode(_shapes((256, 256), "pink", "purple", 3), "PNG")),
        "/img/flaky.png": ("image/png", _encode(picture(12, (320, 320)), "PNG")),
        "/img/corrupt.png": ("image/png", b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 40),
        "/img/huge.png": ("image/png", huge_png(100_000, 100_000)),
        ORIGINAL_PATH: ("image/jpeg", _encode(original, "JPEG", quality=92)),
        RENDITION_PATH: ("image/jpeg", _encode(original.resize((512, 384)), "JPEG", quality=85)),
    }


class FakeCivitai:
    """The running fake: its address, the requests it got, and scripted failures."""

    cursors = tuple(CURSORS)  # the cursor that asks for each page, None for the first
    original_path, rendition_path = ORIGINAL_PATH, RENDITION_PATH
    declared_size, streamed_oversize = DECLARED_SIZE, STREAMED_OVERSIZE

    def __init__(self, server: ThreadingHTTPServer):
        self.port = server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.requests: list[Recorded] = []
        self.images = image_files()
        self._failures: dict[str, list[tuple[int, str | None]]] = {}
        self._lock = threading.Lock()
        self.fail("/api/v1/images", 429, retry_after="1")
        self.fail("/img/flaky.png", 503)

    def fail(self, path: str, status: int, times: int = 1, retry_after: str | None = None):
        """Answer the next `times` requests for `path` with `status` (and a Retry-After)."""
        with self._lock:
            self._failures.setdefault(path, []).extend([(status, retry_after)] * times)

    def clear_failures(self) -> None:
        """Forget every scripted failure, the initial 429 and 503 included."""
        with self._lock:
            self._failures.clear()

    def take_failure(self, path: str) -> tuple[int, str | None] | None:
        """Return and use up the next scripted failure for `path`, if any."""
        with self._lock:
            queue = self._failures.get(path)
            return queue.pop(0) if queue else None

    def api_requests(self) -> list[Recorded]:
        """Return the requests made to /api/v1/images, in order."""
        return [r for r in self.requests if r.path == "/api/v1/images"]

    def paths(self) -> list[str]:
        """Return the paths requested, in order."""
        return [r.path for r in self.requests]

    def page(self, index: int) -> dict:
        """Return the JSON of page `index` (0, 1, 2) as this server sends it."""
        return api_page(index, self.url)

    def policy(self, **overrides) -> FetchPolicy:
        """Return a fetch policy that reaches this server (and no other private address)."""
        return FetchPolicy(
            allowed_hosts={self.host, *overrides.pop("allowed_hosts", ())}, **overrides
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # the name http.server looks for
        fake, parts = self.server.fake, urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        fake.requests.append(Recorded("GET", parts.path, parse_qs(parts.query), headers))
        failure = fake.take_failure(parts.path)
        if failure:
            status, retry_after = failure
            extra = {"Retry-After": retry_after} if retry_after else {}
            return self._send(status, b"try again later", "text/plain", extra)
        base, path = fake.url, parts.path
        if path == "/api/v1/images":
            cursor = parse_qs(parts.query).get("cursor", [None])[0]
            if cursor not in CURSORS:
                return self._send(400, b'{"error": "bad cursor"}', "application/json")
            body = json.dumps(api_page(CURSORS.index(cursor), base)).encode()
            return self._send(200, body, "application/json; charset=utf-8")
        if path in fake.images:
            kind, body = fake.images[path]
            return self._send(200, body, kind)
        redirects = {
            "/redirect-to-loopback": f"http://localhost:{fake.port}/img/a.png",
            "/redirect-to-127-0-0-2": f"http://127.0.0.2:{fake.port}/img/a.png",
            "/redirect-relative": "/img/a.png",
            "/redirect-loop": "/redirect-loop",
        }
        if path in redirects:
            return self._send(302, b"", "text/plain", {"Location": redirects[path]})
        if path == "/not-an-image":
            return self._send(200, b"<html><body>a web page</body></html>", "text/html")
        if path == "/img/declared-huge.png":
            return self._send(200, b"", "image/png", {"Content-Length": str(DECLARED_SIZE)})
        if path == "/img/oversized.png":
            return self._stream(STREAMED_OVERSIZE + 1)
        return self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        headers = {"Content-Length": str(len(body)), **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, size: int):
        # HTTP/1.0 with no Content-Length: the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        block = b"\0" * 65536
        for _ in range(0, size, len(block)):
            self.wfile.write(block)

    def log_message(self, format, *args):  # http.server's signature
        pass  # keep test output quiet; the requests are in fake.requests


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeCivitai

    def handle_error(self, request, client_address):
        # a client that stops reading (the size cap) closes the socket under us: expected
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def fake_civitai():
    """Run a fake civitai on 127.0.0.1 for one test; its first API request gets a 429."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = FakeCivitai(server)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_session():
    """Return a requests session that ignores proxy settings, closed after the test."""
    with requests.Session() as session:
        session.trust_env = False  # an environment proxy would send 127.0.0.1 requests elsewhere
        yield session
