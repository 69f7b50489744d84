"""While the database can't be reached, every request gets the site's own clear, retryable
answer (not a bare 500 from the server), and the site recovers by itself when it is back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rating.models import Rating, db
from tests.test_rating import card, rate

pytestmark = pytest.mark.sqlite  # it takes the SQLite file away (PostgreSQL: test_scale.py)


@pytest.fixture
def database_away(app):
    """Return a function that takes the SQLite database away (until the block ends)."""
    database = Path(app.instance_path) / "tastebud.db"
    hidden = database.with_name("hidden.db")

    def take_away() -> None:
        with app.app_context():
            db.engine.dispose()  # no pooled connection survives: each new one must open the file
        os.rename(database, hidden)
        database.mkdir()  # a directory where the file was: "unable to open database file"

    def bring_back() -> None:
        database.rmdir()
        os.rename(hidden, database)

    yield take_away, bring_back
    if hidden.exists():
        bring_back()


def test_a_page_and_a_rating_while_the_database_is_away_get_a_retryable_answer(
    app, admin_site, client, database_away
):
    take_away, bring_back = database_away
    state = card(client.get("/rate"))
    state = rate(admin_site, state, 4)  # one rating acknowledged before the outage
    take_away()

    page = client.get("/rate")
    html = page.get_data(as_text=True)
    assert page.status_code == 503 and page.headers["Retry-After"] == "5"
    assert "The database can" in html and "Try again in a moment" in html
    assert "Sign out" not in html  # the page itself never asked the database who is signed in

    answer = admin_site.client.post(
        f"/rate/{state['image']}",
        data={"stars": 5, "csrf_token": admin_site.token()},
        headers={"HX-Request": "true"},
    )
    fragment = answer.get_data(as_text=True)
    assert answer.status_code == 503 and answer.headers["HX-Retarget"] == "#notice"
    assert "already confirmed is kept" in fragment and "<html" not in fragment

    bring_back()
    again = card(client.get("/rate"))  # recovered by itself, and still signed in
    assert again["rated"] == 1
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Rating.id))) == 1
