"""My taste: the "Train my taste" button, its job, results, versions, downloads, refinement."""

from __future__ import annotations

import shutil

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from rating import blind, jobs, refine_jobs, sharing, verdict
from rating import taste_files as files
from rating.job_views import job_widget, widget
from rating.models import Image, Job, Rating, TasteVersion, db, get_or_404, get_version_or_404
from rating.rate import judged_counts, page_or_fragment, rate_from_form, visible_image_or_404
from rating.taste_jobs import PHASES

bp = Blueprint("taste", __name__, url_prefix="/taste")

# what -> (the version's column naming the file, file-name suffix, MIME type)
DOWNLOADS = {
    "lora": ("bundle_file", "-lora.zip", "application/zip"),
    "scorer": ("scorer_file", "-scorer.safetensors", "application/octet-stream"),
    "latents": ("latents_file", "-latents.safetensors", "application/octet-stream"),
}


@bp.app_template_global()
def download_sizes(version: TasteVersion) -> dict[str, int]:
    """The size in bytes of each of a version's downloads that exists."""
    sizes = {}
    for what, (column, _, _) in DOWNLOADS.items():
        path = files.version_path(version, getattr(version, column))
        if path is not None and path.is_file():
            sizes[what] = path.stat().st_size
    return sizes


bp.add_app_template_global(files.bundle_name, "bundle_stem")
bp.add_app_template_global(blind.pairs_of, "blind_pairs")
bp.add_app_template_global(verdict, "verdicts")  # the verdict, its counts and thresholds


@bp.app_template_global()
def blind_summary(version: TasteVersion) -> dict | None:
    """The owner's blind-check record for a version (None for anyone else, or none yet)."""
    return blind.summary(version) if sharing.viewer_owns(version) else None


def judgement_count(user_id: int) -> int:
    """Count a person's star ratings and pairwise picks: each teaches their scorer."""
    return sum(judged_counts(user_id))


def phase_states(job: Job) -> list[tuple[str, str, str]]:
    """Return (name, label, state) per phase: done, running, waiting, failed or cancelled."""
    names = list(PHASES)
    current = names.index(job.phase) if job.phase in names else -1
    states = []
    for index, name in enumerate(names):
        if job.status == "succeeded" or index < current:
            state = "done"
        elif index == current:
            state = "running" if job.status == "running" else job.status
        else:
            state = "waiting"
        states.append((name, PHASES[name], state))
    return states


def grid_rows(version: TasteVersion) -> list[dict]:
    """Group the grid's cells into rows, one per prompt and seed, in strength order."""
    grid = version.metrics.get("grid") or {}
    rows: dict[tuple, dict] = {}
    for index, cell in enumerate(grid.get("cells", [])):
        row = rows.setdefault((cell["prompt"], cell["seed"]), {**cell, "cells": {}})
        row["cells"][cell["strength"]] = {**cell, "index": index}
    return list(rows.values())


def guesses(version: TasteVersion | None) -> dict[str, list[tuple[Image, float, float | None]]]:
    """Return the unrated images the version's scorer predicts I'd love and hate, each with
    its predicted score and how unsure of it the scorer is (± stars; None for older ones)."""
    picks = {key: (version.metrics.get(key) or []) if version else [] for key in ("love", "hate")}
    ids = [pick["image_id"] for found in picks.values() for pick in found]
    images = {i.id: i for i in db.session.scalars(select(Image).where(Image.id.in_(ids)))}
    return {
        key: [
            (images[p["image_id"]], p["score"], p.get("spread"))
            for p in found
            if p["image_id"] in images
        ]
        for key, found in picks.items()
    }


def job_context(job: Job | None) -> dict:
    """Gather what a taste job's widget shows: its phases, its version, what is done so far."""
    if job is None:
        return dict(job=None)
    version = db.session.get(TasteVersion, job.params.get("version_id") or 0)
    return dict(
        job=job,
        version=version,
        phases=phase_states(job),
        guesses=guesses(version),
        checkpoints=files.checkpoint_history(version) if job.phase == "lora" else [],
    )


def taste_context(user_id: int) -> dict:
    """Gather what My taste shows: counts, the job, the newest version and the history."""
    versions = db.session.scalars(
        select(TasteVersion)
        .where(TasteVersion.owner_id == user_id)
        .order_by(TasteVersion.id.desc())
    ).all()
    # the newest finished version, else the newest with a scorer (a training in progress)
    shown = next((v for v in versions if v.complete), None)
    shown = shown or next((v for v in versions if v.scorer_file), None)
    return dict(
        count=judgement_count(user_id),
        needed=current_app.config["TASTE_MIN_RATINGS"],
        base_model=current_app.config["BASE_MODEL"],
        versions=versions,
        shown=shown,
        rows=grid_rows(shown) if shown else [],
        shown_guesses=guesses(shown),
    ) | job_context(jobs.latest(user_id, "train_taste"))


def refine_context(job: Job) -> dict:
    """What an "Improve this image" widget shows besides the job: the image it refines."""
    return {"image": db.session.get(Image, job.params["image_id"])}


widget("train_taste", "taste/_train_job.html", job_context)
widget("refine_image", "taste/_refine_job.html", refine_context)


@bp.get("/")
@login_required
def page():
    """Show My taste: the button, my training job, my newest results and my versions."""
    return page_or_fragment(
        "taste/index.html", "taste/_overview.html", **taste_context(current_user.id)
    )


@bp.post("/train")
@login_required
def train():
    """Start training my taste, or show the training of mine already queued or running."""
    count, needed = judgement_count(current_user.id), current_app.config["TASTE_MIN_RATINGS"]
    if count < needed:
        abort(
            400,
            description=f"Rate or compare at least {needed} images first; you have {count}"
            " ratings and picks.",
        )
    job = jobs.enqueue_once("train_taste", current_user.id, lock_key=f"taste:{current_user.id}")
    if not request.headers.get("HX-Request"):
        return redirect(url_for("taste.page"))
    return job_widget(job)


def render_version(found: TasteVersion):
    """The version page: to its owner everything, to anyone else what sharing allows."""
    mine = sharing.viewer_owns(found)
    return render_template(
        "taste/version.html",
        version=found,
        rows=grid_rows(found),
        mine=mine,
        guesses=guesses(found) if mine else {},
    )


@bp.get("/versions/<int:number>")
@login_required
def version(number: int):
    """Show my taste version: figures, the grid, downloads, sharing."""
    return render_version(get_version_or_404(number, current_user))


@bp.get("/shared/<token>")
def shared_version(token: str):
    """Show a public version through its share link."""
    return render_version(sharing.shared_version_or_404(token))


@bp.post("/versions/<int:number>/public")
@login_required
def set_public(number: int):
    """Make my version public (a share link anyone may open) or private again."""
    found = get_version_or_404(number, current_user)
    form = request.form
    sharing.publish(found, form.get("public") == "1", share_scorer=form.get("share_scorer") == "1")
    db.session.commit()
    if not request.headers.get("HX-Request"):
        return redirect(url_for("taste.version", number=found.number))
    return render_template("taste/_share.html", version=found)


@bp.post("/versions/<int:number>/delete")
@login_required
def delete(number: int):
    """Delete my version and its files (not while it is training)."""
    found = get_version_or_404(number, current_user)
    if found.training:
        flash("That version is still training: cancel it first, then delete it.")
        return redirect(url_for("taste.version", number=found.number))
    shutil.rmtree(files.version_folder(found), ignore_errors=True)
    db.session.delete(found)
    db.session.commit()
    flash(f"Deleted taste version {found.number} and its files.")
    return redirect(url_for("taste.page"))


def send_download(found: TasteVersion, what: str):
    """Send one of a version's files, if sharing lets this viewer have it."""
    if what not in sharing.downloads_for(found):
        abort(404)
    column, suffix, mimetype = DOWNLOADS[what]
    path = files.version_path(found, getattr(found, column))
    if path is None or not path.is_file():
        abort(404)
    name = files.bundle_name(found) + suffix
    return send_file(path, mimetype=mimetype, as_attachment=True, download_name=name)


@bp.get("/versions/<int:number>/download/<what>")
@login_required
def download(number: int, what: str):
    """Download my version's LoRA bundle (zip), scorer or latents+scores file."""
    return send_download(get_version_or_404(number, current_user), what)


@bp.get("/shared/<token>/download/<what>")
def shared_download(token: str, what: str):
    """Download what a public version shares (the LoRA bundle; the scorer if shared)."""
    return send_download(sharing.shared_version_or_404(token), what)


def send_grid_cell(found: TasteVersion, index: int):
    """Send one image of a version's before/after grid."""
    cells = (found.metrics.get("grid") or {}).get("cells", [])
    if not found.grid_file or not 0 <= index < len(cells):
        abort(404)
    path = files.version_path(found, cells[index]["file"])
    return send_file(path, mimetype="image/png", max_age=3600)


@bp.get("/versions/<int:number>/grid/<int:index>.png")
@login_required
def grid_cell(number: int, index: int):
    """Send one image of my version's grid."""
    return send_grid_cell(get_version_or_404(number, current_user), index)


@bp.get("/shared/<token>/grid/<int:index>.png")
def shared_grid_cell(token: str, index: int):
    """Send one image of a public version's grid."""
    return send_grid_cell(sharing.shared_version_or_404(token), index)


@bp.get("/images/<int:image_id>")
@login_required
def image(image_id: int):
    """Show an image with my stars and "Improve this image" (refine it with my scorer)."""
    shown = visible_image_or_404(image_id)
    stars = db.session.scalar(
        select(Rating.stars).where(Rating.user_id == current_user.id, Rating.image_id == image_id)
    )
    return render_template(
        "taste/image.html",
        image=shown,
        stars=stars,
        version=refine_jobs.latest_scorer_version(current_user),
        job=jobs.latest(current_user.id, "refine_image", image_id=image_id),
    )


@bp.post("/images/<int:image_id>/stars")
@login_required
def rate_image(image_id: int):
    """Set or change my stars for this image from its page, and show the page again."""
    visible_image_or_404(image_id)
    rate_from_form(image_id)
    return redirect(url_for("taste.image", image_id=image_id))


@bp.post("/images/<int:image_id>/improve")
@login_required
def improve(image_id: int):
    """Refine an image with my newest scorer, as a GPU job; answer with its widget."""
    shown = visible_image_or_404(image_id)
    version = refine_jobs.latest_scorer_version(current_user)
    if version is None:
        abort(400, description="Train your taste first: refining needs your scorer.")
    job = jobs.enqueue_once(
        "refine_image",
        current_user.id,
        lock_key=f"refine:{current_user.id}",
        image_id=shown.id,
        version_id=version.id,
    )
    if not request.headers.get("HX-Request"):
        return redirect(url_for("taste.image", image_id=image_id))
    return job_widget(job)


@bp.get("/refined/<int:job_id>/<which>.png")
@login_required
def refined(job_id: int, which: str):
    """Send the before or after image of my "Improve this image" job."""
    found = get_or_404(Job, job_id, owner=current_user)
    if found.kind != "refine_image" or which not in ("before", "after"):
        abort(404)
    path = refine_jobs.refine_folder(found) / f"{which}.png"
    if not path.is_file():
        abort(404)
    return send_file(path, mimetype="image/png", max_age=3600)
