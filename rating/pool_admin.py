"""Admin pages for the pool: start imports, resume them, hide images, site settings."""

from __future__ import annotations

from pathlib import Path

import click
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select

from rating import jobs
from rating.admin import MAX_DEMO_PACK
from rating.auth import admin_required
from rating.job_views import job_widget
from rating.models import GENERATED, Image, Job, Source, db, get_or_404, set_site_setting
from rating.sources.civitai import LEVELS, PERIODS, SORTS, CivitaiQuery

bp = Blueprint("pool", __name__, url_prefix="/admin/pool", cli_group="images")

MAX_URLS = 10_000


def start_import(kind: str, label: str, params: dict):
    """Record a new source and queue the job that fills it."""
    source = Source(kind=kind, label=label[:200], params=params, created_by_id=current_user.id)
    db.session.add(source)
    db.session.commit()
    job = jobs.enqueue(f"import_{kind}", current_user.id, source_id=source.id)
    return (
        job_widget(job) if request.headers.get("HX-Request") else redirect(url_for("admin.index"))
    )


def refuse(message: str):
    """Stop a form with a 400 that says what to fix."""
    abort(400, description=message)


@bp.post("/civitai")
@admin_required
def import_civitai():
    """Start a civitai import from the form's query."""
    form = request.form
    levels = sum(LEVELS[name] for name in form.getlist("levels") if name in LEVELS) or 1
    try:
        query = CivitaiQuery(
            target=optional_int(form, "target") or 200,
            limit=optional_int(form, "limit") or 100,
            sort=form.get("sort") or SORTS[0],
            period=form.get("period") or PERIODS[0],
            browsing_level=levels,
            base_models=tuple(
                m.strip() for m in form.get("base_models", "").split(",") if m.strip()
            ),
            username=form.get("username", "").strip(),
            model_id=optional_int(form, "model_id"),
            model_version_id=optional_int(form, "model_version_id"),
            post_id=optional_int(form, "post_id"),
        )
        query.validate()
    except ValueError as exc:
        refuse(f"Check the civitai query: {exc}")
    label = f"civitai: {query.sort}, {query.period}, {query.target} images"
    return start_import("civitai", label, {"query": query_params(query)})


def optional_int(form, name: str) -> int | None:
    """Read an optional whole-number field (ValueError names the field when it is not one)."""
    text = form.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{name} must be a whole number, not {text!r}")
    return int(text)


def query_params(query: CivitaiQuery) -> dict:
    """Return a query as JSON-ready keyword arguments."""
    return {**vars(query), "base_models": list(query.base_models)}


@bp.post("/urls")
@admin_required
def import_urls():
    """Start importing a pasted (or uploaded) list of image URLs."""
    text = request.form.get("urls", "")
    upload = request.files.get("file")
    if upload and upload.filename:
        text += "\n" + upload.read().decode("utf-8", errors="replace")
    urls = list(dict.fromkeys(u.strip() for u in text.splitlines() if u.strip()))
    urls = [u for u in urls if not u.startswith("#")]
    if not urls:
        refuse("Paste at least one image URL (one per line), or choose a text file.")
    if len(urls) > MAX_URLS:
        refuse(f"That is {len(urls)} URLs; import at most {MAX_URLS:,} at a time.")
    bad = [u for u in urls if not u.lower().startswith(("http://", "https://"))]
    if bad:
        refuse(f"Only http and https addresses can be imported; not: {', '.join(bad[:5])}")
    return start_import("urls", f"URL list, {len(urls)} addresses", {"urls": urls})


@bp.post("/folder")
@admin_required
def import_folder():
    """Start importing the images in a folder on the server."""
    path = Path(request.form.get("path", "").strip()).expanduser()
    if not str(path) or not path.is_absolute() or not path.is_dir():
        refuse(f"“{path}” is not a folder on the server; give its full path.")
    return start_import("folder", f"Folder {path}", {"path": str(path.resolve())})


@bp.post("/sources/<int:source_id>/resume")
@admin_required
def resume(source_id: int):
    """Run a stopped or failed import again; it goes on where it left off."""
    source = get_or_404(Source, source_id)
    if source.kind not in ("civitai", "urls", "folder"):
        refuse("Only civitai, URL and folder imports can be resumed.")
    job = jobs.enqueue(f"import_{source.kind}", current_user.id, source_id=source.id)
    return (
        job_widget(job) if request.headers.get("HX-Request") else redirect(url_for("admin.index"))
    )


def pool_source_or_404(source_id: int) -> Source:
    """A source of the pool; a taste version's generated pictures are not the admin's."""
    found = get_or_404(Source, source_id)
    if found.kind == GENERATED:
        abort(404)
    return found


@bp.get("/sources/<int:source_id>")
@admin_required
def source(source_id: int):
    """Show one source: its images (hide or show each) and its import jobs."""
    found = pool_source_or_404(source_id)
    images = db.session.scalars(
        select(Image).where(Image.source_id == found.id).order_by(Image.id).limit(500)
    ).all()
    runs = db.session.scalars(
        select(Job).where(Job.params["source_id"].as_integer() == found.id).order_by(Job.id)
    ).all()
    return render_template("admin/source.html", source=found, images=images, runs=runs)


@bp.post("/images/<int:image_id>/hidden")
@admin_required
def set_hidden(image_id: int):
    """Hide an image from the pool (its ratings stay) or bring it back."""
    image = get_or_404(Image, image_id)
    pool_source_or_404(image.source_id)
    image.hidden = request.form.get("hidden") == "1"
    db.session.commit()
    if request.headers.get("HX-Request"):
        return render_template("admin/_pool_image.html", image=image)
    return redirect(url_for("pool.source", source_id=image.source_id))


@bp.post("/settings")
@admin_required
def settings():
    """Change the site settings: uploads, private addresses, the civitai API key."""
    set_site_setting("allow_uploads", request.form.get("allow_uploads") == "on")
    set_site_setting("allow_private_urls", request.form.get("allow_private_urls") == "on")
    key = request.form.get("civitai_api_key", "").strip()
    if request.form.get("clear_api_key"):
        set_site_setting("civitai_api_key", "")
    elif key:
        set_site_setting("civitai_api_key", key)
    db.session.commit()
    flash("Settings saved.")
    return redirect(url_for("admin.index"))


@bp.cli.command("import-folder")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def import_folder_command(path: Path) -> None:
    """Import the images under PATH into the pool (runs here, not on the queue)."""
    folder = str(path.resolve())
    source = Source(kind="folder", label=f"Folder {folder}", params={"path": folder})
    db.session.add(source)
    db.session.commit()
    report_cli_job(jobs.run_here("import_folder", source_id=source.id))


@bp.cli.command("demo")
@click.option("--count", type=click.IntRange(1, MAX_DEMO_PACK), default=None)
def demo_command(count: int | None) -> None:
    """Add demo-pack images to the pool (runs here, not on the queue)."""
    config = current_app.config
    count = count or config["DEMO_PACK_SIZE"]
    report_cli_job(jobs.run_here("demo_pack", count=count, seed=config["DEMO_PACK_SEED"]))


def report_cli_job(job: Job) -> None:
    """Print how a job ended; a failed one exits non-zero."""
    click.echo(f"{job.status}: {job.message}")
    if job.result.get("failures"):
        for failure in job.result["failures"]:
            click.echo(f"  failed: {failure['item']}: {failure['reason']}")
    if job.status != "succeeded":
        raise click.ClickException(job.error or job.message)
