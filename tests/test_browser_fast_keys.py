"""A key pressed the instant a new card lands rates through htmx, never by leaving the page.

htmx wires a swapped-in card only when it settles; keys.js wires it itself before pressing,
so a fast rater's next key (here: a settle delay stretched to two seconds, so the press
certainly comes first) posts through htmx and the page stays. The live server, the browser
and the helpers come from test_browser.py; this module gets a site of its own.
"""

from __future__ import annotations

import pytest
import test_browser as e2e

pytestmark = pytest.mark.browser

live_server = e2e.live_server
browser = e2e.browser
page = e2e.page
expect = e2e.expect

SLOW_SETTLE = "htmx.config.defaultSettleDelay = 2000; window.stayed = true;"


def test_a_key_pressed_before_the_new_card_settles_stays_on_the_page(page, live_server, tmp_path):
    e2e.register_first_account(page, tmp_path, "ada")
    e2e.load_demo_pack(page, tmp_path, e2e.DEMO_COUNT)
    page.evaluate(SLOW_SETTLE)
    card = page.locator("#rate-card")
    for rated, key in enumerate("3452", start=1):
        page.keyboard.press(key)  # each press lands on a card swapped in but not settled yet
        expect(card).to_have_attribute("data-rated", str(rated))
    expect(card.locator(".count")).to_contain_text("4 rated")
    assert page.evaluate("window.stayed === true"), "a key press posted natively and left"

    e2e.go_to(page, "Compare", "/pairs")
    page.evaluate(SLOW_SETTLE)
    pairs = page.locator("#pair-card")
    for picks, key in enumerate(["ArrowLeft", "ArrowRight", "ArrowDown"], start=1):
        page.keyboard.press(key)
        expect(pairs).to_have_attribute("data-picks", str(picks))
    assert page.evaluate("window.stayed === true"), "a pick posted natively and left"
