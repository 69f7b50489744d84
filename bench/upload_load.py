"""Load bench: raters rate-and-next while another person uploads costly 6000×6000 PNGs.

The outside probe's case: PNGs of 36 megapixels and ~35 KB each, 18 to a request, took 2–3.6 s
apiece to decode on the request thread, and another user's latency went from 76 to 313 ms.
Now a request's pixels are counted from the headers (per request and per person per hour), the
decoding runs in a light-queue job, and job threads run at a lower CPU priority.

Runs `python app.py` on a throw-away instance twice over the same raters: first alone, then while
one uploader posts such requests back to back; prints the raters' p50/p95/p99, the ratio, and
what the uploader got (requests answered, pixels decoded, how long the answer took).

    python bench/upload_load.py --seconds 15 --raters 8 --images 600
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import requests
from PIL import Image
from rating_load import (
    PASSWORD,
    ROOT,
    TOKEN,
    Rater,
    prepare,
    run_phase,
    start_server,
    wait_until_up,
)

SIDE = 6000  # the probe's files: 36 megapixels each


def costly_png(shade: int) -> bytes:
    """A 6000×6000 greyscale PNG of one shade: tiny to send, 36 megapixels to decode."""
    buffer = io.BytesIO()
    Image.new("L", (SIDE, SIDE), shade).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def allow_uploads(instance: Path) -> None:
    """Turn browser uploads on for the bench instance, as an admin would."""
    sys.path.insert(0, str(ROOT))
    from app import create_app
    from rating.models import db, set_site_setting

    config = {"QUEUE": "immediate", "SECRET_KEY": "bench", "DATABASE_URL": "", "STORAGE_ROOT": ""}
    app = create_app(config, instance_path=str(instance))
    with app.app_context():
        set_site_setting("allow_uploads", True)
        db.session.commit()
        db.engine.dispose()


class Uploader(threading.Thread):
    """One person posting `files` PNGs per request, back to back, until told to stop."""

    def __init__(self, base: str, name: str, files: int):
        super().__init__(name="uploader", daemon=True)
        self.base, self.http, self.stop = base, requests.Session(), threading.Event()
        page = self.http.get(f"{base}/login", timeout=30).text
        form = {"csrf_token": TOKEN.search(page).group(1), "username": name, "password": PASSWORD}
        self.http.post(f"{base}/login", data=form, timeout=30).raise_for_status()
        self.token = TOKEN.search(self.http.get(f"{base}/upload", timeout=30).text).group(1)
        self.pngs = [costly_png(10 + 12 * n) for n in range(files)]
        self.answers: list[tuple[int, float]] = []  # (status, seconds)

    def run(self) -> None:
        while not self.stop.is_set():
            files = [("files", (f"{n}.png", png, "image/png")) for n, png in enumerate(self.pngs)]
            began = time.perf_counter()
            response = self.http.post(
                f"{self.base}/upload",
                data={"csrf_token": self.token},
                files=files,
                headers={"HX-Request": "true"},
                timeout=120,
            )
            self.answers.append((response.status_code, time.perf_counter() - began))
            if response.status_code == 429:  # this hour's pixels are spent: stop asking
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--raters", type=int, default=8)
    parser.add_argument("--files", type=int, default=18, help="PNGs per upload request")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    instance = Path(tempfile.mkdtemp(prefix="tastebud-bench-"))
    server = None
    try:
        prepare(instance, "", 2 * args.raters + 1, args.images, seed=0)
        allow_uploads(instance)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        server = start_server(instance, "", port, None, 1)
        wait_until_up(server, base)
        alone, _, _ = run_phase(Rater, base, args.raters, args.seconds)
        uploader = Uploader(base, f"rater{2 * args.raters:02d}", args.files)
        uploader.start()

        def other_rater(base: str, name: str) -> Rater:  # fresh people: a pool not rated out
            return Rater(base, f"rater{int(name[5:]) + args.raters:02d}")

        loaded, _, _ = run_phase(other_rater, base, args.raters, args.seconds)
        uploader.stop.set()
        uploader.join(timeout=180)
        with closing(sqlite3.connect(instance / "tastebud.db")) as con:
            decoded = con.execute(
                "SELECT COALESCE(SUM(position), 0) FROM source WHERE kind = 'upload'"
            ).fetchone()[0]
        report(args, alone, loaded, uploader, decoded)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        shutil.rmtree(instance, ignore_errors=True)


def report(args, alone: dict, loaded: dict, uploader: Uploader, decoded: int) -> None:
    """Print the raters' latencies alone and during uploads, and what the uploader got."""
    print(
        f"{args.raters} raters x {args.seconds:g} s per phase; one uploader sending "
        f"{args.files} PNGs of {SIDE}x{SIDE} ({len(uploader.pngs[0]) / 1024:.0f} KiB each)"
        " a request"
    )
    print(
        f"{'rate-and-next':<24}{'requests':>9}{'failures':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    )
    for name, r in (("alone", alone), ("during uploads", loaded)):
        print(
            f"{name:<24}{r['requests']:>9}{r['failures']:>9}"
            f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    print(
        f"p50 ratio during/alone: {loaded['p50_ms'] / alone['p50_ms']:.2f}; "
        f"p99 ratio: {loaded['p99_ms'] / alone['p99_ms']:.2f}"
    )
    statuses = [status for status, _ in uploader.answers]
    seconds = sorted(s for status, s in uploader.answers if status == 200) or [float("nan")]
    print(
        f"uploads: {statuses.count(200)} answered 200 (median {seconds[len(seconds) // 2]:.2f} s),"
        f" {statuses.count(429)} refused 429 (hourly pixel cap); "
        f"{decoded} files decoded by the job queue = {decoded * SIDE * SIDE / 1e6:,.0f} megapixels"
    )


if __name__ == "__main__":
    main()
