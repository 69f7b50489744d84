"""A synthetic rater taking a version's blind check through HTTP, seeing only what a person sees."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.conftest import Site

ACTION = re.compile(r'hx-post="(/taste/versions/\d+/blind/(\d+))"')
RECORD = re.compile(r'data-rate="([\d.]+)" data-low="([\d.]+)"')
WON = re.compile(r"in <b>([\d.]+) of (\d+)</b>")


def fetched(site: Site, url: str) -> bytes:
    """GET a file's bytes, closing the response (a sent file stays open until then)."""
    with site.client.get(url) as response:
        return response.get_data()


def take_blind_check(site: Site, number: int, liking: Callable[[bytes], float]) -> dict:
    """Judge every pair by `liking` (higher is better) on the two pictures as served, left and
    right; return the page's verdict: won, answered, rate and the interval's low end."""
    card = site.client.get(f"/taste/versions/{number}/blind/").get_data(as_text=True)
    for _ in range(1000):  # at most one round per pair; a check has far fewer
        found = ACTION.search(card)
        if found is None:
            break
        url, index = found.groups()
        left, right = (liking(fetched(site, f"{url}/{side}.png")) for side in ("left", "right"))
        outcome = "a" if left > right else "b" if right > left else "tie"
        card = site.post(url, {"outcome": outcome}, htmx=True).get_data(as_text=True)
    rate, low = RECORD.search(card).groups()
    won, answered = WON.search(card).groups()
    return {"won": float(won), "answered": int(answered), "rate": float(rate), "low": float(low)}
