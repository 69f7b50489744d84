"""Load bench: 32 raters rate-and-next at once against `python app.py`, beside a static file;
with --processes and --database, side by side for 1, 2, N web processes on SQLite (WAL) and on
PostgreSQL (a server of its own on 127.0.0.1, as the scale-out tests start one)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench password 1234"
TOKEN = re.compile(r'"X-CSRFToken": "([^"]+)"')  # the page's htmx header; the form has the same
FIELD = re.compile(r'name="(csrf_token|queue|skipped|history)" value="([^"]*)"')
IMAGE = re.compile(r'data-image-id="(\d+)"')
WARM_UP = 5.0  # seconds of static load before measuring: slow starters are up by then
TARGET = 3.0  # rate-and-next p99 must stay within this many times the static p99


def prepare(instance: Path, database_url: str, users: int, images: int, seed: int) -> None:
    """Create the rater accounts and load the demo pack into a fresh instance folder (and
    database: empty means SQLite in the instance folder)."""
    from app import create_app
    from rating.auth import create_user
    from rating.models import db

    config = {"QUEUE": "immediate", "SECRET_KEY": "bench", "DEMO_PACK_SEED": seed}
    config |= {"DATABASE_URL": database_url, "STORAGE_ROOT": "", "REDIS_URL": ""}
    app = create_app(config, instance_path=str(instance))
    with app.app_context():
        for n in range(users):
            create_user(f"rater{n:02d}", PASSWORD)
    result = app.test_cli_runner().invoke(args=["images", "demo", "--count", str(images)])
    with app.app_context():
        db.engine.dispose()
    if result.exit_code:
        raise RuntimeError(f"demo pack failed: {result.output}")


def stored_ratings(instance: Path, database_url: str) -> int:
    """Count the ratings the database holds."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url or f"sqlite:///{instance / 'tastebud.db'}")
    with engine.connect() as connection:
        count = connection.execute(text("SELECT COUNT(*) FROM rating")).scalar()
    engine.dispose()
    return count


def start_server(
    instance: Path, database_url: str, port: int, threads: int | None, processes: int
) -> subprocess.Popen:
    """Start `python app.py` on the instance's database and images (TASTEBUD_* variables)."""
    env = {
        **os.environ,
        "TASTEBUD_HOST": "127.0.0.1",
        "TASTEBUD_PORT": str(port),
        "TASTEBUD_INSTANCE_PATH": str(instance),
        "TASTEBUD_DATABASE_URL": database_url,
        "TASTEBUD_REDIS_URL": "",
        "TASTEBUD_WEB_PROCESSES": str(processes),
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
        except requests.RequestException:  # not listening yet, or no process answers yet
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

    def step(self) -> str | None:
        """Rate the image on screen with random stars; the answer is the next card. Returns
        what went wrong, if anything."""
        form = {**self.fields, "stars": random.randint(1, 5)}
        headers = {"HX-Request": "true", "HX-Target": "rate-card"}
        url = f"{self.base}/rate/{self.image}"
        response = self.http.post(url, data=form, headers=headers, timeout=60)
        if response.status_code != 200:
            return f"rate: HTTP {response.status_code}"
        self.acknowledged += 1
        if self.read(response.text):
            return None
        if "Nothing left to rate" in response.text:  # the bench's pool, not the server
            return "rate: this rater rated the whole pool (raise --images)"
        return "rate: the answer held no next card"


class Fetcher:
    """A client that fetches the static stylesheet."""

    def __init__(self, base: str, _name: str):  # same signature as Rater
        self.url, self.http = f"{base}/static/style.css", requests.Session()

    def step(self) -> str | None:
        """Fetch the stylesheet once; returns what went wrong, if anything."""
        status = self.http.get(self.url, timeout=60).status_code
        return None if status == 200 else f"static: HTTP {status}"


def run_phase(make, base: str, clients: int, seconds: float, probe: bool = False):
    """Run `clients` threads, each looping `step()` for `seconds` once all are signed in.

    With `probe`, one more client fetches the static file throughout, paced at 20 requests/s:
    the server's floor under the same load. Returns (summary, probe summary, agents).
    """
    agents = [make(base, f"rater{n:02d}") for n in range(clients)]
    timings = {"main": ([], []), "probe": ([], [])}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1 + probe)

    def loop(agent, kind: str, pause: float = 0.0):
        start.wait()
        latencies, failures = timings[kind]
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                problem = agent.step()
            except requests.RequestException as error:
                problem = f"{type(error).__name__}: {error}"[:160]
            with lock:
                latencies.append(time.perf_counter() - began)
                if problem:
                    failures.append(problem)
            if problem and isinstance(agent, Rater):
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
    main, side = (summarise(times, failed, elapsed) for times, failed in timings.values())
    return main, side, agents


def summarise(latencies: list[float], failures: list[str], seconds: float) -> dict:
    """Count requests and failures (with the first few reasons); requests per second;
    p50/p95/p99 in milliseconds."""
    ms = [1000 * s for s in latencies] or [0.0]
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {
        "requests": len(latencies),
        "failures": len(failures),
        "why": sorted(set(failures))[:3],
        "rps": len(latencies) / seconds,
        "p50_ms": cuts[49],
        "p95_ms": cuts[94],
        "p99_ms": cuts[98],
    }


def report(result: dict) -> None:
    """Print one configuration's table and verdict."""
    threads = result["threads"] or "the app's default"
    print(
        f"{result['clients']} clients x {result['seconds']:g} s per phase; python app.py with"
        f" {result['processes']} process(es) of {threads} threads on {result['database']};"
        f" pool of {result['images']} images"
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
        for why in r["why"]:
            print(f"  failed: {why}")
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


def report_side_by_side(results: list[dict]) -> None:
    """Print every configuration on one line each, with ratings/s against 1 process."""
    print(f"{results[0]['clients']} clients x {results[0]['seconds']:g} s per phase, side by side")
    print(
        f"{'database':<11}{'processes':>10}{'ratings/s':>11}{'x 1 proc':>10}{'rate p50':>10}"
        f"{'rate p99':>10}{'static p99':>12}{'p99 ratio':>11}{'stored=ack':>12}{'verdict':>9}"
    )
    single = {r["database"]: r["rate_and_next"]["rps"] for r in results if r["processes"] == 1}
    for r in results:
        rate = r["rate_and_next"]
        base = single.get(r["database"])
        gain = f"{rate['rps'] / base:.2f}" if base else "-"
        print(
            f"{r['database']:<11}{r['processes']:>10}{rate['rps']:>11.1f}{gain:>10}"
            f"{rate['p50_ms']:>10.1f}{rate['p99_ms']:>10.1f}{r['static']['p99_ms']:>12.1f}"
            f"{r['p99_ratio']:>11.2f}{str(r['stored'] == r['acknowledged']):>12}"
            f"{'PASS' if r['pass'] else 'FAIL':>9}"
        )
    for r in results:
        for name in ("static", "rate_and_next"):
            for why in r[name]["why"]:
                print(f"  {r['database']}, {r['processes']} process(es), failed: {why}")


def run_config(args, database: str, processes: int, postgres) -> dict:
    """Set up an instance on `database`, serve it with `processes` processes, run the static
    and the rating phase, and return the figures."""
    instance = Path(tempfile.mkdtemp(prefix="tastebud-bench-"))
    name = f"bench_{processes}_{os.getpid()}"
    database_url = postgres.create_database(name) if database == "postgresql" else ""
    server = None
    try:
        prepare(instance, database_url, args.clients, args.images, args.seed)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        server = start_server(instance, database_url, port, args.threads, processes)
        wait_until_up(server, base)
        run_phase(Fetcher, base, args.clients, WARM_UP)  # every process up and warm, untimed
        static, _, _ = run_phase(Fetcher, base, args.clients, args.seconds)
        rate, static_under_load, raters = run_phase(
            Rater, base, args.clients, args.seconds, probe=True
        )
        stored = stored_ratings(instance, database_url)
        acknowledged = sum(r.acknowledged for r in raters)
        ratio = rate["p99_ms"] / max(static["p99_ms"], 1e-9)
        return {
            "database": database,
            "processes": processes,
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
    except BaseException:
        if (instance / "server.log").exists():
            print((instance / "server.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        shutil.rmtree(instance, ignore_errors=True)
        if database_url:
            postgres.drop_database(name)


def main() -> None:
    """Run every asked configuration and report each, then side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0, help="demo pack seed")
    parser.add_argument("--threads", type=int, help="server threads (default: the app's setting)")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1], help="web processes, e.g. 1 2 4"
    )
    parser.add_argument(
        "--database", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"]
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    postgres = None
    if "postgresql" in args.database:
        from tests.services import Postgres  # a throw-away server on 127.0.0.1

        postgres = Postgres(durable=True)  # every commit on disk, as SQLite's FULL sync
    try:
        results = []
        for database in args.database:
            for processes in args.processes:
                results.append(run_config(args, database, processes, postgres))
                if not args.json:
                    report(results[-1])
                    print()
    finally:
        if postgres is not None:
            postgres.close()
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    elif len(results) > 1:
        report_side_by_side(results)


if __name__ == "__main__":
    main()
