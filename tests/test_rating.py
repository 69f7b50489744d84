"""Rating one image at a time, undo, skip, and pairwise picks, through htmx requests."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image as PILImage
from sqlalchemy import event

from rating import jobs
from rating.models import Comparison, Image, Job, Rating, Source, db
from rating.sources import demo


def card(response) -> dict:
    """Read the image on a rating card and its hidden fields."""
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html
    fields = dict(re.findall(r'name="(queue|skipped|history)" value="([^"]*)"', html))
    shown = re.search(r'data-image-id="(\d+)"', html)
    fields["image"] = int(shown.group(1)) if shown else None
    fields["rated"] = int(re.search(r'data-rated="(\d+)"', html).group(1))
    fields["html"] = html
    return fields


def rate(site, state: dict, stars) -> dict:
    """Press a star button on the card, as htmx would post it."""
    data = {k: state[k] for k in ("queue", "skipped", "history")} | {"stars": stars}
    return card(site.post(f"/rate/{state['image']}", data, htmx=True))


def my_ratings(app, user_id=1) -> dict[int, int]:
    """Return {image id: stars} for a user, from the database."""
    with app.app_context():
        rows = db.session.scalars(db.select(Rating).where(Rating.user_id == user_id))
        return {r.image_id: r.stars for r in rows}


def test_rating_commits_and_shows_the_next_image(app, admin_site, client):
    state = card(client.get("/rate"))
    first = state["image"]
    after = rate(admin_site, state, 4)
    assert my_ratings(app) == {first: 4}
    assert after["image"] not in (None, first)
    assert after["rated"] == 1
    assert after["history"] == f"{first}:4"  # the image and the stars this page gave it
    assert 'id="rate-card"' in after["html"] and "<html" not in after["html"]  # a fragment


def test_a_demo_pack_image_says_so_on_its_card_and_others_do_not(app, admin_site, client):
    state = card(client.get("/rate"))  # the fixture's pool is the demo pack
    assert "demo pack</figcaption>" in state["html"]
    assert "demo pack</figcaption>" in rate(admin_site, state, 3)["html"]  # the next card too
    with app.app_context():
        db.session.execute(db.update(Source).values(kind="upload"))
        db.session.commit()
    assert "demo pack</figcaption>" not in card(client.get("/rate"))["html"]


def test_the_next_images_are_prefetched(admin_site, client):
    state = card(client.get("/rate"))
    queue = [int(i) for i in state["queue"].split(",")]
    assert queue[0] == state["image"] and len(queue) == 9  # shown, then chosen ahead
    prefetch = state["html"].split('class="prefetch"')[1]
    assert prefetch.count("<img") == 2
    after = rate(admin_site, state, 2)
    assert after["image"] == queue[1]  # the image prefetched is the one shown next


def test_no_image_repeats_until_all_are_rated(app, admin_site, client):
    state, seen = card(client.get("/rate")), []
    while state["image"] is not None:
        seen.append(state["image"])
        state = rate(admin_site, state, 1 + len(seen) % 5)
    assert sorted(seen) == list(range(1, 13))
    assert "Nothing left to rate" in state["html"]
    assert len(my_ratings(app)) == 12


def test_skip_hides_an_image_for_the_sitting_only(admin_site, client):
    state = card(client.get("/rate"))
    skipped = state["image"]
    data = {k: state[k] for k in ("queue", "skipped", "history")}
    state = card(admin_site.post(f"/rate/{skipped}/skip", data, htmx=True))
    assert state["skipped"] == str(skipped) and state["rated"] == 0
    while state["image"] is not None:
        assert state["image"] != skipped
        state = rate(admin_site, state, 3)
    assert "You skipped 1 image" in state["html"]
    assert card(client.get("/rate"))["image"] == skipped  # a new sitting shows it again


def test_rerating_updates_and_undo_restores(app, admin_site, client):
    state = card(client.get("/rate"))
    image = state["image"]
    state = rate(admin_site, state, 5)
    data = {"queue": state["queue"], "history": state["history"], "skipped": ""}
    undone = card(admin_site.post("/rate/undo", data, htmx=True))
    assert undone["image"] == image and my_ratings(app) == {}  # a new rating is removed
    assert "Undone" in undone["html"]
    again = rate(admin_site, undone, 2)
    assert my_ratings(app) == {image: 2}
    # re-rate from My ratings: undo on the rating page undoes only what that page did
    admin_site.post(f"/me/ratings/{image}", {"stars": 4}, htmx=True)
    assert my_ratings(app) == {image: 4}
    data = {"queue": again["queue"], "history": again["history"], "skipped": ""}
    changed = card(admin_site.post("/rate/undo", data, htmx=True))
    assert my_ratings(app) == {image: 4} and "changed since" in changed["html"]


def test_undo_sent_twice_undoes_once(app, admin_site, client):
    state = card(client.get("/rate"))
    image = state["image"]
    state = rate(admin_site, state, 3)
    data = {"queue": state["queue"], "history": state["history"], "skipped": ""}
    state = rate(admin_site, card(admin_site.post("/rate/undo", data, htmx=True)), 3)
    state = rate(admin_site, {**state, "image": image}, 5)  # change it: 3 → 5
    assert my_ratings(app) == {image: 5}
    data = {"queue": state["queue"], "history": state["history"], "skipped": ""}
    first = card(admin_site.post("/rate/undo", data, htmx=True))
    replay = card(admin_site.post("/rate/undo", data, htmx=True))  # the same request again
    assert my_ratings(app) == {image: 3}  # the 3 is kept, not lost to the replay
    assert "Undone" in first["html"] and "Already undone" in replay["html"]


def test_double_click_keeps_one_rating_and_undo_still_works(app, admin_site, client):
    state = card(client.get("/rate"))
    rate(admin_site, state, 3)
    second = rate(admin_site, state, 3)  # the same request again
    assert my_ratings(app) == {state["image"]: 3}
    assert second["history"] == f"{state['image']}:3"
    data = {"queue": second["queue"], "history": second["history"], "skipped": ""}
    card(admin_site.post("/rate/undo", data, htmx=True))
    assert my_ratings(app) == {}


def test_undo_with_nothing_to_undo_says_so(admin_site):
    response = card(admin_site.post("/rate/undo", {"history": ""}, htmx=True))
    assert "Nothing to undo." in response["html"]


def test_bad_stars_are_refused_and_lose_nothing(app, admin_site, client):
    state = card(client.get("/rate"))
    rate(admin_site, state, 5)
    for bad in ("0", "6", "x", ""):
        response = admin_site.post(f"/rate/{state['image']}", {"stars": bad}, htmx=True)
        assert response.status_code == 400
        assert "Choose 1 to 5 stars." in response.get_data(as_text=True)
    assert my_ratings(app) == {state["image"]: 5}


def test_unknown_or_hidden_images_answer_404(app, admin_site):
    assert admin_site.post("/rate/9999", {"stars": 3}).status_code == 404
    with app.app_context():
        db.session.get(Image, 1).hidden = True
        db.session.commit()
    assert admin_site.post("/rate/1", {"stars": 3}).status_code == 404
    assert my_ratings(app) == {}  # the same statement that checks the pool stores nothing


def test_a_key_press_costs_four_statements(app, admin_site, client):
    """Rate-and-next runs on every key press: the person, the rating, the queue's images and
    the counts, one statement each; choosing more images happens once per PICK_AHEAD."""
    statements, token = [], admin_site.token()
    with app.app_context():
        engine = db.engine
    record = lambda *args: statements.append(args[2])  # noqa: E731 (conn, cursor, statement…)
    state, counts = card(client.get("/rate")), []
    event.listen(engine, "before_cursor_execute", record)
    try:
        for stars in [1, 2, 3, 4, 5] * 2:  # 10 of the 12 images
            statements.clear()
            data = {k: state[k] for k in ("queue", "skipped", "history")}
            data |= {"stars": stars, "csrf_token": token}
            headers = {"HX-Request": "true"}
            rated = state["rated"]
            state = card(client.post(f"/rate/{state['image']}", data=data, headers=headers))
            counts.append(len(statements))
            # the card is made first, the rating written last: its commit ends the request
            assert statements[-1].lstrip().startswith("INSERT INTO rating"), statements
            assert state["rated"] == rated + 1  # yet the card counts it
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert sorted(counts)[len(counts) // 2] == 4, counts
    assert sum(c > 4 for c in counts) <= 2, counts  # a refill every PICK_AHEAD - PREFETCH


@pytest.mark.services
def test_on_postgres_a_key_press_is_its_statements_alone(app, admin_site, client, on_services):
    """No BEGIN, COMMIT or ROLLBACK goes to the server: each is a round trip, a wait for the
    server's process on a busy machine. Read from PostgreSQL's own statement log."""
    with app.app_context():
        name = db.engine.url.database
        db.engine.dispose()  # new connections take the setting below
    on_services.postgres.sql(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    log = on_services.postgres.root / "log"
    state, token, counts = card(client.get("/rate")), admin_site.token(), []
    for stars in [1, 2, 3, 4, 5, 1]:
        start = log.stat().st_size
        data = {k: state[k] for k in ("queue", "skipped", "history")}
        data |= {"stars": stars, "csrf_token": token}
        state = card(client.post(f"/rate/{state['image']}", data=data, headers={"HX-Request": "1"}))
        with log.open() as lines:
            lines.seek(start)
            sent = [line for line in lines if re.search(r"LOG:\s+(statement|execute)", line)]
        assert not [line for line in sent if re.search(r"BEGIN|COMMIT|ROLLBACK", line)], sent
        counts.append(len(sent))
    assert sorted(counts)[len(counts) // 2] == 4, counts  # as on SQLite: the statements alone
    assert my_ratings(app) and len(my_ratings(app)) == 6


def test_garbage_sitting_fields_are_ignored(admin_site, client):
    state = card(client.get("/rate"))
    data = {"queue": "1,,abc,-4", "skipped": "x" * 5000, "history": "9999:9,'; drop", "stars": 3}
    after = card(admin_site.post(f"/rate/{state['image']}", data, htmx=True))
    assert after["image"] is not None


def test_without_htmx_the_rate_page_still_works(admin_site, client):
    state = card(client.get("/rate"))
    data = {k: state[k] for k in ("queue", "skipped", "history")} | {"stars": 1}
    page = admin_site.post(f"/rate/{state['image']}", data)
    assert page.status_code == 200 and "<html" in page.get_data(as_text=True)


def pair(response) -> dict:
    """Read a pair card: the two image ids and hidden fields."""
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html
    fields = dict(re.findall(r'name="(recent|history|upcoming|token)" value="([^"]*)"', html))
    match = re.search(r'action="/pairs/(\d+)/(\d+)"', html)
    fields["pair"] = (int(match.group(1)), int(match.group(2))) if match else None
    fields["picks"] = int(re.search(r'data-picks="(\d+)"', html).group(1))
    return fields


def test_pairwise_picks_are_stored_as_comparisons(app, admin_site, client):
    state = pair(client.get("/pairs"))
    shown = []
    for outcome in ("a", "b", "tie"):
        a, b = state["pair"]
        shown.append((a, b, outcome))
        data = {k: state[k] for k in ("recent", "history", "upcoming", "token")}
        next_state = pair(
            admin_site.post(f"/pairs/{a}/{b}", data | {"outcome": outcome}, htmx=True)
        )
        assert next_state["pair"] == tuple(int(i) for i in state["upcoming"].split(","))
        state = next_state
    assert state["picks"] == 3
    with app.app_context():
        rows = db.session.scalars(db.select(Comparison).order_by(Comparison.id)).all()
        assert [(c.image_a_id, c.image_b_id, c.outcome) for c in rows] == shown
    data = {k: state[k] for k in ("recent", "history", "upcoming")}
    undone = admin_site.post("/pairs/undo", data, htmx=True)
    assert pair(undone)["picks"] == 2
    assert pair(undone)["pair"] == shown[-1][:2]  # the pair undone is back to pick again
    assert "that pair is back" in undone.get_data(as_text=True)


def test_a_pick_must_be_a_b_or_tie(admin_site):
    assert admin_site.post("/pairs/1/2", {"outcome": "left"}).status_code == 400
    assert admin_site.post("/pairs/1/1", {"outcome": "a"}).status_code == 400
    assert admin_site.post("/pairs/1/999", {"outcome": "a"}).status_code == 404


def test_someone_else_cannot_undo_my_pick(app, admin_site, second_site):
    admin_site.post("/pairs/1/2", {"outcome": "a"})
    second_site.register("bob")
    second_site.post("/pairs/undo", {"history": "1"})
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Comparison.id))) == 1


def test_empty_pool_says_what_to_do(site, client):
    site.register("admin")
    assert "Load the demo pack" in client.get("/").get_data(as_text=True)
    assert "Nothing left to rate" in client.get("/rate").get_data(as_text=True)
    assert "Not enough images" in client.get("/pairs").get_data(as_text=True)


def test_while_the_demo_pack_is_being_made_the_start_page_says_so(app, site, client, second_site):
    site.register("admin")
    with app.app_context():  # a pack queued and not yet in: what a worker has not reached
        db.session.add(Job(owner_id=1, kind="demo_pack", lock_key=demo.LOCK, params={"count": 6}))
        db.session.commit()
    html = client.get("/").get_data(as_text=True)
    assert "The demo pack is being made" in html and "pool is empty" not in html
    assert 'hx-get="/jobs/' in html  # the admin who started it sees its progress, polled
    second_site.register("bea")
    html = second_site.client.get("/").get_data(as_text=True)
    assert "An admin started it" in html and 'hx-get="/jobs/' not in html


def test_loading_the_demo_pack_tells_the_start_page_to_say_so(site, client, monkeypatch):
    site.register("admin")
    monkeypatch.setattr(jobs, "_queue_task", lambda job: None)  # queued, no worker yet
    response = site.post("/admin/demo", {"count": 3}, htmx=True)
    assert response.headers["HX-Trigger"] == "job-started"  # the panel asks for itself again
    html = client.get("/").get_data(as_text=True)
    assert "The demo pack is being made" in html and "job-started from:body" in html


def test_thumbnails_are_small_and_cached_for_long(app, admin_site, client):
    with app.app_context():
        image = db.session.get(Image, 1)
        sha = image.sha256
    with client.get(f"/img/{sha}.jpg") as response:
        assert response.status_code == 200 and response.mimetype == "image/jpeg"
        assert "immutable" in response.headers["Cache-Control"]
        assert "max-age=31536000" in response.headers["Cache-Control"]
        thumb = PILImage.open(io.BytesIO(response.data))
        etag = response.headers["ETag"]
    assert max(thumb.size) <= 768
    with client.get(f"/img/{sha}.jpg", headers={"If-None-Match": etag}) as again:
        assert again.status_code == 304  # a browser's revalidation costs no bytes
    with client.get(f"/img/{sha}/original") as original:
        assert original.status_code == 200, original.get_data(as_text=True)
        assert PILImage.open(io.BytesIO(original.data)).size == (image.width, image.height)
    assert client.get("/img/" + "0" * 64 + ".jpg").status_code == 404
    assert client.get("/img/../../secret_key.jpg").status_code == 404


def test_images_need_a_signed_in_person(app, admin_site, client):
    admin_site.logout()
    with app.app_context():
        sha = db.session.get(Image, 1).sha256
    assert client.get(f"/img/{sha}.jpg").status_code == 302


def test_a_pick_sent_twice_is_stored_once(app, admin_site, client):
    state = pair(client.get("/pairs"))
    a, b = state["pair"]
    data = {k: state[k] for k in ("recent", "history", "upcoming", "token")} | {"outcome": "a"}
    first = pair(admin_site.post(f"/pairs/{a}/{b}", data, htmx=True))
    again = pair(admin_site.post(f"/pairs/{a}/{b}", data, htmx=True))  # the same request
    assert first["picks"] == again["picks"] == 1
    assert first["history"] == again["history"]  # the replay names the same comparison
    assert first["token"] != state["token"]  # each new card gets a token of its own
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Comparison.id))) == 1


def scorer_asks(**active) -> None:
    """Give the first account a taste version whose scorer asks for `active` (ids)."""
    from rating.models import TasteVersion

    version = TasteVersion(
        owner_id=1, number=1, base_model="demo", scorer_file="s", metrics={"active": active}
    )
    db.session.add(version)
    db.session.commit()


def test_a_share_of_each_batch_is_what_my_scorer_asks_for(app, admin_site):
    from rating.picking import next_image_ids

    with app.app_context():
        ids = db.session.scalars(db.select(Image.id).order_by(Image.id)).all()
        asked = ids[-4:]  # the scorer's "informative" and "edge of my top" lists
        scorer_asks(informative=asked[:2], edge_of_top=asked[2:])
        batch = next_image_ids(1, [], 8)
        assert len(batch) == 8 and len(set(batch)) == 8
        assert round(8 * app.config["ACTIVE_SHARE"]) == 2  # two asked for, spread out:
        assert batch[0] == asked[0] and batch[4] == asked[2]  # most informative, edge of top
        db.session.add(Rating(user_id=1, image_id=asked[0], stars=4))
        db.session.commit()
        again = next_image_ids(1, [], 8)  # rated: never asked for again; the next one is
        assert asked[0] not in again and again[0] == asked[2]


def test_the_compare_page_asks_for_the_pairs_my_scorer_finds_a_coin_flip(app, admin_site):
    from rating.picking import next_pair

    with app.app_context():
        a, b, c, d = db.session.scalars(db.select(Image.id).order_by(Image.id).limit(4)).all()
        scorer_asks(coin_flips=[[a, b], [c, d]])
        app.config["ACTIVE_SHARE"] = 1.0
        assert next_pair(1, []) == (a, b)
        db.session.add(Comparison(user_id=1, image_a_id=a, image_b_id=b, outcome="a"))
        db.session.commit()
        assert next_pair(1, []) == (c, d)  # that one is decided: the next coin flip
        assert next_pair(1, [d]) not in {(c, d), (a, b)}  # just shown: a random pair instead
        app.config["ACTIVE_SHARE"] = 0.0
        assert len({next_pair(1, []) for _ in range(12)}) > 1  # exploring, not asking


def test_the_rating_card_says_how_far_training_is(app, admin_site, client):
    app.config["TASTE_MIN_RATINGS"] = 3
    page = client.get("/rate").get_data(as_text=True)
    assert "0 rated" in page and "3 more until you can" in page and 'href="/taste/"' in page
    with app.app_context():
        a, b, c = db.session.scalars(db.select(Image.id).order_by(Image.id).limit(3)).all()
    admin_site.post(f"/rate/{a}", {"stars": "4"})
    admin_site.post(f"/pairs/{b}/{c}", {"outcome": "a"})  # a pick counts too
    page = client.get("/rate").get_data(as_text=True)
    assert "1 more until you can" in page
    admin_site.post(f"/rate/{b}", {"stars": "2"})
    page = client.get("/rate").get_data(as_text=True)
    assert "more until" not in page and ">Train your taste</a>" in page
