"""Faults of a scaled-out tastebud, measured on the default settings: the web, a GPU worker
(under another host name, as on another machine) and a light worker as separate processes on
real PostgreSQL and Redis servers started here (tests/services.py, tests/deployment.py).

1. A GPU worker killed (-9) mid-training: seconds until its job is failed and its lock freed,
   with no process restarted.
2. A click while Redis is down: the answer, and whether a lock or a queued row is left.
3. Redis killed (-9) with jobs waiting in it: seconds until they are queued again, and whether
   they then run.
4. PostgreSQL restarted under 8 raters: ratings acknowledged, lost, refused (and how).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from rating.models import Image, Job, Rating, User  # noqa: E402
from tests.deployment import (  # noqa: E402
    Browser,
    Deployment,
    RatingThroughFault,
    other_host_possible,
    register_people,
)
from tests.services import Postgres, Redis  # noqa: E402
from tests.test_taste import TINY  # noqa: E402
from tests.widgets import FINAL, job_state  # noqa: E402

SETTINGS = TINY | {"REGISTER_RATE_LIMIT": "1000 per minute", "LOGIN_RATE_LIMIT": "1000 per minute"}


class World:
    """Fresh servers and a deployment on them; `look(statement)` reads the database."""

    def __init__(self, root: Path, postgres: Postgres, redis: Redis, name: str, **settings):
        self.postgres, self.redis, self.name = postgres, redis, name
        os.environ["TASTEBUD_DATABASE_URL"] = postgres.create_database(name)
        os.environ["TASTEBUD_REDIS_URL"] = redis.url()
        redis.flush()
        self.engine = create_engine(os.environ["TASTEBUD_DATABASE_URL"], pool_pre_ping=True)
        self.deployment = Deployment(root / name, SETTINGS | settings)

    def look(self, statement):
        with Session(self.engine) as session:
            return session.scalar(statement)

    def job(self, job_id: int) -> Job:
        return self.look(select(Job).where(Job.id == job_id))

    def until(self, check, limit: float, what: str) -> float:
        """Seconds until `check()` holds (polled every 0.1 s), or fail after `limit`."""
        began = time.monotonic()
        while time.monotonic() - began < limit:
            if check():
                return time.monotonic() - began
            time.sleep(0.1)
        raise RuntimeError(f"{what}: not within {limit} s\n{self.deployment.logs()}")

    def admin(self, pool: int) -> tuple[Browser, list[int]]:
        admin = Browser(self.deployment.base)
        admin.register("admin")
        admin.post("/admin/demo", {"count": pool}, htmx=True)
        count = select(func.count()).select_from(Image)
        self.until(lambda: self.look(count) == pool, 300, "the demo pack")
        with Session(self.engine) as session:
            return admin, session.scalars(select(Image.id).order_by(Image.id)).all()

    def close(self) -> None:
        self.deployment.stop()
        self.engine.dispose()
        self.postgres.drop_database(self.name)


def killed_gpu_worker(world: World) -> dict:
    deployment = world.deployment
    deployment.start("web")
    deployment.start("worker")
    host = "gpu-box-2" if other_host_possible() else None
    deployment.start("gpu-worker", host=host)
    admin, ids = world.admin(48)
    for n, image_id in enumerate(ids[:40]):
        admin.post(f"/rate/{image_id}", {"stars": 1 + (image_id * 7 + n) % 5}, htmx=True)
    first = job_state(admin.post("/taste/train", htmx=True).text).id
    world.until(lambda: world.job(first).status == "running", 120, "the training starting")
    time.sleep(2)  # mid-run: past its start, with heartbeats written
    deployment.kill("gpu-worker")
    seconds = world.until(lambda: world.job(first).status == "failed", 300, "the job failing")
    second = job_state(admin.post("/taste/train", htmx=True).text)
    return {
        "worker": f"{host or 'this host'}",
        "seconds_until_failed": round(seconds, 1),
        "lock_freed": world.job(first).lock_key is None,
        "next_click_starts_a_new_job": second.id != first,
    }


def redis_down_and_crash(world: World) -> dict:
    deployment = world.deployment
    deployment.start("web")
    admin, _ = Browser(deployment.base), None
    admin.register("admin")
    demo = job_state(admin.post("/admin/demo", {"count": 6}, htmx=True).text).id
    crowd = job_state(admin.post("/admin/crowd-model", htmx=True).text).id
    world.redis.kill()
    down = admin.post("/admin/crowd-model", htmx=True)  # the crowd job's lock is held: shown
    started = admin.post("/taste/train", htmx=True)  # a new job while Redis is down
    held = select(func.count()).select_from(Job).where(Job.lock_key.is_not(None))
    click = {"status": started.status_code, "locks_held": world.look(held) - 2}  # 2: waiting
    world.redis.start()
    back = time.monotonic()
    for job_id in (demo, crowd):
        world.until(lambda j=job_id: "queued it again" in (world.job(j).log or ""), 120, "requeue")
    requeued = time.monotonic() - back
    deployment.start("worker")
    deployment.start("gpu-worker")
    for job_id in (demo, crowd):
        world.until(lambda j=job_id: world.job(j).status in FINAL, 300, "the lost jobs ending")
    return {
        "click_while_down": click | {"shown_running_job": down.status_code == 200},
        "seconds_until_requeued": round(requeued, 1),
        "lost_jobs_then": [world.job(j).status for j in (demo, crowd)],
    }


def postgres_restart(world: World) -> dict:
    deployment = world.deployment
    deployment.start("web")
    deployment.start("worker")
    _, ids = world.admin(48)
    raters = register_people(deployment.base, 8)
    load = RatingThroughFault(raters, ids)
    load.run(world.postgres.restart)
    with Session(world.engine) as session:
        users = dict(session.execute(select(User.username, User.id)).all())
        saved = {
            (user_id, image_id): stars
            for user_id, image_id, stars in session.execute(
                select(Rating.user_id, Rating.image_id, Rating.stars)
            )
        }
    refused = [
        f"{code}" + (" (bare)" if text in load.bare_errors() else "") for code, text in load.refused
    ]
    return {
        "acknowledged": len(load.acknowledged),
        "lost": len(load.lost(saved, [users[f"rater{n}"] for n in range(8)])),
        "refused": {kind: refused.count(kind) for kind in sorted(set(refused))},
    }


CASES = {
    "killed_gpu_worker": killed_gpu_worker,
    "redis_down_and_crash": redis_down_and_crash,
    "postgres_restart": postgres_restart,
}
# "Train my taste" with no ratings yet: the click itself, while Redis is down, is what counts.
CASE_SETTINGS = {"redis_down_and_crash": {"TASTE_MIN_RATINGS": 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tastebud-faults-"))
    postgres, redis = Postgres(durable=True), Redis()
    results = {}
    try:
        for n, name in enumerate(args.cases):
            world = World(root, postgres, redis, f"faults_{n}", **CASE_SETTINGS.get(name, {}))
            try:
                results[name] = CASES[name](world)
            finally:
                world.close()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    finally:
        postgres.close()
        redis.close()


if __name__ == "__main__":
    main()
