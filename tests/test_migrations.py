"""Migrations: an empty database upgrades to exactly the models' schema, and back; an old one
keeps its data. `make test` runs these on PostgreSQL too (--services)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import inspect

from app import MIGRATIONS, create_app
from rating.models import Rating, Source, User, db

ROOT = Path(__file__).resolve().parents[1]


def test_empty_database_upgrades_to_the_models(tmp_path):
    app = create_app({"TESTING": True, "QUEUE": "immediate"}, instance_path=str(tmp_path))
    with app.app_context(), db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
        assert diff == []
        if connection.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_downgrade_and_upgrade_again_keep_working(tmp_path):
    app = create_app({"TESTING": True, "QUEUE": "immediate"}, instance_path=str(tmp_path))
    with app.app_context():
        downgrade(directory=MIGRATIONS, revision="base")
        assert "rating" not in inspect(db.engine).get_table_names()
        upgrade(directory=MIGRATIONS)
        assert "rating" in inspect(db.engine).get_table_names()


def test_restart_keeps_ratings(tmp_path):
    config = {"TESTING": True, "QUEUE": "immediate"}
    app = create_app(config, instance_path=str(tmp_path))
    with app.app_context():
        db.session.add(User(username="alice", password_hash="x"))
        db.session.commit()
        db.engine.dispose()
    again = create_app(config, instance_path=str(tmp_path))  # runs the migrations again
    with again.app_context():
        assert db.session.scalar(db.select(User.username)) == "alice"
        assert db.session.scalar(db.select(db.func.count(Rating.id))) == 0
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0  # owner-only


def test_upgrading_an_old_database_keeps_its_ratings(tmp_path):
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "AUTO_MIGRATE": False}, instance_path=str(tmp_path)
    )
    with app.app_context():
        upgrade(directory=MIGRATIONS, revision="0001")  # the first release's schema
        with db.engine.begin() as connection:
            for statement in (
                'INSERT INTO "user" (id, username, password_hash, is_admin, disabled, created_at)'
                " VALUES (1, 'ada', 'x', TRUE, FALSE, '2026-01-01')",
                "INSERT INTO source (id, kind, label, params, created_at)"
                " VALUES (1, 'demo', 'old', '{}', '2026-01-01')",
                "INSERT INTO image (id, sha256, phash, width, height, original_ext, source_id,"
                " meta, hidden, created_at) VALUES (1, 'ab', 'cd', 512, 512, 'png', 1, '{}', FALSE,"
                " '2026-01-01')",
                "INSERT INTO rating (user_id, image_id, stars, created_at, updated_at)"
                " VALUES (1, 1, 4, '2026-01-01', '2026-01-01')",
            ):
                connection.exec_driver_sql(statement)
        upgrade(directory=MIGRATIONS)
        assert db.session.scalar(db.select(Rating.stars)) == 4
        assert db.session.scalar(db.select(Source.position)) == 0


def test_processes_starting_at_once_migrate_one_at_a_time(tmp_path):
    """The web and its workers start together on an empty database (Compose, or a worker
    beside `python app.py`): one migrates, the others wait and find it done."""
    url = os.environ.get("TASTEBUD_DATABASE_URL") or f"sqlite:///{tmp_path / 'shared.db'}"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", "from app import create_app; create_app()"],
            cwd=ROOT,
            env={
                **os.environ,
                "TASTEBUD_DATABASE_URL": url,
                "TASTEBUD_INSTANCE_PATH": str(tmp_path / f"process{n}"),
                "TASTEBUD_SECRET_KEY": "test",
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    errors = [process.communicate(timeout=120)[1] for process in starts]
    assert [process.returncode for process in starts] == [0] * 4, "\n".join(errors)[-3000:]
    app = create_app({"SECRET_KEY": "test", "DATABASE_URL": url}, instance_path=str(tmp_path))
    with app.app_context(), db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
    with app.app_context():
        db.engine.dispose()
