"""Folder imports, uploads, hiding images and the site settings."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rating.models import Image, Job, Rating, Source, db, site_setting
from rating.ratings import save_rating
from tests.images import encode, picture


def make_folder(root):
    """Write a folder tree of images: valid ones, a copy, a near-copy, junk."""
    (root / "sub" / "deeper").mkdir(parents=True)
    encode_to = {
        "a.png": encode(picture(1)),
        "sub/b.jpg": encode(picture(2), "JPEG", quality=92),
        "sub/deeper/c.webp": encode(picture(3), "WEBP"),
        "sub/d.gif": encode(picture(4).convert("P")),
        "copy-of-a.png": encode(picture(1)),
        "sub/a-resized.jpg": encode(picture(1).resize((300, 300)), "JPEG", quality=90),
        "broken.png": encode(picture(5))[:300],
        "tiny.png": encode(picture(6, (64, 64))),
        "notes.txt": b"not an image",
    }
    for name, data in encode_to.items():
        (root / name).write_bytes(data)


def test_folder_import_from_the_cli(app, runner, tmp_path):
    make_folder(tmp_path / "pics")
    result = runner.invoke(args=["images", "import-folder", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    with app.app_context():
        job = db.session.scalar(db.select(Job))
        tally = job.result
        assert (tally["found"], tally["added"], tally["failed"]) == (8, 4, 2)
        assert tally["duplicates"] + tally["near_duplicates"] == 2
        refs = set(db.session.scalars(db.select(Image.source_ref)))
        assert refs == {"a.png", "sub/b.jpg", "sub/deeper/c.webp", "sub/d.gif"}
    assert "broken.png: not a readable image" in result.output
    assert "tiny.png: too small" in result.output


def test_folder_import_from_the_admin_page(app, site, tmp_path):
    site.register("admin")
    make_folder(tmp_path / "pics")
    html = site.post("/admin/pool/folder", {"path": str(tmp_path / "pics")}, htmx=True).get_data(
        as_text=True
    )
    assert 'data-status="succeeded"' in html and "added <b>4</b>" in html
    assert "2 failed — why" in html and "too small" in html
    missing = site.post("/admin/pool/folder", {"path": str(tmp_path / "nope")})
    assert missing.status_code == 400 and "is not a folder on the server" in missing.text


def test_resume_skips_what_is_there(app, site, tmp_path):
    site.register("admin")
    make_folder(tmp_path / "pics")
    site.post("/admin/pool/folder", {"path": str(tmp_path / "pics")})
    with app.app_context():
        source = db.session.scalar(db.select(Source))
        source.position = 0  # as if it had stopped at the start
        db.session.commit()
        source_id = source.id
    site.post(f"/admin/pool/sources/{source_id}/resume")
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Image.id))) == 4
        last = db.session.scalar(db.select(Job).order_by(Job.id.desc()))
        assert last.result["added"] == 0 and last.result["duplicates"] >= 2


def test_hidden_images_leave_the_pool_but_keep_ratings(app, admin_site, client):
    with app.app_context():
        save_rating(1, 1, 5)
    response = admin_site.post("/admin/pool/images/1/hidden", {"hidden": "1"}, htmx=True)
    assert response.status_code == 200 and "Show" in response.text
    with app.app_context():
        assert db.session.get(Image, 1).hidden
        assert db.session.scalar(db.select(Rating.stars).where(Rating.image_id == 1)) == 5
    page = client.get("/admin/pool/sources/1").text
    assert "hidden-image" in page
    admin_site.post("/admin/pool/images/1/hidden", {"hidden": "0"})
    with app.app_context():
        assert not db.session.get(Image, 1).hidden


def upload(site, files):
    """Post files to the upload form as htmx would."""
    data = {"files": [(io.BytesIO(body), name) for name, body in files]}
    return site.post("/upload", data, htmx=True, content_type="multipart/form-data")


def test_uploads_need_the_admin_to_allow_them(app, site, second_site):
    site.register("admin")
    second_site.register("bob")
    refused = upload(second_site, [("a.png", encode(picture(1)))])
    assert refused.status_code == 403 and "ask an admin" in refused.text
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    app.config["UPLOAD_MAX_FILE_BYTES"] = len(encode(picture(1))) + 1000
    files = [
        ("a.png", encode(picture(1))),
        ("same.png", encode(picture(1))),
        ("big.png", encode(picture(7, (300, 300)), compress_level=0)),
        ("bad.jpg", b"\xff\xd8 nope"),
    ]
    report = upload(second_site, files).text
    assert "added <b>1</b>" in report and "duplicates <b>1</b>" in report
    assert "big.png" in report and "KiB limit" in report
    assert "bad.jpg" in report and "not an image file (JPEG, PNG, WebP or GIF)" in report
    assert "BytesIO" not in report  # no Python internals in what a person reads
    with app.app_context():
        source = db.session.scalar(db.select(Source).where(Source.kind == "upload"))
        assert source.created_by_id == 2 and len(source.images) == 1


def test_upload_count_limit(app, site):
    site.register("admin")
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    app.config["UPLOAD_MAX_FILES"] = 2
    response = upload(site, [(f"{i}.png", encode(picture(i))) for i in range(3)])
    assert response.status_code == 400 and "at most 2 files" in response.text


def test_one_upload_decodes_only_so_many_pixels(app, site, monkeypatch):
    import rating.pool

    site.register("admin")
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    app.config["UPLOAD_MAX_PIXELS"] = 2 * 320 * 320 + 100  # room for two 320×320 pictures
    decoded, real = [], rating.pool.open_image
    monkeypatch.setattr(rating.pool, "open_image", lambda d, **k: decoded.append(1) or real(d, **k))
    report = upload(site, [(f"{i}.png", encode(picture(i))) for i in range(3)]).text
    assert "added <b>2</b>" in report and "over this upload&#39;s" in report and "2.png" in report
    assert len(decoded) == 2  # the third was refused from its header, never decoded


def test_uploads_are_decoded_by_a_job_not_the_request(app, site, monkeypatch):
    import rating.pool
    from rating import jobs

    site.register("admin")
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    queued, decoded, real = [], [], rating.pool.open_image
    monkeypatch.setitem(app.extensions, "run_job_task", queued.append)  # a queue nobody serves
    monkeypatch.setattr(rating.pool, "open_image", lambda d, **k: decoded.append(1) or real(d, **k))
    answer = upload(site, [("a.png", encode(picture(1))), ("b.png", encode(picture(2)))]).text
    assert 'data-status="queued"' in answer and "Upload · job" in answer
    assert decoded == [] and len(queued) == 1  # answered before any decoding
    staged = Path(app.config["STORAGE_ROOT"]) / "uploads"
    assert len(list(staged.rglob("*"))) == 3  # the upload's folder and its two files
    with app.app_context():
        jobs.run_job(queued[0])
        job = db.session.get(Job, queued[0])
        assert job.status == "succeeded" and job.result["added"] == 2
    assert len(decoded) == 2 and list(staged.iterdir()) == []  # nothing left behind


def test_one_person_may_upload_only_so_many_pixels_an_hour(app, site, second_site):
    site.register("admin")
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    second_site.register("bob")
    app.config["UPLOAD_MAX_PIXELS_PER_HOUR"] = 320 * 320 * 5 // 2  # two and a half pictures
    first = upload(second_site, [(f"{i}.png", encode(picture(i))) for i in range(3)]).text
    assert "added <b>2</b>" in first and "over this hour&#39;s 0.0512 megapixels" in first
    over = upload(second_site, [("3.png", encode(picture(3)))])
    assert over.status_code == 429
    assert "Nothing was added. 3.png: 0.1 megapixels, over this hour&#39;s" in over.text
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Source.id))) == 1  # none for that one
    assert "added <b>1</b>" in upload(site, [("5.png", encode(picture(5)))]).text  # not shared


def test_api_key_is_never_shown_back_in_full(app, site, client):
    site.register("admin")
    site.post("/admin/pool/settings", {"civitai_api_key": "secret-key-1234abcd"})
    page = client.get("/admin/").text
    assert "secret-key-1234abcd" not in page and "…abcd" in page
    site.post("/admin/pool/settings", {"civitai_api_key": ""})  # empty keeps the key
    with app.app_context():
        assert site_setting("civitai_api_key") == "secret-key-1234abcd"
    site.post("/admin/pool/settings", {"clear_api_key": "on"})
    with app.app_context():
        assert site_setting("civitai_api_key") == ""


def test_hidden_images_are_not_served_and_undo_does_not_bring_them_back(
    app, admin_site, second_site
):
    second_site.register("bob")
    html = second_site.client.get("/rate").text
    image_id = int(re.search(r'data-image-id="(\d+)"', html).group(1))
    fields = dict(re.findall(r'name="(queue|skipped|history)" value="([^"]*)"', html))
    rated = second_site.post(f"/rate/{image_id}", fields | {"stars": 4}, htmx=True).text
    with app.app_context():
        sha = db.session.get(Image, image_id).sha256
    urls = (f"/img/{sha}.jpg", f"/img/{sha}/original")

    def codes(site) -> list[int]:
        responses = [site.client.get(url) for url in urls]
        for response in responses:
            response.close()
        return [response.status_code for response in responses]

    assert codes(second_site) == [200, 200]
    admin_site.post(f"/admin/pool/images/{image_id}/hidden", {"hidden": "1"})
    assert codes(second_site) == [404, 404]
    assert codes(admin_site) == [200, 200]  # an admin still sees it, to unhide it
    fields = dict(re.findall(r'name="(queue|skipped|history)" value="([^"]*)"', rated))
    undone = second_site.post("/rate/undo", fields, htmx=True).text
    assert f'data-image-id="{image_id}"' not in undone and "Undone" in undone


def test_an_import_that_added_nothing_says_so_and_the_admin_page_lists_only_imports(app, site):
    site.register("admin")
    site.post("/admin/pool/settings", {"allow_uploads": "on"})
    report = upload(site, [("notes.txt", b"not an image"), ("fake.jpg", b"\xff\xd8 nope")]).text
    assert "nothing added" in report and 'class="status-succeeded"' not in report
    assert "added <b>0</b>" in report and "failed <b>2</b>" in report
    with app.app_context():
        db.session.add(Job(kind="train_taste", owner_id=1, status="succeeded", message="Done."))
        db.session.commit()
    page = site.client.get("/admin/").get_data(as_text=True)
    assert "Upload · job" in page and "Train my taste · job" not in page  # on My taste
