"""Admin pages: the sources overview, the demo pack, job progress, and people."""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user
from sqlalchemy import func, select

from rating import jobs
from rating.auth import admin_required
from rating.crowd_jobs import crowd_model_info
from rating.job_kinds import KINDS
from rating.job_views import job_widget
from rating.models import (
    GENERATED,
    Image,
    Job,
    Rating,
    Source,
    User,
    db,
    get_or_404,
    site_setting,
)
from rating.rate import page_or_fragment
from rating.sources import demo
from rating.sources.civitai import LEVELS, PERIODS, SORTS

bp = Blueprint("admin", __name__, url_prefix="/admin")

MAX_DEMO_PACK = 5000


IMPORT_KINDS = tuple(kind.name for kind in KINDS if not kind.gpu)  # the light queue's: imports


@bp.get("/")
@admin_required
def index():
    """Show the sources with their image counts, the demo pack button, and recent jobs."""
    sources = db.session.execute(
        select(Source, func.count(Image.id), func.sum(Image.hidden.cast(db.Integer)))
        .outerjoin(Image)
        .where(Source.kind != GENERATED)  # people's blind-check pictures are theirs alone
        .group_by(Source.id)
        .order_by(Source.id.desc())
    ).all()
    recent = db.session.scalars(  # the admin's imports; their own trainings live on My taste
        select(Job)
        .where(Job.owner_id == current_user.id, Job.kind.in_(IMPORT_KINDS))
        .order_by(Job.id.desc())
        .limit(5)
    ).all()
    return page_or_fragment(
        "admin/index.html",
        "admin/_sources.html",
        sources=sources,
        jobs=recent,
        crowd_model=crowd_model_info(),
        **site_settings(),
    )


@bp.post("/demo")
@admin_required
def load_demo():
    """Queue a job that adds demo-pack images; answer with its progress bar (the running one's,
    while one runs: each pack takes the next images, so two at once would overlap)."""
    count = request.form.get("count", type=int)  # None when missing or not a number
    if count is None or not 1 <= count <= MAX_DEMO_PACK:
        abort(400, description=f"Choose between 1 and {MAX_DEMO_PACK} images.")
    job = jobs.enqueue_once(
        "demo_pack",
        current_user.id,
        lock_key=demo.LOCK,
        count=count,
        seed=current_app.config["DEMO_PACK_SEED"],
    )
    if not request.headers.get("HX-Request"):
        return redirect(url_for("admin.index"))
    response = job_widget(job)
    response.headers.setdefault("HX-Trigger", "job-started")  # the home page says it is loading
    return response


@bp.post("/crowd-model")
@admin_required
def train_crowd():
    """Queue training the crowd model on everyone's ratings (or show the one running)."""
    job = jobs.enqueue_once("train_crowd", current_user.id, lock_key="train_crowd")
    if not request.headers.get("HX-Request"):
        return redirect(url_for("admin.index"))
    return job_widget(job)


@bp.get("/users")
@admin_required
def users():
    """List accounts with their rating counts."""
    rows = db.session.execute(
        select(User, func.count(Rating.id)).outerjoin(Rating).group_by(User.id).order_by(User.id)
    ).all()
    return render_template("admin/users.html", rows=rows)


@bp.post("/users/<int:user_id>")
@admin_required
def update_user(user_id: int):
    """Grant or remove admin, or disable or enable an account (never your own)."""
    user = get_or_404(User, user_id)
    if user.id == current_user.id:
        flash("You cannot change your own role or lock yourself out.")
        return redirect(url_for("admin.users"))
    action = request.form.get("action")
    changes = {
        "make_admin": ("is_admin", True),
        "remove_admin": ("is_admin", False),
        "disable": ("disabled", True),
        "enable": ("disabled", False),
    }
    if action not in changes:
        abort(400, description="Unknown action.")
    setattr(user, *changes[action])
    db.session.commit()
    flash(f"{user.username}: {action.replace('_', ' ')} done.")
    return redirect(url_for("admin.users"))


def site_settings() -> dict:
    """Return what the import and settings forms show; the API key only as its last four."""
    key = site_setting("civitai_api_key") or ""
    return {
        "allow_uploads": site_setting("allow_uploads"),
        "allow_private_urls": site_setting("allow_private_urls"),
        "api_key_hint": f"…{key[-4:]}" if key else "",
        "civitai_url": current_app.config["CIVITAI_URL"],
        "sorts": SORTS,
        "periods": PERIODS,
        "levels": LEVELS,
    }
