"""The crowd page: the pool, its raters, where they agree, and how my taste compares."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, current_app, render_template
from flask_login import current_user, login_required
from scipy.stats import spearmanr
from sqlalchemy import func, select

from rating.models import Comparison, Image, Rating, db

bp = Blueprint("crowd", __name__)

MIN_SHARED = 5  # fewer shared images make a correlation too noisy to show


@dataclass
class Agreement:
    rho: float | None
    n: int
    needed: int = MIN_SHARED


@dataclass
class ImageSpread:
    image: Image
    mean: float
    std: float
    n: int


def image_spreads(min_raters: int, limit: int, most_agreed: bool) -> list[ImageSpread]:
    """Return images rated by at least `min_raters` people, sorted by the spread of stars."""
    mean = func.avg(Rating.stars)
    variance = func.avg(Rating.stars * Rating.stars) - mean * mean
    order = variance.asc() if most_agreed else variance.desc()
    rows = db.session.execute(
        select(Image, mean, variance, func.count(Rating.id))
        .join(Rating, Rating.image_id == Image.id)
        .group_by(Image.id)
        .having(func.count(Rating.id) >= min_raters)
        .order_by(order, func.count(Rating.id).desc())
        .limit(limit)
    )
    return [ImageSpread(img, m, max(v, 0.0) ** 0.5, n) for img, m, v, n in rows]


def agreement_with_crowd(user_id: int) -> Agreement:
    """Spearman correlation of my stars with everyone else's mean, over images we both rated."""
    others = (
        select(Rating.image_id, func.avg(Rating.stars).label("crowd"))
        .where(Rating.user_id != user_id)
        .group_by(Rating.image_id)
        .subquery()
    )
    pairs = db.session.execute(
        select(Rating.stars, others.c.crowd)
        .join(others, others.c.image_id == Rating.image_id)
        .where(Rating.user_id == user_id)
    ).all()
    mine, crowd = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(pairs) < MIN_SHARED or len(set(mine)) < 2 or len(set(crowd)) < 2:
        return Agreement(None, len(pairs))  # correlation is undefined for constant ratings
    return Agreement(float(spearmanr(mine, crowd).statistic), len(pairs))


@bp.get("/crowd")
@login_required
def overview():
    """Show pool size, raters, the most and least agreed-on images, and my agreement."""
    min_raters = current_app.config["CROWD_MIN_RATERS"]
    return render_template(
        "crowd.html",
        pool=db.session.scalar(select(func.count(Image.id)).where(Image.hidden.is_(False))),
        raters=db.session.scalar(select(func.count(func.distinct(Rating.user_id)))),
        total=db.session.scalar(select(func.count(Rating.id))),
        picks=db.session.scalar(  # of pool images: not people's private blind-check pairs
            select(func.count(Comparison.id))
            .join(Image, Comparison.image_a_id == Image.id)
            .where(Image.hidden.is_(False))
        ),
        agreed=image_spreads(min_raters, 8, most_agreed=True),
        disputed=image_spreads(min_raters, 8, most_agreed=False),
        agreement=agreement_with_crowd(current_user.id),
    )
