"""A job whose worker died on another machine is failed by whichever live process sees it next,
without a restart: its progress stops, its lock is freed, and a new click starts afresh."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from rating import jobs
from rating.models import Job, db, utcnow
from tests.conftest import Site


def remote_job(silent_for: float, owner_id: int) -> int:
    """A crowd-model job 'running' on another host, its last heartbeat `silent_for` s ago."""
    beat = utcnow() - timedelta(seconds=silent_for)
    job = Job(
        kind="train_crowd",
        owner_id=owner_id,
        params={},
        lock_key="train_crowd",
        status="running",
        worker="gpu-box-7:4242",
        started_at=beat - timedelta(minutes=5),
        heartbeat_at=beat,
    )
    db.session.add(job)
    db.session.commit()
    return job.id


def test_a_dead_remote_workers_job_is_failed_when_seen_and_its_lock_freed(app):
    site = Site(app.test_client())
    site.register("admin")  # the first account: the admin, id 1
    stale = app.config["JOB_STALE_SECONDS"]
    with app.app_context():
        alive = remote_job(stale / 2, owner_id=1)
    page = site.client.get(f"/jobs/{alive}", headers={"HX-Request": "true"})
    assert "the worker stopped" not in page.get_data(as_text=True)  # still within its time
    with app.app_context():
        job = db.session.get(Job, alive)
        assert job.status == "running"
        job.heartbeat_at = utcnow() - timedelta(seconds=stale + 60)  # then it goes silent
        db.session.commit()
    page = site.client.get(f"/jobs/{alive}", headers={"HX-Request": "true"})
    assert "the worker stopped" in page.get_data(as_text=True)  # seen by the polling page
    with app.app_context():
        job = db.session.get(Job, alive)
        assert job.status == "failed" and job.lock_key is None

        dead = remote_job(stale + 60, owner_id=1)  # another, holding the crowd job's lock
    site.post("/admin/crowd-model", htmx=True)  # the click fails it and starts a new one
    with app.app_context():
        assert db.session.get(Job, dead).status == "failed"
        newest = db.session.scalar(select(Job).order_by(Job.id.desc()))
        assert newest.id > dead and newest.kind == "train_crowd"
        assert jobs.fail_orphaned_jobs() == 0  # nothing left for a restart to find
