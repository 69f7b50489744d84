"""Writers on SQLite take turns on a lock file shared by every process, and wake as soon as
the writer before them is done (rating.database.write_turn)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from rating.models import Image, Rating, db
from rating.ratings import save_rating

HOLDER = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the lock file is POSIX flock")
def test_a_rating_waits_for_another_process_writing_then_is_stored(app, admin_site, on_services):
    if on_services is not None:
        pytest.skip("PostgreSQL queues its writers itself")
    with app.app_context():
        lock_file = f"{db.engine.url.database}.write-lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:  # closes its pipes
        try:
            assert holder.stdout.readline().strip() == "held"  # another process is writing

            def rate():
                with app.app_context():
                    save_rating(1, 1, 4)

            writer = threading.Thread(target=rate)
            writer.start()
            writer.join(timeout=0.5)
            assert writer.is_alive()  # waiting its turn, not writing beside the other process
            holder.stdin.write("done\n")
            holder.stdin.flush()
            writer.join(timeout=10)
            assert not writer.is_alive()
        finally:
            holder.kill()
    with app.app_context():
        stored = db.session.scalar(db.select(Rating.stars).where(Rating.image_id == 1))
    assert stored == 4


def test_rating_a_hidden_image_stores_nothing(app, admin_site):
    with app.app_context():
        db.session.get(Image, 2).hidden = True
        db.session.commit()
        assert save_rating(1, 2, 5) is False
        assert save_rating(1, 3, 5) is True
        assert save_rating(1, 9999, 5) is False
        rated = db.session.scalars(db.select(Rating.image_id).where(Rating.user_id == 1)).all()
    assert rated == [3]
