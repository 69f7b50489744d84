"""The demo pack: a job that renders images into the pool, from the web and the CLI."""

from __future__ import annotations

import re

from app import create_app
from rating import jobs
from rating.models import Image, Job, Source, db
from tests.conftest import Site
from tests.widgets import job_state


def test_each_click_adds_new_images(app, admin_site):
    admin_site.post("/admin/demo", {"count": 5})
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Image.id))) == 17
        refs = db.session.scalars(db.select(Image.source_ref).order_by(Image.id)).all()
        assert refs[-1] == "demo:0:16" and len(set(refs)) == 17
        sources = db.session.scalars(db.select(Source).order_by(Source.id)).all()
        assert [s.params["start"] for s in sources] == [0, 12]
        job = db.session.scalar(db.select(Job).order_by(Job.id.desc()))
        assert job.status == "succeeded" and job.message == "Added 5 demo images"
        assert job.result["added"] == 5


def test_htmx_start_returns_the_progress_widget(admin_site):
    html = admin_site.post("/admin/demo", {"count": 2}, htmx=True).get_data(as_text=True)
    assert 'data-status="succeeded"' in html and "Start rating" in html
    assert "hx-trigger" not in html  # finished: the widget stops polling


def test_bad_counts_are_refused(admin_site):
    for count in ("0", "99999", "many"):
        response = admin_site.post("/admin/demo", {"count": count})
        assert response.status_code == 400
        assert "Choose between 1 and 5000 images." in response.get_data(as_text=True)


def test_cli_loads_the_demo_pack(app, runner):
    result = runner.invoke(args=["images", "demo", "--count", "3"])
    assert result.exit_code == 0, result.output
    assert "succeeded: Added 3 demo images" in result.output
    with app.app_context():
        images = db.session.scalars(db.select(Image)).all()
        assert {i.source.kind for i in images} == {"demo"} and len(images) == 3
        assert all(min(i.width, i.height) >= 512 for i in images)


def test_a_running_job_can_be_cancelled(app, admin_site, monkeypatch):
    real = jobs.HANDLERS["demo_pack"]

    def cancel_midway(job, progress):
        job.stop_requested = True  # as if the Cancel button was pressed during the run
        db.session.commit()
        return real(job, progress)

    monkeypatch.setitem(jobs.HANDLERS, "demo_pack", cancel_midway)
    html = admin_site.post("/admin/demo", {"count": 40}, htmx=True).get_data(as_text=True)
    assert 'data-status="cancelled"' in html
    with app.app_context():
        added = db.session.scalar(db.select(db.func.count(Image.id)))
    assert 12 < added < 52  # what finished before the cancel is kept


def test_a_failing_job_says_why_and_ends(app, admin_site, monkeypatch):
    def explode(job, progress):
        raise RuntimeError("renderer crashed")

    monkeypatch.setitem(jobs.HANDLERS, "demo_pack", explode)
    html = admin_site.post("/admin/demo", {"count": 1}, htmx=True).get_data(as_text=True)
    assert 'data-status="failed"' in html and "Failed: renderer crashed" in html
    with app.app_context():
        job = db.session.scalar(db.select(Job).order_by(Job.id.desc()))
        assert "RuntimeError" in job.error and job.finished_at is not None


def test_jobs_left_running_are_marked_failed_at_start(app):
    with app.app_context():
        db.session.add(Job(kind="demo_pack", status="running"))
        db.session.commit()
        assert jobs.fail_orphaned_jobs() == 1
        job = db.session.scalar(db.select(Job))
        assert job.status == "failed" and re.search("worker stopped", job.message)


def test_a_second_click_while_a_pack_waits_shows_that_one(tmp_path):
    """Each pack takes the next images, so two at once would overlap: one runs at a time."""
    app = create_app({"SECRET_KEY": "test", "QUEUE": "sqlite"}, instance_path=str(tmp_path))
    site = Site(app.test_client())
    site.register("admin")
    first = job_state(site.post("/admin/demo", {"count": 5}, htmx=True).get_data(as_text=True))
    again = job_state(site.post("/admin/demo", {"count": 7}, htmx=True).get_data(as_text=True))
    assert again.id == first.id and again.status == "queued"
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Job.id))) == 1
        db.engine.dispose()
