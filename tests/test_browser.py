"""End-to-end tests: the real server (waitress + job worker) driven by headless Chromium."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import func, select

from app import create_app
from rating import jobs
from rating.models import Comparison, Image, Rating, User, db
from tests.serving import serving

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # the `browser` fixture skips (or fails on CI) with the reason
    Page = expect = sync_playwright = None

pytestmark = pytest.mark.browser
log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
TIMEOUT_MS = 15_000  # one page load or one htmx swap
JOB_TIMEOUT_MS = 120_000  # the demo pack job, from queued to succeeded
DEMO_COUNT = 24
PASSWORD = "correct horse battery"
ALL_IMAGES_LOADED = "() => [...document.images].every((img) => img.complete && img.naturalWidth)"


@dataclass
class LiveServer:
    """The app under test and the address it is served at."""

    app: Flask
    url: str


def _missing_browser() -> str | None:
    """Say what is missing to run Chromium through Playwright, or None when all is there."""
    if sync_playwright is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def live_server(request, tmp_path_factory):
    """Serve a fresh site on a free 127.0.0.1 port with waitress, its job worker running.

    A test module may set LIVE_SERVER_CONFIG (a dict) to add settings of its own.
    """
    instance = tmp_path_factory.mktemp("browser-site") / "instance"
    app = create_app(
        {
            "SECRET_KEY": "browser-test",
            "QUEUE": "sqlite",  # the real queue, so the job widget polls a job that really runs
            "REDIS_URL": "",
            "DATABASE_URL": "",  # never a database named by a TASTEBUD_* variable
            "STORAGE_ROOT": "",
            "DEMO_PACK_SIZE": DEMO_COUNT,
            **getattr(request.module, "LIVE_SERVER_CONFIG", {}),
        },
        instance_path=str(instance),
    )
    consumer = jobs.start_embedded_worker(app)
    with serving(app) as url:
        yield LiveServer(app, url)
    consumer.stop(graceful=True)
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="module")
def browser():
    """Launch headless Chromium; skip when it is missing, but fail on CI, which must run these."""
    missing = _missing_browser()
    if missing:
        if "CI" in os.environ:
            pytest.fail(f"browser tests cannot run on CI: {missing}", pytrace=False)
        pytest.skip(missing)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots():
    """Return the folder for screenshots, emptied of an earlier run's."""
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    return SCREENSHOTS


@pytest.fixture
def page(browser, live_server):
    """Open a tab with its own cookies on the live server."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    yield tab
    context.close()


@pytest.fixture
def problems(page):
    """Collect every failed response, failed request, page error and console error of the tab."""
    found: list[str] = []

    def note(problem: str) -> None:
        found.append(problem)
        log.error("%s", problem)  # shown with a failure that happens before the final check

    def on_response(response):
        if response.status >= 400:
            note(f"HTTP {response.status} {response.request.method} {response.url}")

    def on_request_failed(request):
        if request.failure != "net::ERR_ABORTED":  # a load cut short by navigation is no fault
            note(f"request failed ({request.failure}): {request.method} {request.url}")

    def on_console(message):
        if message.type == "error":
            note(f"console error at {message.location.get('url')}: {message.text}")

    page.on("response", on_response)
    page.on("requestfailed", on_request_failed)
    page.on("pageerror", lambda error: note(f"page error: {error}"))
    page.on("console", on_console)
    return found


def shoot(page: Page, folder: Path, name: str) -> None:
    """Wait until every image on the page has loaded, then save a full-page screenshot."""
    page.wait_for_function(ALL_IMAGES_LOADED, timeout=TIMEOUT_MS)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def arrive(page: Page, path: str) -> None:
    """Wait until the page at `path` has loaded, scripts (htmx, keys.js) included."""
    expect(page).to_have_url(re.compile(re.escape(path) + "$"))
    page.wait_for_load_state("load")  # a key pressed before keys.js runs would be lost


def go_to(page: Page, link: str, path: str) -> None:
    """Follow a link in the top bar and wait for its page."""
    page.locator("header.topbar nav").get_by_role("link", name=link, exact=True).click()
    arrive(page, path)


def register_first_account(page: Page, folder: Path, username: str) -> None:
    """Register from the start page; the first account on a site becomes the admin."""
    page.goto("/")
    expect(page.locator(".hero h1")).to_contain_text("Rate images")
    shoot(page, folder, "01-home")
    page.locator(".hero").get_by_role("link", name="Create an account").click()
    arrive(page, "/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat password").fill(PASSWORD)
    shoot(page, folder, "02-register")
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#notice")).to_contain_text(f"Welcome, {username}! You are the admin.")
    expect(page.locator("header .who")).to_have_text(username)


def load_demo_pack(page: Page, folder: Path, count: int) -> None:
    """Queue the demo pack from the admin page and wait for its job widget to say succeeded."""
    go_to(page, "Admin", "/admin/")
    page.locator("input[name=count]").fill(str(count))
    page.get_by_role("button", name="Load the demo pack").click()
    job = page.locator("#demo-jobs .job")
    expect(job).to_have_count(1)
    expect(job).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    expect(job.locator(".status-succeeded")).to_have_text("succeeded")
    expect(job.locator(".message")).to_have_text(f"Added {count} demo images")
    expect(page.locator("#sources")).to_contain_text(f"Demo pack, images 1–{count}")
    shoot(page, folder, "03-admin-job-succeeded")
    job.get_by_role("link", name="Start rating").click()
    arrive(page, "/rate")


def shown_image(page: Page) -> str:
    """Return the id of the image on the rating card."""
    return page.locator("#rate-card figure.stage").get_attribute("data-image-id")


def press_and_wait(page: Page, key: str, rated: int, leaving: str) -> str:
    """Press a key on the rate page and wait for a new image with `rated` ratings; return it."""
    page.keyboard.press(key)
    expect(page.locator("#rate-card")).to_have_attribute("data-rated", str(rated))
    expect(page.locator("#rate-card figure.stage")).not_to_have_attribute("data-image-id", leaving)
    expect(page.locator("#rate-card .count")).to_contain_text(f"{rated} rated")
    return shown_image(page)


def pick_pairs(page: Page, keys: list[str]) -> list[tuple[int, int]]:
    """Pick on /pairs with the keys given, waiting for each new pair; return the pairs shown."""
    card = page.locator("#pair-card")
    shown = []
    for done, key in enumerate(keys, start=1):
        a, b = re.search(r"/pairs/(\d+)/(\d+)$", card.get_attribute("hx-post")).groups()
        shown.append((int(a), int(b)))
        page.keyboard.press(key)
        expect(card).to_have_attribute("data-picks", str(done))
        expect(card.locator(".count")).to_have_text(f"{done} pick{'' if done == 1 else 's'}")
    return shown


def test_rate_compare_and_review_by_keyboard(page, problems, live_server, screenshots):
    """Register, load the demo pack, rate, skip, undo and compare by keyboard, then review."""
    register_first_account(page, screenshots, "ada")
    load_demo_pack(page, screenshots, DEMO_COUNT)

    # Rate page: skipping (S) shows another image and rates nothing.
    card = page.locator("#rate-card")
    expect(card).to_have_attribute("data-rated", "0")
    first = shown_image(page)
    current = press_and_wait(page, "s", rated=0, leaving=first)

    # Rate ten images with the keys 1-5; each press shows an image not rated yet.
    stars = [3, 5, 1, 4, 2, 5, 4, 3, 1, 2]
    rated: dict[int, int] = {}
    for done, n in enumerate(stars, start=1):
        rated[int(current)] = n
        current = press_and_wait(page, str(n), rated=done, leaving=current)
        assert int(current) not in rated and current != first

    # Undo (U) takes the last rating back and shows that image again, unrated.
    last = list(rated)[-1]
    given = rated.pop(last)
    page.keyboard.press("u")
    expect(card).to_have_attribute("data-rated", "9")
    expect(card.locator("figure.stage")).to_have_attribute("data-image-id", str(last))
    said = f"you had given it {given} star{'s' if given != 1 else ''}"
    expect(card.locator(".notice")).to_have_text(f"Undone ({said}) — rate it again.")
    expect(card.locator(".star.on")).to_have_count(0)
    shoot(page, screenshots, "04-rate")

    # Skipping with the right arrow works too, and keeps the count.
    press_and_wait(page, "ArrowRight", rated=9, leaving=str(last))

    # Pairs: left, right, about the same, left, right.
    go_to(page, "Compare", "/pairs")
    expect(page.locator("#pair-card")).to_have_attribute("data-picks", "0")
    keys = ["ArrowLeft", "ArrowRight", "ArrowDown", "ArrowLeft", "ArrowRight"]
    pairs = pick_pairs(page, keys)
    shoot(page, screenshots, "05-pairs")

    # My ratings: the counts, the histogram and the tiles match what was pressed.
    go_to(page, "My ratings", "/me/ratings")
    expect(page.locator("#count-ratings")).to_have_text("9")
    expect(page.locator("#count-picks")).to_have_text("5")
    per_star = Counter(rated.values())
    bars = page.locator(".histogram a")
    numbers = {
        int(bar.get_attribute("data-stars")): int(bar.locator(".num").inner_text())
        for bar in bars.all()
    }
    assert numbers == {n: per_star[n] for n in range(1, 6)}
    assert sum(numbers.values()) == 9
    tiles = page.locator(".grid .tile")
    expect(tiles).to_have_count(9)
    shown_stars = {
        int(tile.get_attribute("id").removeprefix("tile-")): int(tile.get_attribute("data-stars"))
        for tile in tiles.all()
    }
    assert shown_stars == rated
    shoot(page, screenshots, "06-my-ratings")

    # Crowd: one rater so far, with everything above.
    go_to(page, "Crowd", "/crowd")
    stats = page.locator(".stats .stat b")
    expect(stats).to_have_text([str(DEMO_COUNT), "1", "9", "5"])
    shoot(page, screenshots, "07-crowd")

    # Home, signed in: the pool and my count.
    page.locator("header .brand").click()
    arrive(page, "/")
    expect(page.locator(".lead")).to_have_text(
        f"{DEMO_COUNT} images in the pool; you have rated 9."
    )
    shoot(page, screenshots, "08-home-signed-in")

    # The database holds exactly what the pages said.
    with live_server.app.app_context():
        user = db.session.scalar(select(User).where(User.username == "ada"))
        assert user.is_admin
        assert db.session.scalar(select(func.count(Image.id))) == DEMO_COUNT
        saved = db.session.execute(
            select(Rating.image_id, Rating.stars).where(Rating.user_id == user.id)
        ).all()
        assert dict(saved) == rated
        picks = db.session.execute(
            select(Comparison.image_a_id, Comparison.image_b_id, Comparison.outcome)
            .where(Comparison.user_id == user.id)
            .order_by(Comparison.id)
        ).all()
        outcomes = {"ArrowLeft": "a", "ArrowRight": "b", "ArrowDown": "tie"}
        assert [tuple(row) for row in picks] == [
            (a, b, outcomes[key]) for (a, b), key in zip(pairs, keys, strict=True)
        ]

    assert not problems, "\n".join(problems)
