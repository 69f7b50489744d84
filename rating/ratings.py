"""Writing ratings and picks so double clicks and replays count once, and undo."""

from __future__ import annotations

import functools

from sqlalchemy import bindparam, case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from rating.models import Comparison, Rating, db, utcnow


@functools.cache
def _upsert(dialect: str):
    """Build the rating upsert once per dialect; rate-and-next runs it on every key press."""
    insert = (postgresql if dialect == "postgresql" else sqlite).insert(Rating.__table__)
    statement = insert.values(
        user_id=bindparam("user_id"),
        image_id=bindparam("image_id"),
        stars=bindparam("stars"),
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    table = Rating.__table__.c
    return statement.on_conflict_do_update(
        index_elements=["user_id", "image_id"],
        set_={
            "undo_stars": case(
                (table.stars == statement.excluded.stars, table.undo_stars), else_=table.stars
            ),
            "stars": statement.excluded.stars,
            "updated_at": statement.excluded.updated_at,
        },
    )


def save_rating(user_id: int, image_id: int, stars: int) -> None:
    """Store (or change) a person's stars for an image and commit at once.

    One INSERT … ON CONFLICT statement, so two clicks racing each other cannot both insert.
    The old stars go to `undo_stars` unless they are the same (a double click keeps undo useful).
    """
    statement = _upsert(db.session.get_bind().dialect.name)
    params = {"user_id": user_id, "image_id": image_id, "stars": stars, "now": utcnow()}
    db.session.execute(statement, params)
    db.session.commit()


def save_pick(user_id: int, a: int, b: int, outcome: str, token: str | None) -> int:
    """Store a pick between images a and b once per card token; return the comparison's id.

    The same token sent again (a double click, a retried request) stores nothing new: the
    database's unique (user, token) constraint decides, so even two at once make one row.
    """
    token = (token or "")[:32] or None  # no token (an old page): every pick counts
    comparison = Comparison(
        user_id=user_id, image_a_id=a, image_b_id=b, outcome=outcome, token=token
    )
    db.session.add(comparison)
    try:
        db.session.commit()
        return comparison.id
    except IntegrityError:
        db.session.rollback()
        mine = select(Comparison.id).where(Comparison.user_id == user_id)
        return db.session.scalar(mine.where(Comparison.token == token))


def undo_rating(user_id: int, image_id: int, stars: int) -> bool:
    """Undo the change that gave an image `stars`: restore the old stars or remove the rating.

    Idempotent: only a rating still at `stars` is undone, so a replayed or double-sent undo
    finds it changed and leaves it alone. Returns whether anything was undone.
    """
    rating = db.session.scalar(
        select(Rating).where(Rating.user_id == user_id, Rating.image_id == image_id)
    )
    if rating is None or rating.stars != stars:
        return False
    if rating.undo_stars is None:
        db.session.delete(rating)
    else:
        rating.stars, rating.undo_stars, rating.updated_at = rating.undo_stars, None, utcnow()
    db.session.commit()
    return True
