"""Writing ratings: one upsert that survives double clicks, and undo."""

from __future__ import annotations

import functools

from sqlalchemy import bindparam, case, select
from sqlalchemy.dialects import postgresql, sqlite

from rating.models import Rating, db, utcnow


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


def undo_rating(user_id: int, image_id: int) -> int | None:
    """Undo the last change to a rating: restore the old stars or remove a new rating.

    Returns the stars the image has afterwards (None: unrated).
    """
    rating = db.session.scalar(
        select(Rating).where(Rating.user_id == user_id, Rating.image_id == image_id)
    )
    if rating is None:
        return None
    if rating.undo_stars is None:
        db.session.delete(rating)
        stars = None
    else:
        rating.stars, rating.undo_stars, rating.updated_at = rating.undo_stars, None, utcnow()
        stars = rating.stars
    db.session.commit()
    return stars
