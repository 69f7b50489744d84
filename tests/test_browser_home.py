"""The start page in Chromium: an admin loads the demo pack from it, and it updates itself.

The live server, the browser, the tab and the problem collector come from test_browser.py; the
server is module-scoped, so this module gets a fresh, empty site of its own.
"""

from __future__ import annotations

import pytest
import test_browser as e2e

pytestmark = pytest.mark.browser
live_server = e2e.live_server
browser = e2e.browser
page = e2e.page
problems = e2e.problems
expect = e2e.expect


def test_the_start_page_stops_saying_empty_once_the_demo_pack_is_in(
    page, problems, live_server, tmp_path
):
    e2e.register_first_account(page, tmp_path, "ada")
    page.goto("/")
    panel = page.locator("#home-panel")
    expect(panel).to_contain_text("The image pool is empty.")
    panel.locator("input[name=count]").fill("40")
    panel.get_by_role("button", name="Load the demo pack").click()
    # while it is made: the panel says so (asked again on the answer's job-started), with the bar
    expect(panel).to_contain_text("The demo pack is being made")
    expect(panel.locator("progress")).to_be_visible()
    expect(panel).not_to_contain_text("The image pool is empty.")
    e2e.shoot(page, e2e.SCREENSHOTS, "09-home-demo-pack-loading")
    expect(panel).to_contain_text("40 images in the pool; you have rated 0.", timeout=60_000)
    expect(panel).not_to_contain_text("The image pool is empty.")
    expect(panel.get_by_role("link", name="Rate images")).to_be_visible()
    e2e.shoot(page, e2e.SCREENSHOTS, "09-home-after-demo-pack")
    assert problems == []
