"""What a taste job learns from: the person's judgements and a sample of the pool to guess at."""

from __future__ import annotations

from sqlalchemy import select

from rating.models import Comparison, Image, Rating, db
from rating.taste_data import Judged


def judge(owner: int, rated: list[int], picked: tuple[int, int] | None = None) -> None:
    for image_id in rated:
        db.session.add(Rating(user_id=owner, image_id=image_id, stars=3))
    if picked:
        a, b = picked
        db.session.add(Comparison(user_id=owner, image_a_id=a, image_b_id=b, outcome="a"))
    db.session.commit()


def unrated_ids(owner: int, sample: int) -> list[int]:
    return [image.id for image in Judged.of(owner, sample).unrated]


def test_the_sample_is_unjudged_visible_images_the_same_for_the_same_judgements(app, admin_site):
    with app.app_context():
        ids = db.session.scalars(select(Image.id).order_by(Image.id)).all()
        db.session.get(Image, ids[-1]).hidden = True
        judge(1, ids[:3], picked=(ids[3], ids[4]))
        first = unrated_ids(1, 5)
        assert len(first) == 5 and len(set(first)) == 5
        assert not set(first) & {*ids[:5], ids[-1]}  # rated, picked or out of the pool: never
        assert unrated_ids(1, 5) == first  # the same judgements, the same sample: a rerun repeats
        assert sorted(unrated_ids(1, 100)) == ids[5:-1]  # a small pool: all of what is left
        judge(1, [first[0]])
        again = unrated_ids(1, 5)
        assert first[0] not in again and len(again) == 5  # a new rating, a sample without it
