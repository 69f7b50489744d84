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
from rating.models import Rating, Source, TasteVersion, User, db

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


def test_version_numbers_become_unique_and_remember_deleted_ones(tmp_path):
    """0008: a duplicate number (never expected) moves past the owner's highest, and each
    person's counter starts past their newest version, deleted or not (its job still names it)."""
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "AUTO_MIGRATE": False}, instance_path=str(tmp_path)
    )
    with app.app_context():
        upgrade(directory=MIGRATIONS, revision="0007")
        with db.engine.begin() as connection:
            for user_id, name in ((1, "ada"), (2, "bob"), (3, "cy")):
                connection.exec_driver_sql(
                    'INSERT INTO "user" (id, username, password_hash, is_admin, disabled,'
                    f" created_at) VALUES ({user_id}, '{name}', 'x', FALSE, FALSE, '2026-01-01')"
                )
            # ada: 1, 2 and a second 2; bob: 1, and a 2 deleted since (only its job is left)
            for version_id, owner_id, number in ((1, 1, 1), (2, 1, 2), (3, 2, 1), (4, 1, 2)):
                connection.exec_driver_sql(
                    "INSERT INTO taste_version (id, owner_id, number, created_at, ratings_count,"
                    " picks_count, base_model, is_demo, metrics, public) VALUES"
                    f" ({version_id}, {owner_id}, {number}, '2026-01-01', 0, 0, 'demo', TRUE,"
                    " '{}', FALSE)"
                )
            jobs = ((1, '{"version_id": 1}'), (1, '{"version_id": 2}'), (2, '{"version_id": 3}'))
            jobs += ((1, '{"version_id": 4}'), (2, '{"version_id": 5}'), (2, "{}"))
            for owner_id, params in jobs:
                connection.exec_driver_sql(
                    "INSERT INTO job (owner_id, kind, status, progress, total, message, params,"
                    " result, stop_requested, phase, log, created_at) VALUES"
                    f" ({owner_id}, 'train_taste', 'succeeded', 0, 0, '', '{params}', '{{}}',"
                    " FALSE, '', '', '2026-01-01')"
                )
        upgrade(directory=MIGRATIONS)
        numbers = db.session.execute(db.select(TasteVersion.id, TasteVersion.number)).all()
        assert dict(numbers) == {1: 1, 2: 2, 3: 1, 4: 3}  # the older 2 keeps its number
        counters = db.session.execute(db.select(User.username, User.last_taste_number)).all()
        assert dict(counters) == {"ada": 3, "bob": 2, "cy": 0}
