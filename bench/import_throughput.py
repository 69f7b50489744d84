"""Import bench: a URL-list import from a local server, timed by stage; dedupe cost at 10k."""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app import create_app
from rating import imports, jobs, pool, store
from rating.auth import create_user
from rating.models import Image, Source, db
from trainer.demo_art import render_demo_image

STAGES = ("download", "decode", "sha256", "phash", "thumbnail", "file writes", "db", "phash index")
DB_METHODS = ("execute", "scalar", "scalars", "get", "refresh", "flush", "commit")
DEDUPE_LABELS = {
    "nearest_1k_us": "PhashIndex.nearest() at 1,000 hashes",
    "nearest_pool_us": "PhashIndex.nearest() at {pool} hashes",
    "sha256_lookup_us": "sha256 lookup (ORM, unique index)",
    "from_pool_ms": "PhashIndex.from_pool()",
}


def encode(n: int, seed: int, near: bool = False) -> tuple[str, bytes]:
    """Render demo image n as PNG (a third) or JPEG, or as an 85 % JPEG copy when near."""
    image = render_demo_image(n, seed=seed)
    if near:
        image = image.resize((image.width * 85 // 100, image.height * 85 // 100))
    buffer, fmt = io.BytesIO(), "PNG" if n % 3 == 2 and not near else "JPEG"
    image.save(buffer, fmt, quality=90)
    return f"image/{fmt.lower()}", buffer.getvalue()


def make_files(count: int, copy_share: float, seed: int) -> tuple[dict, list[str], int]:
    """Encode the served files once: distinct images, byte-identical and resized copies."""
    rng = np.random.default_rng(seed)
    copies = round(count * copy_share)
    distinct = count - 2 * copies
    picks = rng.choice(distinct, 2 * copies, replace=False).tolist()
    with ProcessPoolExecutor() as workers:
        bodies = list(workers.map(encode, range(distinct), [seed] * distinct))
        nears = workers.map(encode, picks[copies:], [seed] * copies, [True] * copies)
        files = {f"/img/{n}": body for n, body in enumerate(bodies)}
        files |= {f"/copy/{k}": bodies[n] for k, n in enumerate(picks[:copies])}  # same bytes
        files |= {f"/near/{k}": body for k, body in enumerate(nears)}  # resized, re-encoded
    paths = list(files)
    rng.shuffle(paths)
    return files, paths, copies


class Handler(BaseHTTPRequestHandler):
    """Serve the prepared files from memory, with keep-alive as a CDN would."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body wait on a delayed ACK (~30 ms each)

    def do_GET(self):  # the name http.server looks for
        """Send one file (every path asked for is one of them)."""
        kind, body = self.server.files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # http.server's signature
        """Stay quiet."""


class Stopwatch:
    """Exclusive seconds per stage: a wrapped call's time less that of wrapped calls inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner = [0.0]  # one slot per open call: the time its wrapped callees took

    def wrap(self, stage: str, fn):
        """Return `fn` timed into `stage` (calls from the job's own thread only)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._inner.append(0.0)
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                self.seconds[stage] += elapsed - self._inner.pop()
                self.calls[stage] += 1
                self._inner[-1] += elapsed

        return timed

    def patch(self, stack: ExitStack) -> None:
        """Time the import's stages where the real import calls them."""
        targets = [
            (imports, "get_image_bytes", "download"),
            (pool, "open_image", "decode"),
            (pool, "pixel_sha256", "sha256"),
            (pool, "perceptual_hash", "phash"),
            (store, "pixel_sha256", "sha256"),  # ImageStore.add hashes the pixels again
            (store.ImageStore, "_thumbnail", "thumbnail"),
            (store.ImageStore, "add", "file writes"),  # less the hashing and thumbnail inside
            (pool.PhashIndex, "nearest", "phash index"),
            *((Session, name, "db") for name in DB_METHODS),
        ]
        for owner, name, stage in targets:
            stack.enter_context(
                mock.patch.object(owner, name, self.wrap(stage, getattr(owner, name)))
            )


def per_call_us(fn, arguments: list, rounds: int = 3) -> float:
    """Return the mean microseconds of fn(argument) over the arguments, best of `rounds`."""
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for argument in arguments:
            fn(argument)
        best = min(best, time.perf_counter() - began)
    return best / len(arguments) * 1e6


def dedupe_costs(pool_size: int, lookups: int, seed: int) -> dict:
    """Time nearest() on random 64-bit hashes, and the sha256 lookup with pool_size rows more."""
    rng = np.random.default_rng(seed)

    def hexes(n: int) -> list[str]:
        return [f"{v:016x}" for v in rng.integers(0, 2**64, n, dtype=np.uint64).tolist()]

    queries, small, big = hexes(lookups), hexes(1000), hexes(pool_size)
    result = {"nearest_1k_us": per_call_us(pool.PhashIndex(small).nearest, queries)}
    result["nearest_pool_us"] = per_call_us(pool.PhashIndex(big).nearest, queries)
    result["pool_hashes"] = pool_size
    source = Source(kind="bench", label="bench rows", params={})
    db.session.add(source)
    db.session.commit()
    shas = [rng.bytes(32).hex() for _ in range(pool_size)]
    row = {"width": 512, "height": 512, "original_ext": "jpg", "source_id": source.id}
    rows = [{**row, "sha256": s, "phash": h} for s, h in zip(shas, big, strict=True)]
    db.session.execute(insert(Image), rows)
    db.session.commit()
    probes = [shas[i] if i % 2 else f"{i:064x}" for i in range(lookups)]  # half present
    result["sha256_lookup_us"] = per_call_us(
        lambda sha: db.session.scalar(select(Image.id).where(Image.sha256 == sha)), probes
    )
    began = time.perf_counter()
    loaded = pool.PhashIndex.from_pool()
    result["from_pool_ms"] = (time.perf_counter() - began) * 1000
    result["pool_rows"] = len(loaded._hashes)
    return result


def report(r: dict) -> None:
    """Print the tables."""
    t = r["tally"]
    print(
        f"served {r['urls']} URLs ({r['mib']:.1f} MiB; {r['copies']} exact and {r['copies']}"
        f" resized copies), rendered in {r['setup_s']:.1f} s"
    )
    print(
        f"import: {r['urls']} images in {r['total_s']:.2f} s -> {r['images_per_s']:.1f} images/s"
        f" (added {t['added']}, duplicates {t['duplicates']}, near {t['near_duplicates']},"
        f" failed {t['failed']})"
    )
    print(f"{'stage':<14}{'seconds':>9}{'share':>8}{'ms/image':>10}{'calls':>8}")
    for stage, seconds in r["stages"].items():
        share, per = seconds / r["total_s"], seconds / r["urls"] * 1000
        calls = r["calls"].get(stage, "")
        print(f"{stage:<14}{seconds:>9.2f}{share:>8.1%}{per:>10.2f}{calls:>8}")
    rows, lookups = r["dedupe"]["pool_rows"], r["lookups"]
    print(f"dedupe lookups: mean of {lookups}, best of 3 rounds; {rows:,} image rows in the pool")
    for key, label in DEDUPE_LABELS.items():
        unit = "ms" if key.endswith("_ms") else "us"
        label = label.format(pool=f"{r['dedupe']['pool_hashes']:,}")
        print(f"  {label:<38}{r['dedupe'][key]:>9.1f} {unit}")
    ratio = r["dedupe"]["nearest_pool_us"] / r["dedupe"]["nearest_1k_us"]
    print(f"  nearest() cost at {r['dedupe']['pool_hashes']:,} / at 1,000: {ratio:.1f}x")


def timed_import(urls: list[str]) -> dict:
    """Run the URL-list job as the admin page starts it, timing each stage where it runs."""
    admin = create_user("admin", "bench password 1234", admin=True)
    source = Source(kind="urls", label="bench", params={"urls": urls}, created_by_id=admin.id)
    db.session.add(source)
    db.session.commit()
    watch = Stopwatch()
    with ExitStack() as stack:
        watch.patch(stack)
        began = time.perf_counter()
        job = jobs.run_here("import_urls", source_id=source.id)
        total_s = time.perf_counter() - began
    if job.status != "succeeded":
        raise RuntimeError(f"the import {job.status}: {job.message}\n{job.error}")
    stages = {stage: watch.seconds[stage] for stage in STAGES}
    stages["other"] = total_s - sum(stages.values())
    return {
        "urls": len(urls),
        "total_s": total_s,
        "images_per_s": len(urls) / total_s,
        "tally": {k: v for k, v in job.result.items() if k != "failures"},
        "stages": stages,
        "calls": {stage: watch.calls[stage] for stage in STAGES},
    }


def main() -> None:
    """Serve the images, import them as a URL-list job, time the stages, time dedupe lookups."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500, help="URLs to import")
    parser.add_argument("--copies", type=float, default=0.03, help="share exact (and near) copies")
    parser.add_argument("--pool", type=int, default=10_000, help="pool size for dedupe lookups")
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args()
    os.environ["no_proxy"] = ",".join(filter(None, ["127.0.0.1", os.environ.get("no_proxy")]))
    began = time.perf_counter()
    files, paths, copies = make_files(args.images, args.copies, args.seed)
    result = {"setup_s": time.perf_counter() - began, "copies": copies, "lookups": args.lookups}
    result["mib"] = sum(len(body) for _, body in files.values()) / 2**20
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.files = True, files
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, app = f"127.0.0.1:{server.server_address[1]}", None
    instance = tempfile.mkdtemp(prefix="tastebud-import-")
    try:
        config = {"QUEUE": "immediate", "SECRET_KEY": "bench", "FETCH_ALLOWED_HOSTS": [host]}
        config |= {"DATABASE_URL": "", "STORAGE_ROOT": ""}  # the temp instance, whatever the env
        app = create_app(config, instance_path=str(Path(instance) / "instance"))
        with app.app_context():
            result |= timed_import([f"http://{host}{path}" for path in paths])
            result["dedupe"] = dedupe_costs(args.pool, args.lookups, args.seed)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            report(result)
    finally:
        if app is not None:
            with app.app_context():
                db.engine.dispose()
        server.shutdown()
        server.server_close()
        thread.join()
        shutil.rmtree(instance, ignore_errors=True)


if __name__ == "__main__":
    main()
