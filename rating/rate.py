"""Rating pages: 1–5 stars one image at a time, and pairwise picks; htmx fragments."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from flask import Blueprint, abort, current_app, render_template, request
from flask_login import current_user, login_required
from sqlalchemy import bindparam, func, select

from rating.database import statement_by_statement
from rating.models import Comparison, Image, Job, Rating, db
from rating.picking import (
    cards,
    join_history,
    join_ids,
    next_image_ids,
    next_pair,
    parse_history,
    parse_ids,
    unrated_cards,
)
from rating.ratings import save_pick, save_rating, undo_rating
from rating.sources import demo

bp = Blueprint("rate", __name__)

RATED_COUNT = select(func.count(Rating.id)).where(Rating.user_id == bindparam("user_id"))
PICKS_COUNT = select(func.count(Comparison.id)).where(Comparison.user_id == bindparam("user_id"))
JUDGED_COUNTS = select(RATED_COUNT.scalar_subquery(), PICKS_COUNT.scalar_subquery())


def judged_counts(user_id: int) -> tuple[int, int]:
    """A person's star ratings and pairwise picks, counted in one statement (rate-and-next
    asks on every key press)."""
    rated, picked = db.session.connection().execute(JUDGED_COUNTS, {"user_id": user_id}).one()
    return rated, picked


@dataclass
class Sitting:
    """What one browser tab has seen, carried in hidden fields so tabs never clash."""

    queue: list[int] = field(default_factory=list)  # the image on screen, then the prefetched
    skipped: list[int] = field(default_factory=list)
    # What undo walks back through: (image id, the stars this page gave it). The stars make
    # undo idempotent: a replayed undo finds the rating no longer at those stars and leaves it.
    history: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_form(cls) -> Sitting:
        """Read the sitting from the submitted form."""
        depth = current_app.config["UNDO_DEPTH"]
        return cls(
            queue=parse_ids(request.form.get("queue"), 1 + current_app.config["PICK_AHEAD"]),
            skipped=parse_ids(request.form.get("skipped"), 2000),
            history=parse_history(request.form.get("history"), depth),
        )


def page_or_fragment(page: str, fragment: str, **context):
    """Render the whole page, or just the fragment when htmx asks."""
    template = fragment if request.headers.get("HX-Request") else page
    return render_template(template, **context)


def visible_image_or_404(image_id: int) -> Image:
    """Load an image that is in the pool, or answer 404."""
    image = db.session.get(Image, image_id)
    if image is None or image.hidden:
        abort(404)
    return image


def posted_stars() -> int:
    """The posted stars (1–5), else 400."""
    stars = request.form.get("stars", type=int)
    if stars not in range(1, 6):
        abort(400, description="Choose 1 to 5 stars.")
    return stars


def save_or_404(image_id: int, stars: int) -> None:
    """Save the stars for a visible image and commit; 404 when it is hidden or gone."""
    if not save_rating(current_user.id, image_id, stars):
        abort(404)


def rate_from_form(image_id: int) -> int:
    """Save the posted stars (1–5) for a visible image and return them; else 400/404."""
    stars = posted_stars()
    save_or_404(image_id, stars)
    return stars


@bp.route("/")
def home():
    """Show the start page: what to do next, for a visitor, a rater or an admin."""
    pool = db.session.scalar(select(func.count(Image.id)).where(Image.hidden.is_(False)))
    mine, loading = 0, None
    if current_user.is_authenticated:
        mine = db.session.scalar(
            select(func.count(Rating.id)).where(Rating.user_id == current_user.id)
        )
        if not pool:  # an empty pool may be one the demo pack is filling right now
            loading = db.session.scalar(select(Job).where(Job.lock_key == demo.LOCK))
    return render_template("home.html", pool=pool, mine=mine, loading=loading)


@bp.get("/rate")
@login_required
def rate_page():
    """Show the image to rate now, with the next ones prefetched."""
    return render_card(Sitting())


@bp.post("/rate/<int:image_id>")
@statement_by_statement
@login_required
def rate_image(image_id: int):
    """Save 1–5 stars for an image and show the next one.

    The next card is made first and the rating written last: the write, one atomic statement
    that commits as it runs, is the request's last round trip, and the answer goes out only
    once the rating is stored. The reads before it need no common snapshot, so each statement
    is its own transaction: no BEGIN, COMMIT or ROLLBACK (on PostgreSQL a rollback would also
    drop the connection's prepared statements)."""
    stars = posted_stars()
    sitting = Sitting.from_form()
    sitting.history = [*sitting.history, (image_id, stars)][-current_app.config["UNDO_DEPTH"] :]
    sitting.queue = [i for i in sitting.queue if i != image_id]
    card = render_card(sitting, rating=image_id)
    save_or_404(image_id, stars)
    return card


@bp.post("/rate/<int:image_id>/skip")
@login_required
def skip_image(image_id: int):
    """Skip an image for this sitting and show the next one."""
    sitting = Sitting.from_form()
    sitting.skipped.append(image_id)
    sitting.queue = [i for i in sitting.queue if i != image_id]
    return render_card(sitting)


@bp.post("/rate/undo")
@login_required
def undo():
    """Take back the last rating of this sitting and show that image again."""
    sitting = Sitting.from_form()
    if not sitting.history:
        return render_card(sitting, notice="Nothing to undo.")
    image_id, stars = sitting.history.pop()
    undone = undo_rating(current_user.id, image_id, stars)
    image = db.session.get(Image, image_id)
    shown = image is not None and not image.hidden  # taken out of the pool since: never again
    if not undone:
        notice = "Already undone, or changed since."
    else:
        given = f"you had given it {stars} star{'s' if stars != 1 else ''}"
        notice = f"Undone ({given}) — rate it again." if shown else f"Undone ({given})."
    return render_card(sitting, focus=image_id if shown else None, notice=notice)


def render_card(
    sitting: Sitting, focus: int | None = None, notice: str = "", rating: int | None = None
):
    """Render the rating card for the next image, refilling the prefetch queue. `rating` is
    the image this request is about to rate: counted as rated, never chosen."""
    user_id = current_user.id
    config = current_app.config
    rating_now = [] if rating is None else [rating]
    images = unrated_cards(user_id, [*rating_now, *sitting.queue])  # ids and images at once
    newly_rated = rating is not None and images.pop(rating, None) is not None
    queue = [i for i in sitting.queue if i in images]
    if focus is not None:
        queue = [focus, *(i for i in queue if i != focus)]
    if len(queue) <= config["PREFETCH"]:  # choosing is the costly part: choose a batch at once
        more = 1 + config["PICK_AHEAD"] - len(queue)
        queue += next_image_ids(user_id, [*sitting.skipped, *queue, *rating_now], more)
    sitting.queue = queue[: 1 + config["PICK_AHEAD"]]
    queue = queue[: 1 + config["PREFETCH"]]  # shown now, and loaded ahead by the browser
    missing = [i for i in queue if i not in images]  # just chosen, or the undone one
    images |= cards(missing)
    image = images.get(queue[0]) if queue else None
    current = None
    if image is not None and focus is not None:  # the rest of the queue is unrated by design
        current = db.session.scalar(
            select(Rating.stars).where(Rating.user_id == user_id, Rating.image_id == image.id)
        )
    rated, picked = judged_counts(user_id)
    rated += newly_rated
    to_train = config["TASTE_MIN_RATINGS"] - rated - picked  # picks count toward training too
    return page_or_fragment(
        "rate.html",
        "_rate_card.html",
        image=image,
        current=current,
        upcoming=[images[i] for i in queue[1:] if i in images],
        sitting=sitting,
        join_ids=join_ids,
        join_history=join_history,
        rated=rated,
        to_train=max(to_train, 0),
        notice=notice,
    )


@bp.get("/pairs")
@login_required
def pairs_page():
    """Show two images side by side to pick the better one."""
    return render_pair(recent=[], history=[], upcoming=None)


@bp.post("/pairs/<int:a>/<int:b>")
@login_required
def pick(a: int, b: int):
    """Store a pick between images a and b (a, b or tie) and show the next pair."""
    outcome = request.form.get("outcome")
    if outcome not in ("a", "b", "tie") or a == b:
        abort(400, description="Pick the left image, the right one, or “about the same”.")
    visible_image_or_404(a), visible_image_or_404(b)
    comparison_id = save_pick(current_user.id, a, b, outcome, request.form.get("token"))
    history = parse_ids(request.form.get("history"), current_app.config["UNDO_DEPTH"])
    if comparison_id not in history:  # a replayed pick is the same pick, listed once
        history.append(comparison_id)
    return render_pair(
        recent=parse_ids(request.form.get("recent"), 200) + [a, b],
        history=history,
        upcoming=tuple(parse_ids(request.form.get("upcoming"), 2)),
    )


@bp.post("/pairs/undo")
@login_required
def undo_pick():
    """Take back the last pick of this sitting; its pair comes back to be picked again."""
    history = parse_ids(request.form.get("history"), current_app.config["UNDO_DEPTH"])
    notice, again = "Nothing to undo.", None
    if history:
        comparison = db.session.get(Comparison, history.pop())
        if comparison is not None and comparison.user_id == current_user.id:
            again = (comparison.image_a_id, comparison.image_b_id)
            db.session.delete(comparison)
            db.session.commit()
            notice = "Undone: that pair is back — pick again."
    return render_pair(
        recent=parse_ids(request.form.get("recent"), 200),
        history=history,
        upcoming=again,
        notice=notice,
    )


def render_pair(recent: list[int], history: list[int], upcoming, notice: str = ""):
    """Render the pair card: the prefetched pair if still valid, and choose the next one."""
    user_id = current_user.id
    pair = upcoming if upcoming and len(upcoming) == 2 else None
    if (
        pair
        and db.session.scalar(
            select(func.count(Image.id)).where(Image.id.in_(pair), Image.hidden.is_(False))
        )
        != 2
    ):
        pair = None
    pair = pair or next_pair(user_id, recent)
    following = next_pair(user_id, [*recent, *pair]) if pair else None
    images = {}
    wanted = [*(pair or ()), *(following or ())]
    if wanted:
        images = {i.id: i for i in db.session.scalars(select(Image).where(Image.id.in_(wanted)))}
    picks = db.session.scalar(
        select(func.count(Comparison.id)).where(Comparison.user_id == user_id)
    )
    return page_or_fragment(
        "pairs.html",
        "_pair_card.html",
        left=images.get(pair[0]) if pair else None,
        right=images.get(pair[1]) if pair else None,
        following=[images[i] for i in following or () if i in images],
        recent=join_ids(recent[-200:]),
        history=join_ids(history),
        upcoming=join_ids(list(following or ())),
        token=secrets.token_urlsafe(16),  # names this card's pick, so a resend is the same one
        picks=picks,
        notice=notice,
    )
