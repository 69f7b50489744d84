"""My ratings: grid, histogram, changing ratings, CSV/JSONL export and import, privacy."""

from __future__ import annotations

import csv
import io
import json
import re

from rating.models import Comparison, Image, Rating, db
from rating.ratings import save_rating


def seed_ratings(app, user_id=1, stars=(5, 5, 4, 1, 3)) -> None:
    """Give a user ratings on images 1.. and two picks."""
    with app.app_context():
        for image_id, n in enumerate(stars, start=1):
            save_rating(user_id, image_id, n)
        db.session.add(Comparison(user_id=user_id, image_a_id=1, image_b_id=2, outcome="a"))
        db.session.add(Comparison(user_id=user_id, image_a_id=3, image_b_id=4, outcome="tie"))
        db.session.commit()


def test_histogram_counts_and_filter(app, admin_site, client):
    seed_ratings(app)
    html = client.get("/me/ratings").get_data(as_text=True)
    assert re.search(r'id="count-ratings">5<', html) and re.search(r'id="count-picks">2<', html)
    counts = re.findall(r'data-stars="(\d)">.*?class="num">(\d+)<', html, re.S)
    assert dict(counts) == {"5": "2", "4": "1", "3": "1", "2": "0", "1": "1"}
    five = client.get("/me/ratings?stars=5").get_data(as_text=True)
    assert len(re.findall(r'class="tile"', five)) == 2


def test_change_a_rating_from_the_grid(app, admin_site):
    seed_ratings(app)
    response = admin_site.post("/me/ratings/4", {"stars": 2}, htmx=True)
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and 'data-stars="2"' in html
    with app.app_context():
        assert db.session.scalar(db.select(Rating.stars).where(Rating.image_id == 4)) == 2
    # The histogram comes along, swapped in out of band: the 1-star bar empties, 2 gains one.
    assert 'id="histogram" aria-label="My stars" hx-swap-oob="true"' in html
    bars = html.split('id="histogram"')[1]
    counts = re.findall(r'data-stars="(\d)">.*?class="num">(\d+)<', bars, re.S)
    assert dict(counts) == {"5": "2", "4": "1", "3": "1", "2": "1", "1": "0"}
    assert re.search(r'id="count-ratings" hx-swap-oob="true">5<', html)


def test_export_csv_and_jsonl(app, admin_site, client):
    seed_ratings(app)
    response = client.get("/me/ratings.csv")
    assert response.mimetype == "text/csv"
    assert re.match(
        r'attachment; filename="tastebud-ratings-admin-\d{8}\.csv"',
        response.headers["Content-Disposition"],
    )
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [r["kind"] for r in rows] == ["rating"] * 5 + ["comparison"] * 2
    with app.app_context():
        sha = {i.id: i.sha256 for i in db.session.scalars(db.select(Image))}
    assert rows[0]["image_sha256"] == sha[1] and rows[0]["stars"] == "5"
    assert rows[5]["other_sha256"] == sha[2] and rows[5]["pick"] == "image"
    assert rows[6]["pick"] == "tie" and rows[0]["created_at"].endswith("Z")
    lines = client.get("/me/ratings.jsonl").get_data(as_text=True).splitlines()
    assert json.loads(lines[3]) | {} == {
        "kind": "rating",
        "image_sha256": sha[4],
        "stars": 1,
        "created_at": rows[3]["created_at"],
        "updated_at": rows[3]["updated_at"],
    }
    assert client.get("/me/ratings.xml").status_code == 404


def upload(site, text: str | bytes, name: str):
    """Post a file to the import form."""
    body = text if isinstance(text, bytes) else text.encode()
    data = {"file": (io.BytesIO(body), name)}
    return site.post(
        "/me/ratings/import", data, content_type="multipart/form-data", follow_redirects=True
    ).get_data(as_text=True)


def test_import_into_another_account_round_trips(app, admin_site, second_site):
    seed_ratings(app)
    for fmt in ("csv", "jsonl"):
        exported = admin_site.client.get(f"/me/ratings.{fmt}").get_data(as_text=True)
        second_site.register(f"bob{fmt}")
        html = upload(second_site, exported, f"mine.{fmt}")
        assert "5 ratings added" in html and "2 picks added" in html, html
        again = upload(second_site, exported, f"mine.{fmt}")
        assert "5 kept (yours were newer)" in again and "2 picks already here" in again
        second_site.logout()
    with app.app_context():
        for user_id in (2, 3):
            stars = db.session.scalars(
                db.select(Rating.stars).where(Rating.user_id == user_id).order_by(Rating.image_id)
            ).all()
            assert stars == [5, 5, 4, 1, 3]
            assert (
                db.session.scalar(db.select(db.func.count()).where(Comparison.user_id == user_id))
                == 2
            )


def test_a_bad_file_imports_nothing_and_says_which_lines(app, admin_site):
    with app.app_context():
        sha = db.session.get(Image, 1).sha256
    text = f"kind,image_sha256,stars\nrating,{sha},4\nrating,{sha},9\nvote,abc,1\n"
    html = upload(admin_site, text, "bad.csv")
    assert "Nothing imported" in html
    assert "line 3: stars must be a whole number 1–5" in html
    assert "line 4: kind must be rating or comparison" in html
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Rating.id))) == 0
    assert "not valid JSON" in upload(admin_site, '{"kind": "rating"\n', "bad.jsonl")
    assert "not UTF-8" in upload(admin_site, b"kind,\xff\xfe\n", "x.csv")
    assert "the header lacks" in upload(admin_site, "a,b\n1,2\n", "x.csv")


def test_hostile_files_get_a_clear_400_listing_the_lines(app, admin_site):
    huge = "kind,image_sha256,stars\nrating," + "a" * 140_000 + ",4\n"  # over csv's field limit
    odd = (
        '{"kind": "rating", "source_url": ["http://x"], "stars": 3}\n'
        '{"kind": "rating", "image_sha256": {"a": 1}, "stars": 3}\n'
    )
    deep = "[" * 100_000 + "]" * 100_000 + "\n"
    for text, name, said in [
        (huge, "huge.csv", "line 2: not readable CSV"),
        (odd, "odd.jsonl", "line 1: source_url must be text, not list"),
        (odd, "odd.jsonl", "line 2: image_sha256 must be text, not dict"),
        (deep, "deep.jsonl", "line 1: JSON nested too deeply"),
    ]:
        response = admin_site.post(
            "/me/ratings/import",
            {"file": (io.BytesIO(text.encode()), name)},
            content_type="multipart/form-data",
        )
        html = response.get_data(as_text=True)
        assert response.status_code == 400 and said in html, (name, response.status_code)
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Rating.id))) == 0


def test_unknown_images_are_skipped_and_counted(app, admin_site):
    with app.app_context():
        sha = db.session.get(Image, 2).sha256
    text = (
        f'{{"kind":"rating","image_sha256":"{"0" * 64}","stars":3}}\n'
        f'{{"kind":"rating","image_sha256":"{sha}","stars":3}}\n'
    )
    html = upload(admin_site, text, "x.jsonl")
    assert "1 ratings added" in html and "1 rows skipped: image not in this pool" in html


def test_my_ratings_are_private(app, admin_site, second_site):
    seed_ratings(app)
    second_site.register("bob")
    assert "You have not rated anything yet" in second_site.client.get("/me/ratings").get_data(
        as_text=True
    )
    rows = second_site.client.get("/me/ratings.csv").get_data(as_text=True).splitlines()
    assert rows == [rows[0]]  # just the header
    job = admin_site.post("/admin/demo", {"count": 1}).headers["Location"]
    assert job.endswith("/admin/")
    assert second_site.client.get("/jobs/1").status_code == 404
    assert second_site.post("/jobs/1/cancel").status_code == 404


def test_oversized_upload_is_refused_with_a_message(app, admin_site):
    app.config["MAX_CONTENT_LENGTH"] = 2000
    html = upload(admin_site, "kind,image_sha256\n" + "x" * 5000, "big.csv")
    assert "That upload is too large." in html and "Send a smaller file." in html


def test_an_images_page_rates_it_and_changes_its_stars(app, admin_site):
    page = admin_site.client.get("/taste/images/3").get_data(as_text=True)
    assert "Not rated by you yet:" in page and 'aria-label="Rate this image"' in page
    assert admin_site.client.post("/taste/images/3/stars", data={"stars": 4}).status_code == 400
    rated = admin_site.post("/taste/images/3/stars", {"stars": 4})
    assert rated.status_code == 302 and rated.headers["Location"].endswith("/taste/images/3")
    page = admin_site.client.get("/taste/images/3").get_data(as_text=True)
    assert "Your rating:" in page and page.count('class="on" title=') == 4
    assert admin_site.post("/taste/images/3/stars", {"stars": 9}).status_code == 400
    admin_site.post("/taste/images/3/stars", {"stars": 2})
    with app.app_context():
        assert db.session.scalar(db.select(Rating.stars).where(Rating.image_id == 3)) == 2
        db.session.get(Image, 5).hidden = True
        db.session.commit()
    assert admin_site.post("/taste/images/5/stars", {"stars": 3}).status_code == 404
