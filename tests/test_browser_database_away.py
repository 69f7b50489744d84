"""Rating in Chromium while the database goes away and comes back: the key press gets the
site's notice, the card stays on screen, and the next press after the database is back rates.

The live server, the browser and the helpers come from test_browser.py; this module gets a
site of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import test_browser as e2e

from rating.models import db

pytestmark = [pytest.mark.browser, pytest.mark.sqlite]

live_server = e2e.live_server
browser = e2e.browser
page = e2e.page
arrive, shoot, expect = e2e.arrive, e2e.shoot, e2e.expect


@pytest.fixture(scope="module")
def screenshots():
    """Return the screenshot folder, emptied of this module's earlier shots (29- and 30-)."""
    e2e.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for n in (29, 30):
        for old in e2e.SCREENSHOTS.glob(f"{n}-*.png"):
            old.unlink()
    return e2e.SCREENSHOTS


def test_a_key_press_while_the_database_is_away_keeps_the_card(
    page, live_server, screenshots, tmp_path
):
    e2e.register_first_account(page, tmp_path, "ada")
    e2e.load_demo_pack(page, tmp_path, e2e.DEMO_COUNT)
    first = e2e.shown_image(page)
    current = e2e.press_and_wait(page, "3", rated=1, leaving=first)

    database = Path(live_server.app.instance_path) / "tastebud.db"
    hidden = database.with_name("hidden.db")
    with live_server.app.app_context():
        db.engine.dispose()
    os.rename(database, hidden)
    database.mkdir()  # "unable to open database file" for every new connection
    try:
        page.keyboard.press("4")
        notice = page.locator("#notice")
        expect(notice).to_contain_text("The database can't be reached right now.")
        expect(notice).to_contain_text("Try again in a moment")
        expect(page.locator("#rate-card figure.stage")).to_have_attribute(
            "data-image-id", current
        )  # the card stays: the person presses again once it is back
        expect(page.locator("#rate-card")).to_have_attribute("data-rated", "1")
        shoot(page, screenshots, "29-rate-database-away")
        page.goto("/rate")  # a whole page gets the site's own page, not a bare error
        expect(page.locator("h2")).to_contain_text("The database can't be reached right now.")
        shoot(page, screenshots, "30-page-database-away")
    finally:
        database.rmdir()
        os.rename(hidden, database)

    page.goto("/rate")
    arrive(page, "/rate")
    shown = e2e.shown_image(page)
    e2e.press_and_wait(page, "4", rated=2, leaving=shown)
