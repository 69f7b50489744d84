"""End-to-end admin tests: import a server folder, hide images, allow and use uploads, in Chromium.

The live server, the browser, the tab and the problem collector come from test_browser.py; the
server is module-scoped, so this module gets a fresh site and the first account here is admin.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import test_browser as e2e
from images import encode, picture
from sqlalchemy import func, select

from rating.models import Image, Source, db, site_setting
from rating.store import perceptual_hash

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

# The shared fixtures, bound here so that pytest finds them for this module.
live_server = e2e.live_server  # module-scoped: this module gets a fresh site of its own
browser = e2e.browser
page = e2e.page
problems = e2e.problems
arrive, go_to, shoot = e2e.arrive, e2e.go_to, e2e.shoot
expect = e2e.expect  # None without playwright; the browser fixture then skips (or fails on CI)

FOLDER_FILES = {  # in the order the import walks them (sorted paths)
    "a.png": encode(picture(1)),
    "b.jpg": encode(picture(2), "JPEG", quality=92),
    "broken.png": encode(picture(7))[:300],  # cut short: Pillow cannot read it
    "c.webp": encode(picture(3), "WEBP"),
    "copy-of-a.png": encode(picture(1)),  # the same bytes as a.png: an exact duplicate
    "sub/d.png": encode(picture(4)),
    "sub/deeper/e.gif": encode(picture(5).convert("P")),
    "sub/f.jpg": encode(picture(6), "JPEG", quality=90),
}
DISTINCT_SEEDS = (1, 2, 3, 4, 5, 6)  # the six readable, different pictures above
# found 8 · added 6 · duplicates 1 (copy-of-a.png) · near-duplicates 0 · failed 1 (broken.png)
FOLDER_TALLY = ["8", "6", "1", "0", "1"]
UPLOADS = [
    {"name": "new.png", "mimeType": "image/png", "buffer": encode(picture(8))},
    {"name": "tiny.png", "mimeType": "image/png", "buffer": encode(picture(9, (64, 64)))},
]
UPLOAD_TALLY = ["2", "1", "0", "0", "1"]  # new.png added; tiny.png under the 256 px minimum


@pytest.fixture(scope="module")
def screenshots():
    """Return the screenshot folder, emptied of this module's earlier shots (10- to 12-) only."""
    e2e.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in itertools.chain(*(e2e.SCREENSHOTS.glob(f"{n}-*.png") for n in (10, 11, 12))):
        old.unlink()
    return e2e.SCREENSHOTS


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Write the folder to import: six pictures, one exact copy and one corrupt file."""
    root = tmp_path / "to-import"
    for name, data in FOLDER_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root.resolve()


def test_distinct_pictures_are_not_near_duplicates(live_server):
    """The folder's tally counts no near-duplicates: its six pictures are far apart."""
    limit = live_server.app.config["NEAR_DUPLICATE_DISTANCE"]
    hashes = [int(perceptual_hash(picture(seed)), 16) for seed in DISTINCT_SEEDS]
    distances = [(a ^ b).bit_count() for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > limit


def register_admin(page: Page, username: str) -> None:
    """Register the site's first account, which becomes the admin."""
    page.goto("/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(e2e.PASSWORD)
    page.get_by_label("Repeat password").fill(e2e.PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#notice")).to_contain_text(f"Welcome, {username}! You are the admin.")


def import_folder(page: Page, folder: Path, screenshots: Path) -> None:
    """Import `folder` from the admin page; see the tally, the failure and the new source row."""
    go_to(page, "Admin", "/admin/")
    expect(page.locator("#sources")).to_contain_text("No images yet.")
    page.evaluate("window.stayed = true")  # gone if anything below reloads the page

    page.locator("summary", has_text="Folder on the server").click()
    page.get_by_label("Full path (searched recursively for jpg, png, webp, gif)").fill(str(folder))
    page.get_by_role("button", name="Import the folder").click()

    job = page.locator("#import-jobs .job")
    expect(job).to_have_count(1)
    expect(job).to_have_attribute("data-status", "succeeded", timeout=e2e.JOB_TIMEOUT_MS)
    expect(job.locator(".status-succeeded")).to_have_text("succeeded")
    expect(job.locator(".tally b")).to_have_text(FOLDER_TALLY)
    expect(job.locator("progress")).to_have_attribute("value", "8")

    failures = job.locator("details.failures")
    expect(failures.locator("summary")).to_have_text("1 failed — why")
    expect(failures.locator("table")).not_to_be_visible()
    failures.locator("summary").click()
    row = failures.locator("tr")
    expect(row).to_have_count(1)
    expect(row.locator("td")).to_have_text(["broken.png", re.compile(r"^not a readable image: ")])

    # The sources table refreshed itself when the job ended (htmx: job-finished), no reload.
    source_row = page.locator("#sources tr", has=page.get_by_role("link", name=f"Folder {folder}"))
    expect(source_row.locator("td")).to_have_text(
        [f"Folder {folder}", "folder", "6", "0", re.compile(r" UTC$"), "Resume"]
    )
    assert page.evaluate("window.stayed === true"), "the admin page was reloaded"
    shoot(page, screenshots, "10-admin-folder-import")


def hide_and_show(page: Page, folder: Path, screenshots: Path, live_server) -> None:
    """Open the folder's source page; hide an image (it dims), then put it back."""
    page.locator("#sources").get_by_role("link", name=f"Folder {folder}").click()
    arrive(page, "/admin/pool/sources/1")
    expect(page.locator("main h1")).to_have_text(f"Folder {folder}")
    expect(page.locator("main .panel > p.muted")).to_contain_text("folder · added ")
    expect(page.locator("main .panel > p.muted")).to_contain_text(" · 6 images")
    expect(page.locator(".grid .tile")).to_have_count(6)
    first = page.locator(".grid .tile").first.get_attribute("action")
    image_id = int(re.search(r"/images/(\d+)/hidden$", first).group(1))
    tile = page.locator(f'.grid .tile[action="{first}"]')  # the same tile after each swap
    expect(tile.locator("img")).to_have_css("opacity", "1")

    tile.get_by_role("button", name="Hide").click()
    expect(tile).to_have_class(re.compile(r"\bhidden-image\b"))
    expect(tile.get_by_role("button")).to_have_text("Show")
    expect(tile.get_by_role("button")).to_have_attribute("title", "Put back in the pool")
    expect(tile.locator("img")).to_have_css("opacity", "0.3")
    with live_server.app.app_context():
        assert db.session.get(Image, image_id).hidden
    page.mouse.move(0, 0)  # no hover look on the button just clicked
    shoot(page, screenshots, "11-source-page")

    tile.get_by_role("button", name="Show").click()
    expect(tile).not_to_have_class(re.compile(r"\bhidden-image\b"))
    expect(tile.get_by_role("button")).to_have_text("Hide")
    expect(tile.locator("img")).to_have_css("opacity", "1")
    with live_server.app.app_context():
        assert not db.session.get(Image, image_id).hidden


def allow_uploads(page: Page) -> None:
    """Turn uploads on in the admin settings; the Upload link appears in the top bar."""
    page.get_by_role("link", name="← Admin").click()
    arrive(page, "/admin/")
    nav = page.locator("header.topbar nav")
    expect(nav.get_by_role("link", name="Upload", exact=True)).to_have_count(0)
    allow = page.get_by_label("Signed-in people may upload images")
    expect(allow).not_to_be_checked()
    allow.check()
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#notice")).to_have_text("Settings saved.")
    expect(page.get_by_label("Signed-in people may upload images")).to_be_checked()
    expect(nav.get_by_role("link", name="Upload", exact=True)).to_be_visible()


def upload_two(page: Page, screenshots: Path) -> None:
    """Upload one new picture and one too small; the job's report says what happened to each."""
    go_to(page, "Upload", "/upload")
    form = page.locator("main form")
    form.locator("input[name=files]").set_input_files(UPLOADS)
    form.get_by_role("button", name="Upload").click()
    report = page.locator("#upload-report .job")
    expect(report).to_have_attribute("data-status", "succeeded", timeout=e2e.JOB_TIMEOUT_MS)
    expect(report.locator(".tally b")).to_have_text(UPLOAD_TALLY)
    report.locator("details.failures summary").click()
    expect(report.locator("tr td")).to_have_text(
        ["tiny.png", "too small: 64×64, the shorter side must be ≥ 256 px"]
    )
    expect(report.get_by_role("link", name="Rate them")).to_be_visible()
    shoot(page, screenshots, "12-upload-report")


def test_import_hide_and_upload_as_admin(page, problems, live_server, screenshots, image_folder):
    """Import a folder, read its report, hide and show an image, allow uploads and upload."""
    register_admin(page, "grace")
    import_folder(page, image_folder, screenshots)
    hide_and_show(page, image_folder, screenshots, live_server)
    allow_uploads(page)
    upload_two(page, screenshots)

    with live_server.app.app_context():
        assert site_setting("allow_uploads")
        assert db.session.scalar(select(func.count(Image.id))) == 7
        assert db.session.scalar(select(func.count(Image.id)).where(Image.hidden)) == 0
        kinds = db.session.scalars(select(Source.kind).order_by(Source.id)).all()
        assert kinds == ["folder", "upload"]

    assert not problems, "\n".join(problems)
