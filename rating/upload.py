"""Browser uploads: signed-in people add images to the pool, when an admin allows it."""

from __future__ import annotations

import io
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, request
from flask_login import current_user, login_required
from PIL import Image as PILImage
from sqlalchemy import select

from rating import jobs
from rating.imports import staging_root
from rating.job_views import job_widget
from rating.models import Job, Source, db, site_setting, utcnow
from rating.pool import ImportTally, size_text

bp = Blueprint("upload", __name__)


def declared_pixels(data: bytes) -> int:
    """The pixel count an image file's header declares (0 if unreadable: refused later)."""
    try:
        with PILImage.open(io.BytesIO(data)) as probe:  # reads the header, decodes nothing
            return probe.width * probe.height
    except Exception:  # Pillow raises many types for junk; open_image reports it properly
        return 0


def uploads_allowed_or_403() -> None:
    """Stop with a message when uploads are turned off."""
    if not site_setting("allow_uploads"):
        abort(403, description="Uploads are turned off on this site; ask an admin to allow them.")


@bp.get("/upload")
@login_required
def page():
    """Show the upload form (drop files on it, or choose them)."""
    uploads_allowed_or_403()
    return render_template("upload.html", job=None)


@bp.post("/upload")
@login_required
def upload():
    """Check the files from their headers, keep them, and queue the job that decodes them.

    Decoding costs by pixels, not bytes (a 35 KB PNG can be 6000×6000), so it happens in a
    light-queue job, not on the thread that answers raters; each file's header says how many
    pixels it has, and one request, and one person per hour, may only send so many.
    """
    uploads_allowed_or_403()
    files = [f for f in request.files.getlist("files") if f.filename]
    config = current_app.config
    if not files:
        abort(400, description="Choose one or more image files.")
    if len(files) > config["UPLOAD_MAX_FILES"]:
        abort(400, description=f"Send at most {config['UPLOAD_MAX_FILES']} files at a time.")
    hour_left = config["UPLOAD_MAX_PIXELS_PER_HOUR"] - pixels_sent_this_hour(current_user.id)
    if hour_left <= 0:
        abort(429, description="You have uploaded as much as one hour allows; try again later.")
    request_left, limit = config["UPLOAD_MAX_PIXELS"], config["UPLOAD_MAX_FILE_BYTES"]
    kept, refused, over_hour = [], ImportTally(), False
    for upload_file in files:
        name, data = upload_file.filename[:200], upload_file.read(limit + 1)
        pixels, left = declared_pixels(data), min(request_left, hour_left)
        if len(data) > limit:
            refused.fail_unread(name, f"larger than the {size_text(limit)} limit")
        elif pixels > left:
            over_hour = over_hour or hour_left < request_left
            budget = "this upload's" if request_left <= hour_left else "this hour's"
            refused.fail_unread(
                name,
                f"{pixels / 1e6:.1f} megapixels, over {budget} {left / 1e6:g} megapixels left;"
                " send it later or smaller",
            )
        else:
            request_left, hour_left = request_left - pixels, hour_left - pixels
            kept.append((name, data, pixels))
    if not kept:  # nothing to decode: say why now, and queue nothing
        reasons = "; ".join(f"{f['item']}: {f['reason']}" for f in refused.failures[:5])
        abort(429 if over_hour else 400, description=f"Nothing was added. {reasons}")
    job = stage_upload(kept, refused)
    if request.headers.get("HX-Request"):
        return job_widget(job)
    return render_template("upload.html", job=job)


def pixels_sent_this_hour(user_id: int) -> int:
    """Pixels in the person's uploads of the last hour, as their headers declared them."""
    since = utcnow() - timedelta(hours=1)
    sources = db.session.scalars(
        select(Source).where(
            Source.kind == "upload", Source.created_by_id == user_id, Source.created_at >= since
        )
    )
    return sum(source.params.get("pixels", 0) for source in sources)


def stage_upload(kept: list[tuple[str, bytes, int]], refused: ImportTally) -> Job:
    """Write the kept files where the job reads them, record the upload, and queue the job."""
    root = staging_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root, prefix="new-"))
    try:
        for number, (_name, data, _pixels) in enumerate(kept):
            (folder / f"{number:03d}").write_bytes(data)
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        params = {
            "files": [name for name, _data, _pixels in kept],
            "pixels": sum(pixels for _name, _data, pixels in kept),
            "refused": refused.as_dict(),
        }
        source = Source(
            kind="upload",
            label=f"Upload by {current_user.username}, {stamp} UTC",
            params=params,
            created_by_id=current_user.id,
        )
        db.session.add(source)
        db.session.flush()
        folder = folder.rename(root / str(source.id))
        db.session.commit()
    except BaseException:
        db.session.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return jobs.enqueue("import_upload", current_user.id, source_id=source.id)
