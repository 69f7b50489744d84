"""A database server's pooled connections are checked only after sitting idle: a connection a
server restart dropped is replaced before use, while a busy site pays no extra round trip."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from app import create_app
from rating.database import ping_after_idle
from rating.models import db
from tests.conftest import Site


@pytest.fixture
def pinged(tmp_path, monkeypatch):
    """An engine with the idle check, and the list of pings it made."""
    engine = create_engine(f"sqlite:///{tmp_path / 'pool.db'}")
    pings = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or ping(c))
    yield engine, pings
    engine.dispose()


def test_a_busy_connection_is_used_without_a_ping(pinged):
    engine, pings = pinged
    ping_after_idle(engine, 60.0)
    for _ in range(3):
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    assert pings == []


def test_an_idle_connection_that_was_dropped_is_replaced_before_use(pinged):
    engine, pings = pinged
    ping_after_idle(engine, 0.0)
    with engine.connect() as connection:
        dropped = connection.connection.dbapi_connection
    dropped.close()  # as a server restart leaves a pooled connection

    with engine.connect() as connection:  # no error: the pool swapped it
        assert connection.execute(text("SELECT 1")).scalar() == 1
        assert connection.connection.dbapi_connection is not dropped
    assert pings and pings[0] is dropped


@pytest.mark.services
def test_after_a_postgres_restart_the_next_request_just_works(tmp_path, on_services):
    settings = {"TESTING": True, "QUEUE": "immediate", "SECRET_KEY": "t"}
    app = create_app(settings | {"DATABASE_IDLE_PING": 0.0}, instance_path=str(tmp_path))
    site = Site(app.test_client())
    site.register("first")
    assert site.client.get("/rate").status_code == 200

    on_services.postgres.restart()  # every pooled connection is now dead

    assert site.client.get("/rate").status_code == 200
    with app.app_context():
        db.engine.dispose()
