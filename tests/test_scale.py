"""Scaled out, as deployed: real PostgreSQL and Redis, the web app, a GPU worker and a light
worker as separate processes sharing one storage root (tests/deployment.py). A killed worker,
a Redis crash and a PostgreSQL restart leave no job stuck and lose no acknowledged rating.

These run in `make test`'s --services pass (and `.ci/run`); a plain pytest run skips them.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from rating.models import Image, Job, Rating, TasteVersion, User
from tests.deployment import (
    Browser,
    Deployment,
    RatingThroughFault,
    other_host_possible,
    register_people,
)
from tests.polling import wait_for
from tests.test_taste import TINY
from tests.widgets import FINAL, job_state

pytestmark = pytest.mark.services

# Faster than the defaults, so each case takes seconds: a dead worker's job is failed within
# JOB_STALE_SECONDS + JOB_SWEEP_SECONDS, a lost one re-queued after JOB_REQUEUE_AFTER_SECONDS.
FAST_JOBS = {
    "JOB_HEARTBEAT_SECONDS": 1,
    "JOB_STALE_SECONDS": 5,
    "JOB_SWEEP_SECONDS": 0.5,
    "JOB_REQUEUE_AFTER_SECONDS": 2,
    "REGISTER_RATE_LIMIT": "1000 per minute",  # everyone registers from 127.0.0.1
    "LOGIN_RATE_LIMIT": "1000 per minute",
}
POOL, RATED = 48, 40


class Database:
    """Looks at what the services wrote: each look in a new session (so a PostgreSQL restart
    only costs the connections it had; pre-ping replaces them)."""

    def __init__(self, url: str):
        self.engine = create_engine(url, pool_pre_ping=True)

    def scalar(self, statement):
        with Session(self.engine) as session:
            return session.scalar(statement)

    def rows(self, statement) -> list:
        with Session(self.engine) as session:
            return session.execute(statement).all()


@pytest.fixture
def database(on_services):
    looks = Database(os.environ["TASTEBUD_DATABASE_URL"])
    yield looks
    looks.engine.dispose()


@pytest.fixture
def deployment(tmp_path, on_services):
    deployed = Deployment(tmp_path, FAST_JOBS | TINY)
    yield deployed
    deployed.stop()


def job(database: Database, job_id: int) -> Job:
    return database.scalar(select(Job).where(Job.id == job_id))


def count(database: Database, model) -> int:
    return database.scalar(select(func.count()).select_from(model))


def click(browser: Browser, path: str) -> int:
    """Press a button that starts a job; return the job the answer shows."""
    answer = browser.post(path, htmx=True)
    assert answer.status_code == 200, answer.text[:500]
    return job_state(answer.text).id


def load_pool(browser: Browser, database: Database, deployment: Deployment) -> list[int]:
    """The admin adds the demo pack; the light worker renders it. Return the images' ids."""
    answer = browser.post("/admin/demo", {"count": POOL}, htmx=True)
    assert answer.status_code == 200, answer.text[:500]
    wait_for(lambda: count(database, Image) == POOL, 120, "the demo pack", deployment.logs)
    return [image_id for (image_id,) in database.rows(select(Image.id).order_by(Image.id))]


def test_the_whole_flow_across_processes_and_a_killed_gpu_worker(deployment, database):
    deployment.start("web")
    deployment.start("worker")
    # The GPU worker as on another machine (another host name), where it can be: its death is
    # then seen only by its missing heartbeats.
    remote = "gpu-box-2" if other_host_possible() else None
    deployment.start("gpu-worker", host=remote)
    admin = Browser(deployment.base)
    admin.register("admin")
    ids = load_pool(admin, database, deployment)
    for n, image_id in enumerate(ids[:RATED]):
        stars = 1 + (image_id * 7 + n) % 5
        assert admin.post(f"/rate/{image_id}", {"stars": stars}, htmx=True).status_code == 200

    first = click(admin, "/taste/train")  # the GPU worker takes it…
    wait_for(lambda: job(database, first).status == "running", 60, "the GPU worker starting")
    assert job(database, first).worker.startswith(f"{remote}:") if remote else True
    deployment.kill("gpu-worker")  # …and dies mid-run
    killed = time.monotonic()
    failed = wait_for(
        lambda: (found := job(database, first)).status == "failed" and found,
        30,  # the web's or the light worker's sweeper, within JOB_STALE + JOB_SWEEP_SECONDS
        "the dead worker's job failing",
        deployment.logs,
    )
    print(f"GPU worker on {remote or 'this host'} killed: its job failed after", end=" ")
    print(f"{time.monotonic() - killed:.1f} s (stale after {FAST_JOBS['JOB_STALE_SECONDS']} s)")
    assert "worker stopped" in failed.message and failed.lock_key is None

    deployment.start("gpu-worker")  # a new one; the button works again at once
    second = click(admin, "/taste/train")
    assert second != first
    done = wait_for(
        lambda: (found := job(database, second)).status in FINAL and found,
        300,
        "the second training",
        deployment.logs,
    )
    assert done.status == "succeeded", (done.message, done.error, deployment.logs())
    version = database.scalar(select(TasteVersion.number).order_by(TasteVersion.id.desc()))
    download = admin.get(f"/taste/versions/{version}/download/lora")
    assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(download.content)) as bundle:  # the LoRA as loaders take it
        (name,) = [name for name in bundle.namelist() if name.endswith(".safetensors")]
        weights = bundle.read(name)
    header = json.loads(weights[8 : 8 + struct.unpack("<Q", weights[:8])[0]])
    assert any("lora" in key for key in header)
    files = [path for path in deployment.storage.rglob("*") if path.is_file()]
    assert files and all(Path(deployment.root / "web") not in p.parents for p in files)


def test_jobs_a_redis_crash_lost_are_queued_again_and_run(deployment, database, on_services):
    redis = on_services.redis
    deployment.start("web")  # no worker yet: the jobs wait in Redis
    admin = Browser(deployment.base)
    admin.register("admin")
    answer = admin.post("/admin/demo", {"count": 6}, htmx=True)
    demo = job_state(answer.text).id
    crowd = click(admin, "/admin/crowd-model")  # the GPU queue's
    assert job(database, demo).status == job(database, crowd).status == "queued"

    redis.kill()  # kill -9: what it held is gone
    down = admin.post("/admin/demo", {"count": 6}, htmx=True)  # the demo pack's lock is held
    assert down.status_code == 200 and job_state(down.text).id == demo
    redis.start()  # back, empty

    for job_id in (demo, crowd):
        wait_for(
            lambda job_id=job_id: "queued it again" in (job(database, job_id).log or ""),
            30,
            f"job {job_id} queued again",
            deployment.logs,
        )
    deployment.start("worker")
    deployment.start("gpu-worker")
    for job_id in (demo, crowd):
        wait_for(
            lambda job_id=job_id: job(database, job_id).status in FINAL,
            120,
            f"job {job_id} ending",
            deployment.logs,
        )
    assert job(database, demo).status == "succeeded" and count(database, Image) == 6
    assert job(database, crowd).message  # it ran and said how it went


def test_a_postgres_restart_under_rating_load_loses_no_acknowledged_rating(
    deployment, database, on_services
):
    for service in ("web", "worker"):
        deployment.start(service)
    admin = Browser(deployment.base)
    admin.register("admin")
    ids = load_pool(admin, database, deployment)
    raters = register_people(deployment.base, 8)
    load = RatingThroughFault(raters, ids)
    load.run(on_services.postgres.restart)

    users = dict(database.rows(select(User.username, User.id)))
    saved = {
        (u, i): stars
        for u, i, stars in database.rows(select(Rating.user_id, Rating.image_id, Rating.stars))
    }
    lost = load.lost(saved, [users[f"rater{n}"] for n in range(8)])
    codes = sorted({str(code) for code, _ in load.refused})
    print(f"PostgreSQL restart: {len(load.acknowledged)} acknowledged, {len(lost)} lost, ", end="")
    print(f"{len(load.refused)} refused {codes}")
    assert not lost, f"{len(lost)} acknowledged ratings lost"
    # What was refused got the site's own retryable answer, never a bare server error.
    assert not load.bare_errors(), (load.bare_errors(), deployment.log("web"))
    assert admin.get("/rate").status_code == 200  # recovered by itself
