"""The civitai client: query strings, parsing of odd items, paging by cursor, renditions."""

import io
import struct

import pytest
from PIL import Image

from rating.sources import civitai
from rating.sources.civitai import (
    CivitaiQuery,
    fetch_page,
    next_cursor,
    parse_image,
    parse_nsfw_level,
    rendition_url,
)
from rating.sources.fetch import FetchError, get_image_bytes

pytest_plugins = ("tests.fake_civitai",)

CDN = "https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/cc242d6c-f960-4274-aa1d-f22a71e705ef"
PG_IDS = [101, 102, 103, 104, 106, 107, 108, 110, 111, 112, 113]  # what a PG-only query keeps


def page_through(session, query, *, base_url, policy, sleep):
    """Page as the import job does: follow cursors until the target is met or they run out."""
    pages, cursor, have = [], None, 0
    while have < query.target:
        images, following, raw_count = fetch_page(
            session, query, cursor, base_url=base_url, policy=policy, sleep=sleep
        )
        images = images[: query.target - have]
        pages.append((images, following))
        have += len(images)
        if not following or not raw_count:
            break
        cursor = following
    return pages


@pytest.fixture
def sleeps():
    """Return the list the injected `sleep` appends to, so no test really waits."""
    return []


def test_default_query_asks_for_pg_images_with_their_prompts():
    assert CivitaiQuery().params(None) == {
        "limit": 100,
        "sort": "Most Reactions",
        "period": "AllTime",
        "browsingLevel": 1,
        "withMeta": "true",
    }


def test_every_filter_goes_into_the_query_string():
    query = CivitaiQuery(
        limit=50,
        sort="Newest",
        period="Week",
        browsing_level=1 | 2 | 4,
        base_models=("SDXL 1.0", "Pony"),
        username=" alice ",
        model_id=7,
        model_version_id=8,
        post_id=9,
    )
    query.validate()
    assert query.params("75363|932023") == {
        "limit": 50,
        "sort": "Newest",
        "period": "Week",
        "browsingLevel": 7,
        "baseModels": "SDXL 1.0,Pony",
        "username": "alice",
        "modelId": 7,
        "modelVersionId": 8,
        "postId": 9,
        "withMeta": "true",
        "cursor": "75363|932023",
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target": 0}, "target must be a whole number of at least 1, not 0"),
        ({"target": "10"}, "target must be a whole number"),
        ({"limit": 0}, "limit must be between 1 and 200, not 0"),
        ({"limit": 201}, "limit must be between 1 and 200, not 201"),
        (
            {"sort": "Best"},
            "sort must be one of Most Reactions, Most Comments, Most Collected, "
            "Newest, Oldest, not 'Best'",
        ),
        ({"period": "Hour"}, "period must be one of AllTime, Year, Month, Week, Day, not 'Hour'"),
        ({"browsing_level": 0}, "browsing_level must be a sum of PG=1, PG-13=2, R=4, X=8, XXX=16"),
        ({"browsing_level": 32}, "(1–31), not 32"),
        ({"base_models": "SDXL 1.0"}, "base_models must be a list of names without commas"),
        ({"base_models": ("SD 1.5", "")}, "base_models must be a list of names"),
        ({"base_models": ("a,b",)}, "without commas"),
        ({"username": None}, "username must be text"),
        ({"model_id": 0}, "model_id must be a positive whole number, not 0"),
        ({"post_id": "12"}, "post_id must be a positive whole number, not '12'"),
        ({"model_version_id": True}, "model_version_id must be a positive whole number"),
    ],
)
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError) as caught:
        CivitaiQuery(**changes).validate()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"{CDN}/original=true/9173928.jpeg", f"{CDN}/width=512/9173928.jpeg"),
        (f"{CDN}/width=1024/9173928.jpeg", f"{CDN}/width=512/9173928.jpeg"),
        (f"{CDN}/anim=false,width=450/9173928.jpeg", f"{CDN}/width=512/9173928.jpeg"),
        (f"{CDN}/original=true,quality=90/x.png?token=1", f"{CDN}/width=512/x.png?token=1"),
        (f"{CDN}/9173928.jpeg", f"{CDN}/9173928.jpeg"),  # no transform segment: unknown, unchanged
        ("https://example.com/images/a.png", "https://example.com/images/a.png"),
        ("https://example.com/quality=90/a.png", "https://example.com/quality=90/a.png"),
        ("https://example.com/width=1024", "https://example.com/width=1024"),
    ],
)
def test_rendition_url_rewrites_only_the_transform_segment(url, expected):
    assert rendition_url(url) == expected


def test_rendition_url_takes_a_width():
    assert rendition_url(f"{CDN}/width=1024/1.jpeg", 768) == f"{CDN}/width=768/1.jpeg"


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (1, 1),
        (4, 4),
        ("8", 8),
        (16.0, 16),
        ("None", 1),
        ("Soft", 2),
        ("Mature", 4),
        ("X", 8),
        ("PG", 1),
        ("PG-13", 2),
        ("pg13", 2),
        ("R", 4),
        ("XXX", 16),
        ("x", 8),
        ("Blocked", 32),
        (None, None),
        ("", None),
        ("Spicy", None),
        (True, None),
        (2.5, None),
        ({}, None),
    ],
)
def test_nsfw_levels_are_read_from_numbers_and_names(value, level):
    assert parse_nsfw_level(value) == level


def test_a_full_item_is_parsed(fake_civitai):
    raw = fake_civitai.page(0)["items"][0]
    assert parse_image(raw, "https://civitai.com/") == civitai.CivitaiImage(
        civitai_id=101,
        url=f"{fake_civitai.url}/img/a.png",
        original_url=f"{fake_civitai.url}/img/a.png",
        page_url="https://civitai.com/images/101",
        username="alice",
        prompt="a red to blue gradient",
        base_model="SD 1.5",
        nsfw_level=1,
        reactions={"cry": 0, "laugh": 1, "like": 12, "dislike": 0, "heart": 5, "comment": 2},
        width=400,
        height=320,
    )


def test_odd_items_are_parsed_defensively(fake_civitai):
    page1, page2, page3 = (fake_civitai.page(i)["items"] for i in range(3))
    null_meta = parse_image(page1[1], fake_civitai.url)
    assert (null_meta.prompt, null_meta.nsfw_level, null_meta.width) == (None, 1, 1024)
    assert null_meta.url.endswith("/width=512/7001.jpeg")
    assert null_meta.original_url.endswith("/original=true/7001.jpeg")
    assert null_meta.page_url == f"{fake_civitai.url}/images/102"
    no_meta = parse_image(page1[2], fake_civitai.url)
    assert (no_meta.prompt, no_meta.nsfw_level) == (None, 1)  # nsfwLevel "1"
    assert parse_image(page1[3], fake_civitai.url).username is None
    assert parse_image(page2[0], fake_civitai.url).nsfw_level == 2  # "Soft"
    assert parse_image(page2[4], fake_civitai.url) is None  # no url
    no_stats = parse_image(page3[2], fake_civitai.url)
    assert (no_stats.reactions, no_stats.base_model) == ({}, "SDXL 1.0")
    assert parse_image(page3[4], fake_civitai.url).nsfw_level == 8
    assert parse_image(page3[5], fake_civitai.url) is None  # a video


@pytest.mark.parametrize(
    "raw",
    [
        {"url": f"{CDN}/width=450/1.jpeg"},
        {"id": None, "url": f"{CDN}/width=450/1.jpeg"},
        {"id": "abc", "url": f"{CDN}/width=450/1.jpeg"},
        {"id": True, "url": f"{CDN}/width=450/1.jpeg"},
        {"id": 0, "url": f"{CDN}/width=450/1.jpeg"},
        {"id": 1},
        {"id": 1, "url": ""},
        {"id": 1, "url": 12},
        {"id": 1, "url": "/width=450/1.jpeg"},
        {"id": 1, "url": "ftp://example.com/1.jpeg"},
        {"id": 1, "url": f"{CDN}/width=450/1.mp4", "type": "video"},
    ],
)
def test_an_item_without_a_usable_id_or_image_url_is_skipped(raw):
    assert parse_image(raw, "https://civitai.com") is None


def test_a_sparse_item_is_enough():
    image = parse_image(
        {
            "id": "42",
            "url": f"{CDN}/width=450/42.jpeg",
            "meta": "garbled",
            "stats": {"likeCount": "3", "heartCount": None, "note": 1},
            "nsfwLevel": "Unheard-of",
            "browsingLevel": 4,
            "width": "832",
            "somethingNew": {"nested": True},
        },
        "https://civitai.com",
    )
    assert image == civitai.CivitaiImage(
        civitai_id=42,
        url=f"{CDN}/width=512/42.jpeg",
        original_url=f"{CDN}/width=450/42.jpeg",
        page_url="https://civitai.com/images/42",
        nsfw_level=4,
        reactions={"like": 3},
        width=832,
    )


@pytest.mark.parametrize(
    ("metadata", "cursor"),
    [
        ({"nextCursor": "75363|932023", "nextPage": "https://x/?cursor=other"}, "75363|932023"),
        ({"nextCursor": 2500}, "2500"),
        (
            {
                "nextCursor": None,
                "nextPage": "https://civitai.com/api/v1/images?limit=5&cursor=a%7Cb",
            },
            "a|b",
        ),
        ({"nextCursor": "", "nextPage": "https://civitai.com/api/v1/images?page=2"}, None),
        ({"nextPage": None}, None),
        ({}, None),
        (None, None),
        ("nonsense", None),
    ],
)
def test_next_cursor_comes_from_next_cursor_or_next_page(metadata, cursor):
    assert next_cursor(metadata) == cursor


def test_a_page_is_fetched_after_waiting_out_a_429(fake_civitai, http_session, sleeps):
    images, cursor, raw_count = fetch_page(
        http_session,
        CivitaiQuery(),
        None,
        base_url=fake_civitai.url,
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert sleeps == [1.0]  # Retry-After: 1
    assert [image.civitai_id for image in images] == [101, 102, 103, 104]
    assert (cursor, raw_count) == (fake_civitai.cursors[1], 4)
    asked = fake_civitai.api_requests()[-1]
    assert asked.query == {
        "limit": ["100"],
        "sort": ["Most Reactions"],
        "period": ["AllTime"],
        "browsingLevel": ["1"],
        "withMeta": ["true"],
    }
    assert "authorization" not in asked.headers


def test_an_api_key_is_sent_as_a_bearer_token(fake_civitai, http_session, sleeps):
    fetch_page(
        http_session,
        CivitaiQuery(),
        None,
        base_url=fake_civitai.url,
        api_key="k-123",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert {r.headers["authorization"] for r in fake_civitai.api_requests()} == {"Bearer k-123"}


def test_paging_follows_cursors_until_they_run_out(fake_civitai, http_session, sleeps):
    query = CivitaiQuery(target=1000, limit=200, sort="Newest")
    pages = page_through(
        http_session,
        query,
        base_url=fake_civitai.url,
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert [cursor for _, cursor in pages] == [*fake_civitai.cursors[1:], None]
    assert [image.civitai_id for images, _ in pages for image in images] == PG_IDS
    cursors = [r.param("cursor") for r in fake_civitai.api_requests()]
    assert cursors == [None, *fake_civitai.cursors]  # the first was answered 429, then retried
    assert {r.param("sort") for r in fake_civitai.api_requests()} == {"Newest"}
    assert {r.param("withMeta") for r in fake_civitai.api_requests()} == {"true"}


@pytest.mark.parametrize(
    ("target", "pages", "ids"),
    [
        (3, 1, [101, 102, 103]),
        (4, 1, [101, 102, 103, 104]),
        (6, 2, [101, 102, 103, 104, 106, 107]),
    ],
)
def test_paging_stops_at_the_target(fake_civitai, http_session, sleeps, target, pages, ids):
    found = page_through(
        http_session,
        CivitaiQuery(target=target),
        base_url=fake_civitai.url,
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert [image.civitai_id for images, _ in found for image in images] == ids
    assert len(fake_civitai.api_requests()) == pages + 1  # plus the 429


def test_images_beyond_the_browsing_level_are_dropped(fake_civitai, http_session, sleeps):
    def levels(browsing_level):
        query = CivitaiQuery(browsing_level=browsing_level)
        pages = page_through(
            http_session,
            query,
            base_url=fake_civitai.url,
            policy=fake_civitai.policy(),
            sleep=sleeps.append,
        )
        return {image.civitai_id: image.nsfw_level for images, _ in pages for image in images}

    assert list(levels(1)) == PG_IDS
    assert levels(1 | 2)[105] == 2 and 114 not in levels(1 | 2)
    assert levels(31)[114] == 8


def test_images_of_unknown_level_only_pass_when_every_level_is_allowed(monkeypatch):
    unrated = {"id": 5, "url": f"{CDN}/width=450/5.jpeg", "nsfwLevel": 0}
    monkeypatch.setattr(civitai, "get_json", lambda *a, **k: {"items": [unrated], "metadata": {}})
    assert fetch_page(None, CivitaiQuery(browsing_level=15), None, policy=None)[0] == []
    kept, cursor, raw_count = fetch_page(None, CivitaiQuery(browsing_level=31), None, policy=None)
    assert ([image.civitai_id for image in kept], cursor, raw_count) == ([5], None, 1)


def test_an_answer_without_items_is_an_error(monkeypatch):
    monkeypatch.setattr(civitai, "get_json", lambda *a, **k: {"error": "Bad Request"})
    with pytest.raises(FetchError, match="civitai answered without a list of items"):
        fetch_page(None, CivitaiQuery(), None, policy=None)


def test_a_bad_query_is_refused_before_any_request(fake_civitai, http_session):
    with pytest.raises(ValueError, match="limit must be between 1 and 200"):
        fetch_page(
            http_session,
            CivitaiQuery(limit=500),
            None,
            base_url=fake_civitai.url,
            policy=fake_civitai.policy(),
        )
    assert fake_civitai.requests == []


def test_the_512_rendition_is_what_gets_downloaded(fake_civitai, http_session, sleeps):
    images, _, _ = fetch_page(
        http_session,
        CivitaiQuery(),
        None,
        base_url=fake_civitai.url,
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    image = images[1]
    assert image.url == fake_civitai.url + fake_civitai.rendition_path
    for url, size in [(image.url, (512, 384)), (image.original_url, (1024, 768))]:
        body = get_image_bytes(http_session, url, policy=fake_civitai.policy())
        assert Image.open(io.BytesIO(body)).size == size


def test_the_fake_serves_the_awkward_images_it_promises(fake_civitai):
    def served(path):
        return fake_civitai.images[path][1]

    def pixels(path):
        return Image.open(io.BytesIO(served(path))).convert("RGB")

    assert served("/img/a.png") != served("/img/a-copy.png")
    assert pixels("/img/a.png").tobytes() == pixels("/img/a-copy.png").tobytes()
    assert pixels("/img/a-near.jpg").size == (320, 256) != pixels("/img/a.png").size
    for path in [
        "/img/a.png",
        "/img/a-near.jpg",
        "/img/b.jpg",
        "/img/c.png",
        "/img/d.png",
        "/img/flaky.png",
        fake_civitai.original_path,
        fake_civitai.rendition_path,
    ]:
        assert min(pixels(path).size) >= 256, path
    huge = served("/img/huge.png")
    assert struct.unpack(">II", huge[16:24]) == (100_000, 100_000) and len(huge) < 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge))
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(served("/img/corrupt.png")))
