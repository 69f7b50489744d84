"""Load bench: 32 raters rate-and-next at once against `python app.py`, beside a static file."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench password 1234"
TOKEN = re.compile(r'"X-CSRFToken": "([^"]+)"')  # the page's htmx header; the form has the same
FIELD = re.compile(r'name="(csrf_token|queue|skipped|history)" value="([^"]*)"')
IMAGE = re.compile(r'data-image-id="(\d+)"')
TARGET = 3.0  # rate-and-next p99 must stay within this many times the static p99


def prepare(instance: Path, users: int, images: int, seed: int) -> None:
    """Create the rater accounts and load the demo pack into a fresh instance folder."""
    sys.path.insert(0, str(ROOT))
    from app import create_app
    from rating.auth import create_user
    from rating.models import db

    config = {"QUEUE": "immediate", "SECRET_KEY": "bench", "DEMO_PACK_SEED": seed}
    config |= {"DATABASE_URL": "", "STORAGE_ROOT": ""}  # the temp instance, whatever the env says
    app = create_app(config, instance_path=str(instance))
    with app.app_context():
        for n in range(users):
            create_user(f"rater{n:02d}", PASSWORD)
    result = app.test_cli_runner().invoke(args=["images", "demo", "--count", str(images)])
    with app.app_context():
        db.engine.dispose()
    if result.exit_code:
        raise RuntimeError(f"demo pack failed: {result.output}")


def start_server(instance: Path, port: int, threads: int | None) -> subprocess.Popen:
    """Start `python app.py` on the instance's database and images (TASTEBUD_* variables)."""
    env = {
        **os.environ,
        "TASTEBUD_HOST": "127.0.0.1",
        "TASTEBUD_PORT": str(port),
        "TASTEBUD_INSTANCE_PATH": str(instance),
        "TASTEBUD_SECRET_KEY": "bench-secret",
        "TASTEBUD_LOGIN_RATE_LIMIT": "10000 per minute",  # every rater signs in from 127.0.0.1
    }
    if threads:
        env["TASTEBUD_SERVER_THREADS"] = str(threads)
    with open(instance / "server.log", "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_until_up(server: subprocess.Popen, base: str, limit: float = 60) -> None:
    """Poll the static file until the server answers (at most `limit` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"{base}/static/style.css", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {limit:g} s")


class Rater:
    """One person in a browser: signs in, then rates the image on screen, as htmx posts it."""

    def __init__(self, base: str, name: str):
        self.base, self.http = base, requests.Session()
        token = TOKEN.search(self.http.get(f"{base}/login", timeout=30).text).group(1)
        form = {"csrf_token": token, "username": name, "password": PASSWORD}
        self.http.post(f"{base}/login", data=form, timeout=30).raise_for_status()
        if not self.read(self.http.get(f"{base}/rate", timeout=30).text):
            raise RuntimeError(f"{name}: no rating card after signing in")
        self.acknowledged = 0

    def read(self, html: str) -> bool:
        """Take the image id and hidden fields from a card; False if it shows no image."""
        image, fields = IMAGE.search(html), dict(FIELD.findall(html))
        if image is None or "csrf_token" not in fields:
            return False
        self.image, self.fields = int(image.group(1)), fields
        return True

    def step(self) -> bool:
        """Rate the image on screen with random stars; the answer is the next card."""
        form = {**self.fields, "stars": random.randint(1, 5)}
        headers = {"HX-Request": "true", "HX-Target": "rate-card"}
        url = f"{self.base}/rate/{self.image}"
        response = self.http.post(url, data=form, headers=headers, timeout=60)
        self.acknowledged += response.status_code == 200
        return response.status_code == 200 and self.read(response.text)


class Fetcher:
    """A client that fetches the static stylesheet."""

    def __init__(self, base: str, _name: str):  # same signature as Rater
        self.url, self.http = f"{base}/static/style.css", requests.Session()

    def step(self) -> bool:
        """Fetch the stylesheet once."""
        return self.http.get(self.url, timeout=60).status_code == 200


def run_phase(make, base: str, clients: int, seconds: float, probe: bool = False):
    """Run `clients` threads, each looping `step()` for `seconds` once all are signed in.

    With `probe`, one more client fetches the static file throughout, paced at 20 requests/s:
    the server's floor under the same load. Returns (summary, probe summary, agents).
    """
    agents = [make(base, f"rater{n:02d}") for n in range(clients)]
    timings = {"main": ([], [0]), "probe": ([], [0])}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1 + probe)

    def loop(agent, kind: str, pause: float = 0.0):
        start.wait()
        latencies, failures = timings[kind]
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                ok = agent.step()
            except requests.RequestException:
                ok = False
            with lock:
                latencies.append(time.perf_counter() - began)
                failures[0] += not ok
            if not ok and isinstance(agent, Rater):
                return  # the card is gone (or the pool is rated out): this person stops
            time.sleep(pause)

    threads = [threading.Thread(target=loop, args=(a, "main")) for a in agents]
    if probe:
        threads.append(threading.Thread(target=loop, args=(Fetcher(base, ""), "probe", 0.05)))
    for thread in threads:
        thread.start()
    started = time.monotonic()
    deadline = started + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    main, side = (summarise(times, failed[0], elapsed) for times, failed in timings.values())
    return main, side, agents


def summarise(latencies: list[float], failures: int, seconds: float) -> dict:
    """Count requests and failures; requests per second; p50/p95/p99 in milliseconds."""
    ms = [1000 * s for s in latencies] or [0.0]
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": len(latencies) / seconds,
        "p50_ms": cuts[49],
        "p95_ms": cuts[94],
        "p99_ms": cuts[98],
    }


def report(result: dict) -> None:
    """Print the table and the verdict."""
    threads = result["threads"] or "the app's default"
    print(
        f"{result['clients']} clients x {result['seconds']:g} s per phase; python app.py with"
        f" {threads} threads; pool of {result['images']} images"
    )
    print(
        f"{'endpoint':<22}{'requests':>9}{'failures':>9}{'req/s':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    )
    for name in ("static", "rate_and_next", "static_during_rating"):
        r = result[name]
        print(
            f"{name:<22}{r['requests']:>9}{r['failures']:>9}{r['rps']:>9.1f}"
            f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    print(f"p99 ratio rate/static: {result['p99_ratio']:.2f} (target <= {TARGET:g})")
    print(
        "p99 ratio rate/static measured under the same rating load:"
        f" {result['p99_ratio_same_load']:.2f}"
    )
    print(
        f"ratings stored: {result['stored']}, acknowledged (200): {result['acknowledged']}"
        f" -> {'OK' if result['stored'] == result['acknowledged'] else 'MISMATCH'}"
    )
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"{verdict}: rate-and-next p99 within {TARGET:g}x static p99, and no failed request")


def main() -> None:
    """Set up an instance, serve it, run the static and the rating phase, and report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="demo pack seed")
    parser.add_argument("--threads", type=int, help="server threads (default: the app's setting)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args()
    instance = Path(tempfile.mkdtemp(prefix="tastebud-bench-"))
    server = None
    try:
        prepare(instance, args.clients, args.images, args.seed)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        server = start_server(instance, port, args.threads)
        wait_until_up(server, base)
        static, _, _ = run_phase(Fetcher, base, args.clients, args.seconds)
        rate, static_under_load, raters = run_phase(
            Rater, base, args.clients, args.seconds, probe=True
        )
        with closing(sqlite3.connect(instance / "tastebud.db")) as con:
            stored = con.execute("SELECT COUNT(*) FROM rating").fetchone()[0]
        acknowledged = sum(r.acknowledged for r in raters)
        ratio = rate["p99_ms"] / max(static["p99_ms"], 1e-9)
        result = {
            "static": static,
            "rate_and_next": rate,
            "static_during_rating": static_under_load,
            "p99_ratio": ratio,
            "p99_ratio_same_load": rate["p99_ms"] / max(static_under_load["p99_ms"], 1e-9),
            "stored": stored,
            "acknowledged": acknowledged,
            "clients": args.clients,
            "seconds": args.seconds,
            "images": args.images,
            "threads": args.threads,
            "pass": ratio <= TARGET
            and not static["failures"]
            and not rate["failures"]
            and stored == acknowledged,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            report(result)
    except BaseException:
        if (instance / "server.log").exists():
            print((instance / "server.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        shutil.rmtree(instance, ignore_errors=True)


if __name__ == "__main__":
    main()
