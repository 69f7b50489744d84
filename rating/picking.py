"""Which image (or pair) a person sees next."""

from __future__ import annotations

import random

from flask import current_app
from sqlalchemy import Row, bindparam, func, select

from rating.models import Comparison, Image, Rating, Source, TasteVersion, db


def parse_ids(text: str | None, limit: int) -> list[int]:
    """Read a comma-separated list of ids from a form field, keeping the last `limit` valid ones."""
    ids = [int(part) for part in (text or "").split(",") if part.strip().isdigit()]
    return ids[-limit:] if limit else []


def join_ids(ids: list[int]) -> str:
    """Write ids for a hidden form field."""
    return ",".join(str(i) for i in ids)


def parse_history(text: str | None, limit: int) -> list[tuple[int, int]]:
    """Read "image:stars" pairs from a form field, keeping the last `limit` valid ones."""
    pairs = []
    for part in (text or "").split(","):
        image, _, stars = part.strip().partition(":")
        if image.isdigit() and stars in {"1", "2", "3", "4", "5"}:
            pairs.append((int(image), int(stars)))
    return pairs[-limit:] if limit else []


def join_history(pairs: list[tuple[int, int]]) -> str:
    """Write "image:stars" pairs for a hidden form field."""
    return ",".join(f"{image}:{stars}" for image, stars in pairs)


def _unrated(user_id: int, exclude: list[int]):
    rated = select(Rating.image_id).where(Rating.user_id == user_id)
    query = select(Image.id).where(Image.hidden.is_(False), Image.id.not_in(rated))
    return query.where(Image.id.not_in(exclude)) if exclude else query


def next_image_ids(user_id: int, exclude: list[int], count: int) -> list[int]:
    """Pick up to `count` images the person has not rated: some their scorer asks for, the
    rest alternating fresh and least-rated.

    Once the person has a scorer, a share (ACTIVE_SHARE) of each batch is what would teach it
    most and what lies at the edge of their top (`active_ids`); the rest explores.
    "Fresh" comes from the newest import, so new images reach people quickly; "least-rated"
    has the fewest ratings from the crowd, so every image gathers ratings. Both break ties at
    random, so two people rating at once see different images.
    """
    wanted = round(count * float(current_app.config["ACTIVE_SHARE"]))
    asked = still_unrated(user_id, [i for i in active_ids(user_id) if i not in exclude])[:wanted]
    explored = explore_ids(user_id, exclude + asked, count - len(asked))
    chosen = []
    step = max(1, count // max(len(asked), 1))  # spread the asked-for ones through the batch
    for position in range(count):
        source = asked if asked and position % step == 0 else explored or asked
        if source:
            chosen.append(source.pop(0))
    return chosen


def _active(user_id: int) -> dict:
    """What the person's newest scorer asked for (taste_data.active_candidates), or {}."""
    metrics = db.session.scalar(
        select(TasteVersion.metrics)
        .where(TasteVersion.owner_id == user_id, TasteVersion.scorer_file.is_not(None))
        .order_by(TasteVersion.id.desc())
        .limit(1)
    )
    return (metrics or {}).get("active") or {}


def active_ids(user_id: int) -> list[int]:
    """The images the person's newest scorer asked to see rated, most informative and edge
    of top taken in turn (empty before their first scorer)."""
    active = _active(user_id)
    return in_turn(active.get("informative", []), active.get("edge_of_top", []))


def in_turn(first: list[int], second: list[int]) -> list[int]:
    """Take from two lists in turn (the longer one's rest at the end), each id once."""
    merged = [i for pair in zip(first, second, strict=False) for i in pair]
    merged += first[len(second) :] + second[len(first) :]
    return list(dict.fromkeys(merged))


def explore_ids(user_id: int, exclude: list[int], count: int) -> list[int]:
    """Up to `count` unrated images, alternating fresh and least-rated (see next_image_ids)."""
    if count <= 0:
        return []
    candidates = _unrated(user_id, exclude)
    newest_source = select(func.max(Source.id)).join(Image).where(Image.hidden.is_(False))
    fresh = db.session.scalars(
        candidates.where(Image.source_id == newest_source.scalar_subquery())
        .order_by(func.random())
        .limit(count)
    ).all()
    crowd_count = select(func.count(Rating.id)).where(Rating.image_id == Image.id).scalar_subquery()
    least_rated = db.session.scalars(
        candidates.order_by(crowd_count, func.random()).limit(count)
    ).all()
    chosen: list[int] = []
    for pair in zip(least_rated, fresh, strict=False):
        chosen.extend(i for i in pair if i not in chosen)
    chosen.extend(i for i in [*least_rated, *fresh] if i not in chosen)
    return chosen[:count]


# Built once: rate-and-next runs it on every key press, and building costs more than running.
STILL_UNRATED = _unrated(bindparam("user_id"), []).where(
    Image.id.in_(bindparam("ids", expanding=True))
)


# What a rating card shows of an image, as plain rows: the card needs no ORM objects, and rows
# cost a third of what loading images with their sources does on every key press.
CARD_IMAGE = select(
    Image.id, Image.sha256, Image.width, Image.height, Image.title, Source.kind.label("source_kind")
).join(Source)
UNRATED_CARDS = CARD_IMAGE.where(STILL_UNRATED.whereclause)
CARDS = CARD_IMAGE.where(Image.id.in_(bindparam("ids", expanding=True)))


def still_unrated(user_id: int, ids: list[int]) -> list[int]:
    """Keep the ids (in order) that are visible and not yet rated by the person."""
    if not ids:
        return []
    ok = set(db.session.scalars(STILL_UNRATED, {"user_id": user_id, "ids": ids}))
    return [i for i in ids if i in ok]


def unrated_cards(user_id: int, ids: list[int]) -> dict[int, Row]:
    """What the card shows (`CARD_IMAGE`) of the images among `ids` that are visible and not
    yet rated by the person, by id: what still_unrated keeps, loaded in the same statement."""
    return _cards(UNRATED_CARDS, {"user_id": user_id, "ids": ids}) if ids else {}


def cards(ids: list[int]) -> dict[int, Row]:
    """What the card shows (`CARD_IMAGE`) of the images `ids`, rated or not, by id."""
    return _cards(CARDS, {"ids": ids}) if ids else {}


def _cards(statement, params: dict) -> dict[int, Row]:
    return {row.id: row for row in db.session.connection().execute(statement, params)}


def next_pair(user_id: int, recent: list[int], tries: int = 8) -> tuple[int, int] | None:
    """Pick two different visible images the person has not compared yet, avoiding recent ones.

    Once the person has a scorer, ACTIVE_SHARE of the pairs are those whose outcome it finds
    closest to a coin flip; the rest are drawn at random, so every image can come up.
    """
    if random.random() < float(current_app.config["ACTIVE_SHARE"]):
        asked = coin_flip_pair(user_id, recent)
        if asked is not None:
            return asked
    pool = select(Image.id).where(Image.hidden.is_(False))
    candidates = db.session.scalars(
        pool.where(Image.id.not_in(recent)).order_by(func.random()).limit(2 * tries)
    ).all()
    if len(candidates) < 2:  # small pool: allow recent images again
        candidates = db.session.scalars(pool.order_by(func.random()).limit(2 * tries)).all()
    if len(candidates) < 2:
        return None
    done = compared_pairs(user_id, candidates)
    for a, b in zip(candidates[::2], candidates[1::2], strict=False):
        if frozenset((a, b)) not in done:
            return a, b
    a, b = random.sample(candidates, 2)  # every candidate pair was compared: repeat one
    return a, b


def coin_flip_pair(user_id: int, recent: list[int]) -> tuple[int, int] | None:
    """The first pair the person's scorer finds a coin flip that they have not compared,
    with both images visible and neither shown just now (None when there is none)."""
    pairs = [(a, b) for a, b in _active(user_id).get("coin_flips", []) if not {a, b} & set(recent)]
    if not pairs:
        return None
    ids = list({i for pair in pairs for i in pair})
    visible = set(
        db.session.scalars(select(Image.id).where(Image.id.in_(ids), Image.hidden.is_(False)))
    )
    done = compared_pairs(user_id, ids)
    return next(
        ((a, b) for a, b in pairs if {a, b} <= visible and frozenset((a, b)) not in done), None
    )


def compared_pairs(user_id: int, ids: list[int]) -> set[frozenset[int]]:
    """Return the pairs among `ids` the person has already compared."""
    rows = db.session.execute(
        select(Comparison.image_a_id, Comparison.image_b_id).where(
            Comparison.user_id == user_id,
            Comparison.image_a_id.in_(ids),
            Comparison.image_b_id.in_(ids),
        )
    )
    return {frozenset(row) for row in rows}
