"""The civitai source: a query, its pages from GET /api/v1/images, and defensive item parsing."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

import requests

from rating.sources.fetch import FetchError, FetchPolicy, get_json

DEFAULT_BASE_URL = "https://civitai.com"
SORTS = ("Most Reactions", "Most Comments", "Most Collected", "Newest", "Oldest")
PERIODS = ("AllTime", "Year", "Month", "Week", "Day")
LEVELS = {"PG": 1, "PG-13": 2, "R": 4, "X": 8, "XXX": 16}
ALL_LEVELS = sum(LEVELS.values())
# older answers (and the legacy `nsfw` filter) name the level: None, Soft, Mature, X
LEVEL_NAMES = {name.lower(): level for name, level in LEVELS.items()} | {
    "none": 1,
    "soft": 2,
    "mature": 4,
    "pg13": 2,
    "blocked": 32,
}
# the transform segment before the file name: "width=1024", "original=true", "anim=false,width=450"
TRANSFORM = re.compile(r"[a-z]+=[\w.-]+(,[a-z]+=[\w.-]+)*", re.IGNORECASE)
MAX_LIMIT = 200  # civitai's largest page


@dataclass
class CivitaiQuery:
    """What to ask civitai for; the field names follow the API's query string."""

    target: int = 200  # images wanted in all
    limit: int = 100  # per page, 1..200
    sort: str = "Most Reactions"
    period: str = "AllTime"
    browsing_level: int = 1  # bitmask of LEVELS; PG only unless an admin widens it
    base_models: tuple[str, ...] = ()
    username: str = ""
    model_id: int | None = None
    model_version_id: int | None = None
    post_id: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first setting civitai would not accept."""
        levels = ", ".join(f"{name}={bit}" for name, bit in LEVELS.items())
        models = self.base_models
        rules = {  # field: (whether it is acceptable, what it must be)
            "target": (_whole(self.target, 1), "a whole number of at least 1"),
            "limit": (_whole(self.limit, 1, MAX_LIMIT), f"between 1 and {MAX_LIMIT}"),
            "sort": (self.sort in SORTS, f"one of {', '.join(SORTS)}"),
            "period": (self.period in PERIODS, f"one of {', '.join(PERIODS)}"),
            "browsing_level": (
                _whole(self.browsing_level, 1, ALL_LEVELS),
                f"a sum of {levels} (1–{ALL_LEVELS})",
            ),
            "base_models": (
                isinstance(models, tuple | list)
                and all(isinstance(m, str) and m.strip() and "," not in m for m in models),
                "a list of names without commas",
            ),
            "username": (isinstance(self.username, str), "text"),
        } | {
            name: (
                getattr(self, name) is None or _whole(getattr(self, name), 1),
                "a positive whole number",
            )
            for name in ("model_id", "model_version_id", "post_id")
        }
        for name, (acceptable, rule) in rules.items():
            if not acceptable:
                raise ValueError(f"{name} must be {rule}, not {getattr(self, name)!r}")

    def params(self, cursor: str | None = None) -> dict:
        """Return the query string of one page, leaving out empty filters."""
        params = {
            "limit": self.limit,
            "sort": self.sort,
            "period": self.period,
            "browsingLevel": self.browsing_level,
            "baseModels": ",".join(self.base_models),
            "username": self.username.strip(),
            "modelId": self.model_id,
            "modelVersionId": self.model_version_id,
            "postId": self.post_id,
            "withMeta": "true",  # the prompt is only sent when asked for
            "cursor": cursor,
        }
        return {key: value for key, value in params.items() if value not in (None, "")}


@dataclass
class CivitaiImage:
    """One image from civitai's listing, with the facts worth keeping."""

    civitai_id: int
    url: str  # the download: the 512-px rendition, enough to rate and a fraction of the bytes
    original_url: str
    page_url: str  # the image's page on civitai, for attribution
    username: str | None = None
    prompt: str | None = None
    base_model: str | None = None
    nsfw_level: int | None = None  # a LEVELS value (32 blocked, 0 not rated yet), None if unsaid
    reactions: dict[str, int] = field(default_factory=dict)  # stats without "Count": like, heart…
    width: int | None = None
    height: int | None = None


def rendition_url(url: str, width: int = 512) -> str:
    """Rewrite a civitai image URL to its rendition `width` px wide; leave other URLs alone."""
    parts = urlsplit(url)
    segments = parts.path.split("/")
    transform = segments[-2] if len(segments) >= 3 else ""
    if not TRANSFORM.fullmatch(transform) or not re.search(r"(^|,)(width|original)=", transform):
        return url
    segments[-2] = f"width={width}"
    return urlunsplit(parts._replace(path="/".join(segments)))


def parse_nsfw_level(value) -> int | None:
    """Return civitai's numeric NSFW level from a number (4, "4") or a name ("Mature")."""
    number = _int(value)
    if number is not None:
        return number
    return LEVEL_NAMES.get(value.strip().lower()) if isinstance(value, str) else None


def parse_image(raw: dict, base_url: str = DEFAULT_BASE_URL) -> CivitaiImage | None:
    """Return the image an API item describes, or None when it has no usable id or image URL."""
    civitai_id, url = _int(raw.get("id")), _text(raw.get("url"))
    if (
        civitai_id is None
        or civitai_id < 1
        or not url
        or not url.startswith(("https://", "http://"))
    ):
        return None
    if raw.get("type") not in (None, "image"):  # videos share the endpoint; they can't be rated
        return None
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}  # null without withMeta
    stats = raw.get("stats") if isinstance(raw.get("stats"), dict) else {}
    level = parse_nsfw_level(raw.get("nsfwLevel"))
    return CivitaiImage(
        civitai_id=civitai_id,
        url=rendition_url(url),
        original_url=url,
        page_url=f"{base_url.rstrip('/')}/images/{civitai_id}",
        username=_text(raw.get("username")),
        prompt=_text(meta.get("prompt")),
        base_model=_text(raw.get("baseModel")) or _text(meta.get("baseModel")),
        nsfw_level=level if level is not None else _int(raw.get("browsingLevel")),
        reactions={
            key.removesuffix("Count"): count
            for key, value in stats.items()
            if key.endswith("Count") and (count := _int(value)) is not None
        },
        width=_int(raw.get("width")),
        height=_int(raw.get("height")),
    )


def next_cursor(metadata) -> str | None:
    """Return the cursor of the next page from an answer's metadata, or None at the end."""
    if not isinstance(metadata, dict):
        return None
    if metadata.get("nextCursor") not in (None, ""):
        return str(metadata["nextCursor"])
    # some sorts answer nextCursor: null yet give a working nextPage URL (civitai issue #981)
    next_page = metadata.get("nextPage")
    if not isinstance(next_page, str):
        return None
    found = parse_qs(urlsplit(next_page).query).get("cursor")
    return found[0] if found else None


def fetch_page(
    session: requests.Session,
    query: CivitaiQuery,
    cursor: str | None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    api_key: str | None = None,
    policy: FetchPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[CivitaiImage], str | None, int]:
    """Fetch one page; return its images within the query's levels, the next cursor, its length."""
    query.validate()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    answer = get_json(
        session,
        f"{base_url.rstrip('/')}/api/v1/images",
        params=query.params(cursor),
        headers=headers,
        policy=policy,
        sleep=sleep,
    )
    items = answer.get("items")
    if not isinstance(items, list):
        raise FetchError(f"civitai answered without a list of items; is {base_url} right?")
    parsed = (parse_image(raw, base_url) for raw in items if isinstance(raw, dict))
    images = [image for image in parsed if image and _allowed(image.nsfw_level, query)]
    return images, next_cursor(answer.get("metadata")), len(items)


def _allowed(level: int | None, query: CivitaiQuery) -> bool:
    # civitai filters by browsingLevel itself; checking again means a slip on its side, or an
    # image not rated yet (level 0 or missing), never reaches raters who asked for less
    if not level:
        return query.browsing_level == ALL_LEVELS
    return (level & ~query.browsing_level) == 0


def _int(value) -> int | None:
    if isinstance(value, str) and value.strip().isdecimal() and len(value) <= 18:
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _whole(value, low: int, high: int | None = None) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and low <= value and (high is None or value <= high)


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None
