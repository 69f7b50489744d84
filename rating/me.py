"""My ratings: the grid, the histogram, changing a rating, export and import."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import func, select

from rating import ratings_io
from rating.models import Comparison, Rating, db
from rating.rate import rate_from_form

bp = Blueprint("me", __name__, url_prefix="/me")

EXPORTS = {
    "csv": ("text/csv", ratings_io.to_csv),
    "jsonl": ("application/jsonl", ratings_io.to_jsonl),
}


def star_histogram(user_id: int) -> dict[int, int]:
    """Count the person's ratings per star value, 1 to 5."""
    rows = db.session.execute(
        select(Rating.stars, func.count()).where(Rating.user_id == user_id).group_by(Rating.stars)
    )
    counts = dict.fromkeys(range(1, 6), 0)
    counts.update(dict(rows.all()))
    return counts


@bp.get("/ratings")
@login_required
def ratings():
    """Show my ratings as a grid, filterable by stars, with counts and a histogram."""
    stars = request.args.get("stars", type=int)
    page = max(request.args.get("page", 1, type=int), 1)
    query = select(Rating).where(Rating.user_id == current_user.id)
    if stars in range(1, 6):
        query = query.where(Rating.stars == stars)
    per_page = current_app.config["RATINGS_PER_PAGE"]
    pager = db.paginate(
        query.order_by(Rating.updated_at.desc(), Rating.id.desc()),
        page=page,
        per_page=per_page,
        error_out=False,
    )
    histogram = star_histogram(current_user.id)
    picks = db.session.scalar(
        select(func.count(Comparison.id)).where(Comparison.user_id == current_user.id)
    )
    return render_template(
        "me/ratings.html",
        pager=pager,
        stars=stars,
        histogram=histogram,
        picks=picks,
    )


@bp.post("/ratings/<int:image_id>")
@login_required
def change(image_id: int):
    """Change (or set) my stars for one image; answer with its tile."""
    rate_from_form(image_id)
    rating = db.session.scalar(
        select(Rating).where(Rating.user_id == current_user.id, Rating.image_id == image_id)
    )
    stars = request.form.get("filter", type=int)
    if not request.headers.get("HX-Request"):
        return redirect(url_for("me.ratings", stars=stars))
    tile = render_template("me/_tile.html", rating=rating, stars=stars)
    histogram = star_histogram(current_user.id)
    oob = render_template("me/_histogram.html", histogram=histogram, stars=stars, oob=True)
    return tile + oob


@bp.get("/ratings.<fmt>")
@login_required
def export(fmt: str):
    """Download my ratings and picks as CSV or JSON Lines."""
    if fmt not in EXPORTS:
        abort(404)
    mimetype, write = EXPORTS[fmt]
    body = write(ratings_io.export_rows(current_user.id))
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    name = f"tastebud-ratings-{current_user.username}-{stamp}.{fmt}"
    return Response(
        body, mimetype=mimetype, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@bp.post("/ratings/import")
@login_required
def import_ratings():
    """Import ratings and picks from a CSV or JSON Lines file; all or nothing."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        flash("Choose a .csv or .jsonl file to import.")
        return redirect(url_for("me.ratings"))
    try:
        text = upload.read().decode("utf-8")
        items = ratings_io.validate(ratings_io.parse(text, upload.filename))
        report = ratings_io.apply(current_user.id, items)
    except UnicodeDecodeError:
        flash("Nothing imported: the file is not UTF-8 text. Export it again as CSV or JSONL.")
        return ratings(), 400  # the page itself, with the reason: nothing to redirect to
    except ratings_io.ImportRejected as exc:
        flash(f"Nothing imported; fix these and try again: {exc}")
        return ratings(), 400
    flash(f"Imported {upload.filename}: {report.summary()}")
    return redirect(url_for("me.ratings"))
