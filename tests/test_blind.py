"""The blind check: "which do you prefer?" between base and LoRA pictures, unlabelled, private.

These tests give a version pairs of pictures made here (no training), then drive the check
through HTTP as its owner would; tests/test_blind_rater.py runs it on a really trained LoRA.
"""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from rating import blind
from rating.models import Comparison, Image, Job, TasteVersion, User, db
from tests.conftest import Site
from trainer.demo_art import render_demo_image

PAIRS = 4


def checkable_version(app, username: str, pairs: int = PAIRS) -> TasteVersion:
    """Give `username` a taste version with blind pairs of demo-art pictures (the LoRA's side
    drawn at random), as a trained version's results phase would."""
    with app.app_context():
        owner = db.session.scalar(select(User).where(User.username == username))
        owner.last_taste_number += 1  # numbered as a train_taste job numbers it
        number = owner.last_taste_number
        found = TasteVersion(owner_id=owner.id, number=number, base_model="demo", metrics={})
        db.session.add(found)
        db.session.flush()
        source = blind.generated_source(found)
        specs = blind.plan(["a pastel mandala", "a grainy vivid landscape"], pairs, [1.0])
        made = [
            blind.new_pair(
                spec,
                blind.keep_picture(render_demo_image(2 * k, seed=5), source, spec["prompt"]),
                blind.keep_picture(render_demo_image(2 * k + 1, seed=5), source, spec["prompt"]),
            )
            for k, spec in enumerate(specs)
        ]
        found.metrics = {"blind": {"pairs": made, "strengths": [1.0], "identical": 0}}
        db.session.commit()
        db.session.expunge_all()
        return found


@pytest.fixture
def version(app, admin_site) -> TasteVersion:
    """The admin's taste version with PAIRS blind pairs."""
    return checkable_version(app, "admin")


def answer(site: Site, version: TasteVersion, index: int, pick: str):
    """Judge pair `index` as the owner would: the LoRA's side, the base's side, or a tie."""
    pair = version.metrics["blind"]["pairs"][index]
    lora_side, base_side = ("a", "b") if pair["lora_left"] else ("b", "a")
    outcome = {"lora": lora_side, "base": base_side, "tie": "tie"}[pick]
    url = f"/taste/versions/{version.number}/blind/{index}"
    return site.post(url, {"outcome": outcome}, htmx=True)


def test_the_owner_judges_every_pair_unlabelled_and_gets_a_win_rate(app, admin_site, version):
    url = f"/taste/versions/{version.number}/blind/"
    page = admin_site.client.get(url).get_data(as_text=True)
    card = page.split('id="blind-card"')[1]
    assert "Pair 1 of 4" in card and 'data-keys="ArrowLeft"' in card and "ArrowDown" in card
    assert "base" not in card.lower() and "lora" not in card.lower()  # nothing says which
    for side in ("left", "right"):
        with admin_site.client.get(f"{url}0/{side}.png") as sent:
            assert sent.status_code == 200 and sent.data.startswith(b"\x89PNG")
    for index, pick in enumerate(("lora", "base", "tie", "lora")):
        done = answer(admin_site, version, index, pick)
        assert done.status_code == 200
    result = done.get_data(as_text=True)
    assert "in <b>2.5 of 4</b>" in result and "<b>62%</b>, 95% CI 22–91%" in result  # a tie is half
    assert "Too close to call from 4 pairs" in result

    # Done: each pair shows which side was the LoRA's, and what was picked.
    reveal = result.split('class="reveal"')[1]
    for index, pick in enumerate(("lora", "base", "tie", "lora")):
        row = reveal.split("<li ")[index + 1]
        lora_side = "left" if version.metrics["blind"]["pairs"][index]["lora_left"] else "right"
        assert f'{lora_side}: your taste LoRA"' in row
        assert f'data-picked="{ {"tie": "same"}.get(pick, pick) }"' in row
    assert "Which was which" not in card  # nothing revealed while pairs are left

    # A resent pick changes nothing: one answer per pair.
    again = answer(admin_site, version, 1, "lora").get_data(as_text=True)
    assert "in <b>2.5 of 4</b>" in again
    with app.app_context():
        picks = db.session.scalars(select(Comparison).order_by(Comparison.id)).all()
        assert len(picks) == PAIRS  # stored as comparisons: the next version learns from them
        assert all(db.session.get(Image, c.image_a_id).hidden for c in picks)  # not in the pool
    listed = admin_site.client.get("/taste/").get_data(as_text=True)
    assert "62% <small" in listed  # the version list shows the win rate
    shown = admin_site.client.get(f"/taste/versions/{version.number}").get_data(as_text=True)
    assert "you preferred this LoRA in <b>2.5 of 4</b>" in shown
    assert "Too close to call: judge more pairs</a>" in shown  # the way on, from the version

    # Undo takes back the latest pick, and that pair comes back.
    undone = admin_site.post(f"{url}undo", htmx=True).get_data(as_text=True)
    assert "Pair 4 of 4" in undone and "Undone" in undone
    with app.app_context():
        assert db.session.scalar(select(func.count(Comparison.id))) == PAIRS - 1


def test_a_clear_preference_reads_as_more_than_chance():
    assert blind.wilson(9, 12) == pytest.approx((0.468, 0.911), abs=0.001)  # the example
    low, high = blind.wilson(12, 12)
    assert low > 0.5 and high == pytest.approx(1.0)
    assert blind.wilson(0, 0) == (0.0, 1.0)


def test_nobody_else_sees_or_judges_the_check(app, version, second_site):
    second_site.register("bob")
    url = f"/taste/versions/{version.number}/blind/"
    assert second_site.client.get(url).status_code == 404
    assert second_site.client.get(f"{url}0/left.png").status_code == 404
    assert second_site.post(f"{url}0", {"outcome": "a"}).status_code == 404
    with app.app_context():  # the pictures are hidden: not served by the pool's own routes
        image = db.session.scalar(select(Image).where(Image.hidden.is_(True)))
    assert second_site.client.get(f"/img/{image.sha256}.jpg").status_code == 404
    assert second_site.client.get(f"/taste/images/{image.id}").status_code == 404


def test_generated_pictures_stay_out_of_the_pool_and_the_admin_pages(app, admin_site, version):
    admin = admin_site.client.get("/admin/").get_data(as_text=True)
    assert "Blind check of taste version" not in admin
    with app.app_context():
        image = db.session.scalar(select(Image).where(Image.hidden.is_(True)))
    assert admin_site.client.get(f"/admin/sources/{image.source_id}").status_code == 404
    shown = admin_site.post(f"/admin/images/{image.id}/hidden", {"hidden": "0"})
    assert shown.status_code == 404  # an admin can't put someone's LoRA pictures in the pool
    rate = admin_site.client.get("/rate").get_data(as_text=True)
    assert image.sha256 not in rate


def test_a_bad_pick_is_refused_with_the_reason(app, admin_site, version):
    url = f"/taste/versions/{version.number}/blind/"
    refused = admin_site.post(f"{url}0", {"outcome": "left"})
    assert refused.status_code == 400 and "Pick the left picture" in refused.get_data(as_text=True)
    assert admin_site.post(f"{url}{PAIRS}", {"outcome": "a"}).status_code == 400
    assert admin_site.post(f"{url}0", {"outcome": "a"}, headers={}).status_code == 200
    client = app.test_client()  # signed out
    assert client.get(url).status_code in (302, 401)


def test_a_check_needs_the_csrf_token(app, admin_site, version):
    raw = admin_site.client.post(f"/taste/versions/{version.number}/blind/0", data={"outcome": "a"})
    assert raw.status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count(Comparison.id))) == 0


def test_the_strength_checked_is_the_recommended_one_else_the_one_scored_best():
    lora = {"scores_by_strength": {"1": 3.1, "0.5": 3.4, "-1": 2.0}}
    assert blind.chosen_strengths(lora, []) == [0.5]
    assert blind.chosen_strengths(lora, [0.5, 1]) == [0.5, 1.0]
    assert blind.chosen_strengths({}, []) == [1.0]
    # what the evaluation's curve recommends (between its strengths) goes first
    assert blind.chosen_strengths({**lora, "recommended_strength": 0.7}, []) == [0.7]
    specs = blind.plan(["p", "q", "r"], 5, [0.5, 1.0])
    assert [s["prompt"] for s in specs] == ["p", "q", "r", "p", "q"]
    assert len({s["seed"] for s in specs}) == 5 and {s["strength"] for s in specs} == {0.5, 1.0}


def test_blind_picks_stay_the_owners_in_exports_and_out_of_the_crowds_count(
    app, admin_site, version, second_site
):
    for index in range(PAIRS):
        answer(admin_site, version, index, "lora")
    crowd = admin_site.client.get("/crowd").get_data(as_text=True)
    assert "<b>0</b><span>pairwise picks</span>" in crowd  # private pictures: not the crowd's
    exported = admin_site.client.get("/me/ratings.csv").get_data(as_text=True)
    assert exported.count("\ncomparison,") == PAIRS  # their own picks, in their own file
    second_site.register("bob")
    data = {"file": (io.BytesIO(exported.encode()), "admin.csv")}
    html = second_site.post(
        "/me/ratings/import", data, content_type="multipart/form-data", follow_redirects=True
    ).get_data(as_text=True)
    # the admin's blind-check pictures aren't bob's to judge: as if they weren't there
    assert "0 picks added" in html and f"{PAIRS} rows skipped: image not in this pool" in html
    with app.app_context():
        bobs = select(func.count(Comparison.id)).where(Comparison.user_id == 2)
        assert db.session.scalar(bobs) == 0


def test_when_the_check_is_done_more_pairs_can_be_asked_for_by_the_owner_alone(
    app, admin_site, version, second_site
):
    url = f"/taste/versions/{version.number}/blind/"
    for index, pick in enumerate(("lora", "base", "lora", "base")):
        done = answer(admin_site, version, index, pick).get_data(as_text=True)
    assert "Too close to call from 4 pairs" in done
    more = app.config["TASTE_BLIND_PAIRS"]
    assert f"judge {more} more and the verdict is made from all {PAIRS + more}" in done
    assert f'hx-post="{url}more"' in done and 'data-keys="m"' in done
    assert admin_site.client.post(f"{url}more").status_code == 400  # no CSRF token
    second_site.register("bob")
    assert second_site.post(f"{url}more").status_code == 404  # not bob's version
    with app.app_context():
        assert db.session.scalar(select(func.count(Job.id)).where(Job.kind == "blind_pairs")) == 0

    # This version has no LoRA to draw with (made by hand): the job fails and says why, and
    # the button is there to try again.
    failed = admin_site.post(f"{url}more", htmx=True).get_data(as_text=True)
    assert "More pairs could not be drawn. Failed: " in failed and "no blind check to" in failed
    assert f"Judge {more} more pairs" in failed
    with app.app_context():
        job = db.session.scalar(select(Job).where(Job.kind == "blind_pairs"))
        assert (job.kind, job.status, job.lock_key) == ("blind_pairs", "failed", None)
        assert job.params == {"version_id": version.id, "pairs": more}


def test_more_pairs_go_on_after_the_prompts_and_seeds_already_drawn(app, admin_site, version):
    with app.app_context():
        found = db.session.get(TasteVersion, version.id)
        found.metrics = {"blind": {**found.metrics["blind"], "identical": 2}}
        assert blind.drawn_so_far(found) == PAIRS + 2
        source = blind.generated_source(found)
        assert blind.generated_source(found).id == source.id  # one source per version
    first = blind.plan(["p", "q", "r"], 3, [1.0])
    both = blind.plan(["p", "q", "r"], 6, [1.0])
    assert first + blind.plan(["p", "q", "r"], 3, [1.0], start=3) == both
    assert len({s["seed"] for s in both}) == 6


def test_a_version_deleted_while_its_pairs_are_drawn_fails_the_job_with_that_reason(
    app, admin_site, version, monkeypatch
):
    from rating import blind_jobs
    from rating.jobs import JobProgress

    def drawn_while_deleted(_base, drawn_for, _specs, _progress):
        db.session.delete(db.session.get(TasteVersion, drawn_for.id))
        db.session.commit()
        return [], 0

    monkeypatch.setattr(blind_jobs, "draw", drawn_while_deleted)
    with app.app_context():
        found = db.session.get(TasteVersion, version.id)
        found.lora_dir = "lora"  # as a trained version has; `draw` stands in for the drawing
        params = {"version_id": found.id, "pairs": 2}
        job = Job(kind="blind_pairs", owner_id=found.owner_id, params=params)
        db.session.add(job)
        db.session.commit()
        with pytest.raises(RuntimeError, match="deleted while its pairs were drawn"):
            blind_jobs.draw_more_pairs(job, JobProgress(job))


def test_drawing_pairs_counts_both_sides_on_one_bar_that_never_goes_back(
    app, admin_site, version, monkeypatch
):
    from types import SimpleNamespace

    from rating import blind_jobs
    from trainer import sample

    def drawn(_base, groups, *, lora, strength, steps, progress, should_stop):
        made = []
        for n, _group in enumerate(groups, start=1):
            progress(n, len(groups), None)
            made.append(SimpleNamespace(image=render_demo_image(n + 10 * bool(lora), seed=3)))
        return made

    class Progress:
        def __init__(self):
            self.reports = []

        def report(self, done, total, message):
            self.reports.append((done, total, message))

        def check(self):
            pass

        def should_stop(self):
            return False

    monkeypatch.setattr(sample, "drawn", drawn)
    progress = Progress()
    with app.app_context():
        found = db.session.get(TasteVersion, version.id)
        found.lora_dir = "lora"
        specs = blind.plan(["a pastel mandala", "a grainy vivid landscape"], 3, [1.0])
        pairs, same = blind_jobs.draw(None, found, specs, progress)
    assert [(done, total) for done, total, _ in progress.reports] == [(n, 6) for n in range(1, 7)]
    assert progress.reports[3][2] == "blind check, LoRA at 1: pair 1 of 3"
    assert len(pairs) == 3 and same == 0
