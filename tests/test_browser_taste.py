"""End-to-end "Train my taste" in Chromium: the button, the phases' progress bars, the results.

The live server, the browser, the tab and the problem collector come from test_browser.py; the
server is module-scoped, so this module gets a fresh site of its own, with tiny trainer settings.
"""

from __future__ import annotations

import itertools
import time

import pytest
import test_browser as e2e
from sqlalchemy import select
from test_taste import TINY

from rating.models import Image, Rating, User, db

pytestmark = pytest.mark.browser

live_server = e2e.live_server
browser = e2e.browser
page = e2e.page
problems = e2e.problems
arrive, go_to, shoot = e2e.arrive, e2e.go_to, e2e.shoot
expect = e2e.expect

POOL = 36
# A LoRA a little longer than the API tests', so the page sees its bar move.
LIVE_SERVER_CONFIG = {**TINY, "TASTE_LORA": {**TINY["TASTE_LORA"], "steps": 12, "eval_every": 6}}
JOB_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def screenshots():
    """Return the screenshot folder, emptied of this module's earlier shots (20- to 24-) only."""
    e2e.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in itertools.chain(*(e2e.SCREENSHOTS.glob(f"{n}-*.png") for n in range(20, 25))):
        old.unlink()
    return e2e.SCREENSHOTS


def rate_in_database(app, username: str, count: int) -> None:
    """Give `username` `count` ratings straight in the database (the rating UI has its own test)."""
    with app.app_context():
        user = db.session.scalar(select(User).where(User.username == username))
        ids = db.session.scalars(select(Image.id).order_by(Image.id).limit(count)).all()
        db.session.add_all(Rating(user_id=user.id, image_id=i, stars=1 + (i * 7) % 5) for i in ids)
        db.session.commit()


READ_WIDGET = """() => {
  const job = document.querySelector("#taste-job .taste-job");
  const bar = document.querySelector(".phase-running progress");
  return [job && job.dataset.status, job && job.dataset.phase, bar && bar.getAttribute("value")];
}"""


def watch_progress(page, timeout_s: float) -> set[tuple[str, str]]:
    """Read the running phase's bar each time htmx swaps the widget, until the job ends."""
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # one read of the page, in the page: htmx may swap the widget between two locator calls
        status, phase, value = page.evaluate(READ_WIDGET)
        if status in ("succeeded", "failed", "cancelled"):
            return seen
        if value is not None:
            seen.add((phase, value))
        page.wait_for_timeout(200)  # between reads of the page; the page polls on its own
    pytest.fail("the training did not end in time")


def test_train_my_taste_in_the_browser(page, problems, live_server, screenshots, tmp_path):
    """The button is disabled with its reason, then trains live; the results grid shows."""
    e2e.register_first_account(page, tmp_path, "ada")
    e2e.load_demo_pack(page, tmp_path, POOL)

    go_to(page, "My taste", "/taste/")
    button = page.get_by_role("button", name="Train my taste")
    expect(button).to_be_disabled()
    expect(page.locator("#train-reason")).to_contain_text(
        "Rate or compare at least 30 images first — you have 0 ratings and picks."
    )
    shoot(page, screenshots, "20-taste-disabled")

    rate_in_database(live_server.app, "ada", 32)
    page.reload()
    expect(button).to_be_enabled()
    expect(page.locator(".badge.demo").first).to_have_text("demo model")
    button.click()
    job = page.locator("#taste-job .taste-job")
    training = page.locator("#train-button")  # says it is busy, and can't start a second run
    expect(training).to_have_text("Training…")
    expect(training).to_be_disabled()
    expect(page.locator("#train-reason")).to_have_text(
        "Your taste is training now — its progress is below."
    )
    expect(job.locator(".phase-running progress")).to_be_visible(timeout=JOB_TIMEOUT_MS)
    expect(job.locator(".phase-running .steps")).to_be_visible(timeout=JOB_TIMEOUT_MS)
    page.screenshot(path=str(screenshots / "21-taste-training.png"), full_page=True)

    seen = watch_progress(page, JOB_TIMEOUT_MS / 1000)
    assert len(seen) >= 2, f"the bar never moved: {seen}"
    expect(job).to_have_attribute("data-status", "succeeded")
    expect(job.locator('[data-state="done"]')).to_have_count(4)
    expect(training).to_have_text("Train my taste")
    expect(training).to_be_enabled()
    expect(page.locator("#train-reason")).to_contain_text("Uses your 32 ratings and picks")

    # The page refreshed its results when the job ended: the grid, every image with a score.
    grid = page.locator("#taste-results .taste-grid")
    expect(grid).to_be_visible()
    cells = TINY["TASTE_GRID_PROMPTS"] * TINY["TASTE_GRID_SEEDS"] * 4
    expect(grid.locator("figure.cell img")).to_have_count(cells)
    expect(grid.locator("figure.cell figcaption")).to_contain_text(["score"] * cells)
    expect(page.locator("#history tr[id^=version-]")).to_have_count(1)
    shoot(page, screenshots, "22-taste-results")

    page.locator("#latest-version").get_by_role("link", name="open").click()
    expect(page.locator("h1")).to_have_text("Taste version 1")
    page.get_by_role("button", name="Make public").click()
    expect(page.locator("#share")).to_contain_text("Anyone with this link")
    link = page.locator("#share input.share-link").input_value()
    assert "/taste/shared/" in link and "/versions/" not in link
    page.evaluate("window.scrollTo(0, 0)")  # the sticky top bar would show mid-page
    shoot(page, screenshots, "23-taste-version")

    page.locator(".guesses .strip a").first.click()
    page.get_by_role("button", name="Improve this image").click()
    refine = page.locator("#refine-job .refine-job")
    expect(refine).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    expect(refine.locator(".before-after img")).to_have_count(3)  # the original, before, after
    original = refine.locator("figure.original img")
    expect(original).to_have_js_property("complete", True)
    assert original.evaluate("img => img.naturalWidth") > 0  # the picture itself, loaded
    shoot(page, screenshots, "24-taste-improve-image")

    assert not problems, "\n".join(problems)
