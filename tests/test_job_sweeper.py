"""No job is ever stuck: a running job's worker beats a heartbeat whatever the job does, every
process sweeps for jobs whose worker went silent and for jobs the queue lost, and a job handed
out twice still runs once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import create_app
from rating import jobs
from rating.models import Job, db, utcnow
from tests.polling import wait_for


@pytest.fixture
def queued_app(tmp_path):
    """An app whose jobs wait in a real (SQLite) huey queue, with no worker running."""
    app = create_app(
        {
            "SECRET_KEY": "test",
            "QUEUE": "sqlite",
            "JOB_HEARTBEAT_SECONDS": 0.05,
            "JOB_STALE_SECONDS": 0.5,
            "JOB_SWEEP_SECONDS": 0.05,
            "JOB_REQUEUE_AFTER_SECONDS": 30,
        },
        instance_path=str(tmp_path / "instance"),
    )
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def counting_kind():
    """A light job kind that counts its runs."""
    runs = []

    @jobs.handler("count_runs")
    def count_runs(job, progress):
        runs.append(job.id)
        return {"runs": len(runs)}

    yield runs
    jobs.HANDLERS.pop("count_runs")


def run_pending(app) -> int:
    """Run what waits in the light queue here, as a worker would; return how many tasks ran."""
    huey, ran = app.extensions["huey"], 0
    while (task := huey.dequeue()) is not None:
        huey.execute(task)
        ran += 1
    return ran


def test_a_job_the_queue_lost_is_queued_again_and_runs_once(queued_app, counting_kind):
    app = queued_app
    with app.app_context():
        job_id = jobs.enqueue("count_runs", None).id
        assert jobs.queued_ids(app.extensions["huey"]) == {job_id}
        assert jobs.requeue_lost_jobs() == 0  # it is in the queue: nothing lost
        app.extensions["huey"].flush()  # Redis restarted without its data
        assert jobs.requeue_lost_jobs() == 0  # too fresh: it may be on its way to a worker
        db.session.execute(
            update(Job).values(created_at=utcnow() - timedelta(seconds=31))
        )  # half a minute later, still nowhere
        db.session.commit()
        assert jobs.sweep() == {"failed": 0, "requeued": 1}
        assert jobs.queued_ids(app.extensions["huey"]) == {job_id}
        assert "queued it again" in db.session.get(Job, job_id).log
        jobs._queue_task(db.session.get(Job, job_id))  # handed out twice: it runs once
    assert run_pending(app) == 2
    assert counting_kind == [job_id]
    with app.app_context():
        assert db.session.get(Job, job_id).status == "succeeded"
        assert jobs.requeue_lost_jobs() == 0  # a finished job is never queued again


def test_a_job_that_never_reports_still_beats_and_is_not_taken_for_dead(queued_app, monkeypatch):
    app = queued_app
    monkeypatch.setattr(jobs, "WORKER", "gpu-box-9:777")  # looks remote: only heartbeats count
    release, beats = threading.Event(), []

    @jobs.handler("silent_step")
    def silent_step(job, progress):  # a long step with no progress report (loading a model)
        assert release.wait(20)

    def run() -> None:
        with app.app_context():
            jobs.run_job(job_id)
            db.session.remove()

    try:
        with app.app_context():
            job_id = jobs.enqueue("silent_step", None).id
        worker = threading.Thread(target=run)
        worker.start()
        with app.app_context():

            def beat_seen():
                db.session.expire_all()
                job = db.session.get(Job, job_id)
                if job.status == "running" and job.heartbeat_at > job.started_at:
                    beats.append(job.heartbeat_at)
                return len(set(beats)) >= 3

            wait_for(beat_seen, 10, "three heartbeats")

            def alive_past_stale():  # swept over and over for twice JOB_STALE_SECONDS
                assert jobs.sweep()["failed"] == 0
                db.session.expire_all()
                job = db.session.get(Job, job_id)
                assert job.status == "running"
                return utcnow() - job.started_at > timedelta(seconds=1.0)

            wait_for(alive_past_stale, 10, "a second of sweeps")
        release.set()
        worker.join(timeout=20)
        with app.app_context():
            assert db.session.get(Job, job_id).status == "succeeded"
    finally:
        release.set()
        jobs.HANDLERS.pop("silent_step")


def remote_job(silent_for: float) -> int:
    """A job 'running' on another host whose last heartbeat was `silent_for` seconds ago."""
    beat = utcnow() - timedelta(seconds=silent_for)
    job = Job(
        kind="demo_pack",
        params={},
        lock_key="demo_pack",
        status="running",
        worker="gpu-box-7:4242",
        started_at=beat,
        heartbeat_at=beat,
    )
    db.session.add(job)
    db.session.commit()
    return job.id


def test_the_sweeper_fails_a_silent_remote_job_with_no_request_and_no_restart(queued_app):
    app = queued_app
    with app.app_context():
        job_id = remote_job(silent_for=0)
    sweeper = jobs.Sweeper(app).start()
    try:
        with app.app_context():

            def failed():
                db.session.expire_all()
                return db.session.get(Job, job_id).status == "failed"

            wait_for(failed, 10, "the sweeper failing the silent job")
            job = db.session.get(Job, job_id)
            assert job.lock_key is None and "worker stopped" in job.message
    finally:
        sweeper.stop()


def test_a_heartbeat_that_arrives_meanwhile_keeps_the_job_alive(queued_app):
    app = queued_app
    with app.app_context():
        job = db.session.get(Job, remote_job(silent_for=5))  # seen silent by this process…
        with db.engine.begin() as other:  # …while its worker beats, from another process
            other.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow()))
        assert jobs.fail_if_orphaned(job) is False  # the row is not as it was seen
        assert job.status == "running"
        assert jobs.fail_if_orphaned(job) is False  # and it is fresh now


def test_one_job_per_lock_when_clicks_race(queued_app, counting_kind):
    """Eight clicks at once on a button whose job holds a lock (one training per person): the
    database's unique lock key lets exactly one job in; every click is shown that one."""
    app, shown, errors = queued_app, [], []
    start = threading.Barrier(8)

    def click() -> None:
        try:
            with app.app_context():
                start.wait(timeout=10)
                shown.append(jobs.enqueue_once("count_runs", None, lock_key="taste:1").id)
                db.session.remove()
        except Exception as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=click) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(shown) == 8 and len(set(shown)) == 1
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Job.id))) == 1
