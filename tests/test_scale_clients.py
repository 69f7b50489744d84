"""The clients a scaled-out site needs are declared and load: PostgreSQL's and Redis's."""

from __future__ import annotations

import tomllib
from pathlib import Path

from huey import RedisHuey
from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parents[1]


def test_the_scale_extra_declares_the_postgresql_and_redis_clients():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    for extra in ("scale", "dev"):  # the tests install what a scaled site needs
        names = {requirement.split("[")[0].split(">")[0] for requirement in extras[extra]}
        assert {"psycopg", "redis"} <= names, extra


def test_a_postgresql_url_and_a_redis_url_get_working_clients():
    # neither connects when built: no server is needed to know the drivers are there
    engine = create_engine("postgresql+psycopg://tastebud:secret@127.0.0.1:1/tastebud")
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    queue = RedisHuey("tastebud-test", url="redis://127.0.0.1:1/0")
    assert queue.storage.conn.connection_pool.connection_kwargs["port"] == 1
