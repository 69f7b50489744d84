"""civitai and URL-list imports run as jobs against a real local HTTP server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app import create_app
from rating import imports, jobs
from rating.models import Image, Job, Source, db
from tests.conftest import Site

pytest_plugins = ("tests.fake_civitai",)


@pytest.fixture
def importing(tmp_path, fake_civitai):
    """Return (app, admin Site) with civitai pointed at the fake and its host reachable."""
    app = create_app(
        {
            "TESTING": True,
            "QUEUE": "immediate",
            "SECRET_KEY": "test",
            "CIVITAI_URL": fake_civitai.url,
            "FETCH_ALLOWED_HOSTS": [fake_civitai.host],
            "FETCH_MAX_BYTES": 2**20,
        },
        instance_path=str(tmp_path / "instance"),
    )
    site = Site(app.test_client())
    site.register("admin")
    yield app, site
    with app.app_context():
        db.engine.dispose()


def last_job(app) -> Job:
    """Return the newest job."""
    with app.app_context():
        return db.session.scalar(db.select(Job).order_by(Job.id.desc()))


def civitai_refs(app) -> list[str]:
    """Return the civitai refs in the pool, sorted."""
    with app.app_context():
        return sorted(db.session.scalars(db.select(Image.source_ref)))


def test_civitai_import_pages_dedupes_and_reports(importing, fake_civitai):
    app, site = importing
    html = site.post("/admin/pool/civitai", {"target": 50, "levels": "PG"}, htmx=True).text
    assert 'data-status="succeeded"' in html, html
    tally = last_job(app).result
    assert (tally["added"], tally["duplicates"], tally["near_duplicates"]) == (4, 1, 1)
    assert tally["failed"] == 5
    reasons = " ".join(f["reason"] for f in tally["failures"])
    for expected in ("not an image file", "too large", "not an image", "loopback"):
        assert expected in reasons
    assert civitai_refs(app) == ["civitai:101", "civitai:102", "civitai:108", "civitai:112"]
    api = fake_civitai.api_requests()
    assert all(r.param("withMeta") == "true" and r.param("browsingLevel") == "1" for r in api)
    assert [r.param("cursor") for r in api[1:]] == [None, *fake_civitai.cursors[1:]]
    assert any("/width=512/" in path for path in fake_civitai.paths())  # the small rendition
    with app.app_context():
        image = db.session.scalar(db.select(Image).where(Image.source_ref == "civitai:101"))
        assert image.title == "a red to blue gradient"
        assert image.source_url.endswith("/images/101")
        assert image.meta["username"] == "alice" and image.meta["reactions"]["like"] == 12


def test_api_key_is_sent_as_a_bearer_token(importing, fake_civitai):
    app, site = importing
    site.post("/admin/pool/settings", {"civitai_api_key": "k-123"})
    site.post("/admin/pool/civitai", {"target": 1})
    assert fake_civitai.api_requests()[-1].headers["authorization"] == "Bearer k-123"


def test_stopped_import_resumes_to_exactly_the_target(importing, fake_civitai, monkeypatch):
    app, site = importing
    monkeypatch.setattr(jobs.JobProgress, "min_interval", 0.0)  # notice Cancel at once
    real_fetch = imports.fetch_page
    calls = []

    def stop_after_first_page(*args, **kwargs):
        if calls:  # the second page: press Cancel while it is being imported
            with app.app_context():
                db.session.execute(db.update(Job).values(stop_requested=True))
                db.session.commit()
        calls.append(args[2])
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(imports, "fetch_page", stop_after_first_page)
    site.post("/admin/pool/civitai", {"target": 3})
    assert last_job(app).status == "cancelled"
    assert civitai_refs(app) == ["civitai:101", "civitai:102"]
    with app.app_context():
        source = db.session.scalar(db.select(Source))
        assert source.cursor == fake_civitai.cursors[1]  # page 1 done, saved
        source_id = source.id
    monkeypatch.setattr(imports, "fetch_page", real_fetch)
    site.post(f"/admin/pool/sources/{source_id}/resume")
    assert last_job(app).status == "succeeded"
    assert civitai_refs(app) == ["civitai:101", "civitai:102", "civitai:108"]


def test_bad_civitai_queries_are_refused(importing):
    _, site = importing
    for form, words in [
        ({"target": "x"}, "target must be a whole number"),
        ({"limit": "500"}, "limit"),
        ({"sort": "Best"}, "sort"),
        ({"model_id": "12a"}, "model_id must be a whole number"),
    ]:
        response = site.post("/admin/pool/civitai", form)
        assert response.status_code == 400 and words in response.text, response.text


def test_url_list_import_and_loopback_refusal(importing, fake_civitai):
    app, site = importing
    base = fake_civitai.url
    urls = [
        f"{base}/img/a.png",
        f"{base}/img/a.png",
        f"{base}/redirect-to-loopback",
        f"{base}/img/c.png",
        f"{base}/not-an-image",
        "http://10.1.2.3/x.png",
    ]
    site.post("/admin/pool/urls", {"urls": "\n".join(urls)})
    tally = last_job(app).result
    assert (tally["found"], tally["added"], tally["failed"]) == (5, 2, 3)  # the repeat is merged
    reasons = [f["reason"] for f in tally["failures"]]
    assert any("loopback" in r for r in reasons) and any("private" in r for r in reasons)
    with app.app_context():
        assert {i.source_url for i in db.session.scalars(db.select(Image))} == {
            f"{base}/img/a.png",
            f"{base}/img/c.png",
        }


def test_loopback_is_refused_unless_the_admin_allows_it(importing, fake_civitai):
    app, site = importing
    app.config["FETCH_ALLOWED_HOSTS"] = []
    site.post("/admin/pool/urls", {"urls": f"{fake_civitai.url}/img/a.png"})
    assert "loopback" in last_job(app).result["failures"][0]["reason"]
    site.post("/admin/pool/settings", {"allow_private_urls": "on"})
    site.post("/admin/pool/urls", {"urls": f"{fake_civitai.url}/img/a.png"})
    assert last_job(app).result["added"] == 1


def test_url_lists_must_be_http(importing):
    _, site = importing
    response = site.post("/admin/pool/urls", {"urls": "file:///etc/passwd\nftp://x/y.png"})
    assert response.status_code == 400 and "Only http and https" in response.text
    assert site.post("/admin/pool/urls", {"urls": "  \n"}).status_code == 400


def test_two_imports_at_once_add_each_image_once(importing, fake_civitai):
    app, _ = importing
    urls = [f"{fake_civitai.url}/img/{name}" for name in ("a.png", "b.jpg", "c.png", "d.png")]
    with app.app_context():
        sources = [Source(kind="urls", label=f"list {n}", params={"urls": urls}) for n in (1, 2)]
        db.session.add_all(sources)
        db.session.commit()
        ids = [s.id for s in sources]
    errors = []

    def run(source_id):
        try:
            with app.app_context():
                jobs.run_here("import_urls", source_id=source_id)
        except Exception as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Image.id))) == 4
        results = [j.result for j in db.session.scalars(db.select(Job))]
        assert all(j["failed"] == 0 for j in results)
        assert sum(j["added"] for j in results) == 4
        assert sum(j["duplicates"] + j["near_duplicates"] for j in results) == 4
    store = app.config["STORAGE_ROOT"]
    assert not list(Path(store).rglob(".tmp-*"))


def test_two_imports_at_once_let_no_near_copy_in(importing):
    """Each import loaded its index before the other added anything: the lock must decide."""
    from rating.pool import ImportTally, PoolImporter
    from tests.images import encode, picture

    app, _ = importing
    original = picture(7)
    near = original.copy()
    near.putpixel((0, 0), (0, 0, 0))  # other pixels (other sha256), the same perceptual hash
    with app.app_context():
        sources = [Source(kind="urls", label=f"list {n}", params={}) for n in (1, 2)]
        db.session.add_all(sources)
        db.session.commit()
        ids = [s.id for s in sources]
    ready, tallies, errors = threading.Barrier(2), [], []

    def run(source_id, image):
        try:
            with app.app_context():
                tally = ImportTally()
                importer = PoolImporter(db.session.get(Source, source_id), tally)
                ready.wait()  # both indexes are loaded now, and both are empty
                importer.add_bytes(encode(image), f"item {source_id}")
                tallies.append(tally)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=a) for a in zip(ids, (original, near), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted((t.added, t.near_duplicates) for t in tallies) == [(0, 1), (1, 0)]
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Image.id))) == 1
