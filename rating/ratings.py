"""Writing ratings and picks so double clicks and replays count once, and undo."""

from __future__ import annotations

import functools

from sqlalchemy import bindparam, case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from rating.database import write_turn
from rating.models import Comparison, Image, Rating, db, utcnow


@functools.cache
def _upsert(dialect: str):
    """Build the rating upsert once per dialect; rate-and-next runs it on every key press.

    It inserts from a SELECT of the image that is still in the pool, so rating a hidden or
    missing image writes nothing, in the same statement (typed parameters: PostgreSQL must
    know what a bare parameter in a SELECT list is)."""
    insert = (postgresql if dialect == "postgresql" else sqlite).insert(Rating.__table__)
    table = Rating.__table__.c
    now = bindparam("now", type_=table.created_at.type)
    visible = select(
        bindparam("user_id", type_=table.user_id.type),
        Image.id,
        bindparam("stars", type_=table.stars.type),
        now,
        now,
    ).where(Image.id == bindparam("image_id"), Image.hidden.is_(False))
    statement = insert.from_select(
        ["user_id", "image_id", "stars", "created_at", "updated_at"], visible
    )
    upsert = statement.on_conflict_do_update(
        index_elements=["user_id", "image_id"],
        set_={
            "undo_stars": case(
                (table.stars == statement.excluded.stars, table.undo_stars), else_=table.stars
            ),
            "stars": statement.excluded.stars,
            "updated_at": statement.excluded.updated_at,
        },
    )
    return upsert.returning(table.id)  # a row when stored (cursor rowcounts vary by driver)


def save_rating(user_id: int, image_id: int, stars: int) -> bool:
    """Store (or change) a person's stars for an image in the pool and commit at once; return
    whether it was stored (False: the image is hidden or gone).

    One INSERT … ON CONFLICT statement, so two clicks racing each other cannot both insert.
    The old stars go to `undo_stars` unless they are the same (a double click keeps undo useful).
    """
    statement = _upsert(db.session.get_bind().dialect.name)
    params = {"user_id": user_id, "image_id": image_id, "stars": stars, "now": utcnow()}
    with write_turn():
        stored = db.session.connection().execute(statement, params).first() is not None
        db.session.commit()
    return stored


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
        with write_turn():
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
    with write_turn():
        db.session.commit()
    return True
