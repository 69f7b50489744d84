"""A refused form says what to fix where the person can see it, and keeps what they typed.

The live server, the browser and the helpers come from test_browser.py; this module gets a
site of its own.
"""

from __future__ import annotations

import pytest
import test_browser as e2e

pytestmark = pytest.mark.browser

live_server = e2e.live_server
browser = e2e.browser
page = e2e.page
expect = e2e.expect


@pytest.fixture(scope="module")
def screenshots():
    """Return the screenshot folder, emptied of this module's earlier shot (31-)."""
    e2e.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in e2e.SCREENSHOTS.glob("31-*.png"):
        old.unlink()
    return e2e.SCREENSHOTS


def test_a_refused_url_list_is_explained_in_view_and_the_list_stays(page, screenshots, tmp_path):
    e2e.register_first_account(page, tmp_path, "ada")
    e2e.go_to(page, "Admin", "/admin/")
    page.locator("summary", has_text="URL list").click()
    pasted = "not a url\nhttps://example.com/a.jpg"
    box = page.locator("textarea[name=urls]")
    box.fill(pasted)
    box.scroll_into_view_if_needed()
    page.get_by_role("button", name="Import the URLs").click()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("Please check what you entered.")
    expect(notice).to_contain_text("Only http and https addresses can be imported; not: not a url")
    expect(notice).to_contain_text("what you typed is still in the form")
    expect(notice).not_to_contain_text("Reload the page")  # reloading would lose the list
    expect(notice).to_be_in_viewport(ratio=1)  # scrolled to, not left above the fold...
    header = page.locator("header.topbar").bounding_box()
    assert notice.bounding_box()["y"] >= header["y"] + header["height"]  # ...nor under the bar
    expect(box).to_have_value(pasted)
    e2e.shoot(page, screenshots, "31-admin-url-list-refused")
