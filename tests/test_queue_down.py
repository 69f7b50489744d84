"""When the job queue can't be reached (Redis down), a click says so and leaves nothing stuck."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy import func, select

from app import create_app
from rating.models import Job, db
from tests.conftest import Site


@pytest.fixture
def unreachable_redis(tmp_path):
    """A site whose queue is a Redis URL on a port where nothing listens."""
    with socket.socket() as probe:  # a free port, closed again: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(
        {
            "SECRET_KEY": "test",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "TASTE_MIN_RATINGS": 0,  # no pool to rate: the click itself is what is tested
        },
        instance_path=str(tmp_path / "instance"),
    )
    yield app
    with app.app_context():
        db.engine.dispose()


def test_a_click_while_the_queue_is_down_says_so_and_holds_no_lock(unreachable_redis):
    site = Site(unreachable_redis.test_client())
    site.register("ada")  # the first account: the admin
    demo = site.post("/admin/demo", {"count": 12})
    assert demo.status_code == 503 and "Nothing was started" in demo.get_data(as_text=True)
    for attempt in range(2):  # the second click is not told "waiting for the worker"
        answer = site.post("/taste/train", htmx=True)
        page = answer.get_data(as_text=True)
        assert answer.status_code == 503, (attempt, page[:300])
        assert "The job queue can" in page and "Nothing was started" in page
    with unreachable_redis.app_context():
        jobs = db.session.scalars(select(Job)).all()
        assert [job.status for job in jobs] == ["failed"] * 3
        assert all(
            job.lock_key is None and "queue could not be reached" in job.message for job in jobs
        )
        queued = select(func.count(Job.id)).where(Job.status == "queued")
        assert db.session.scalar(queued) == 0
    page = site.client.get("/taste/").get_data(as_text=True)
    assert "Training…" not in page  # the button is free again
