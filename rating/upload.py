"""Browser uploads: signed-in people add images to the pool, when an admin allows it."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from flask import Blueprint, abort, current_app, render_template, request
from flask_login import current_user, login_required
from PIL import Image as PILImage

from rating.models import Source, db, site_setting
from rating.pool import ImportTally, PoolImporter, size_text

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
    return render_template("upload.html", tally=None)


@bp.post("/upload")
@login_required
def upload():
    """Validate and add the uploaded files; answer with what happened to each."""
    uploads_allowed_or_403()
    files = [f for f in request.files.getlist("files") if f.filename]
    config = current_app.config
    if not files:
        abort(400, description="Choose one or more image files.")
    if len(files) > config["UPLOAD_MAX_FILES"]:
        abort(400, description=f"Send at most {config['UPLOAD_MAX_FILES']} files at a time.")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    source = Source(kind="upload", label=f"Upload by {current_user.username}, {stamp} UTC")
    source.created_by_id = current_user.id
    db.session.add(source)
    db.session.commit()
    tally, limit = ImportTally(), config["UPLOAD_MAX_FILE_BYTES"]
    pool = PoolImporter(source, tally)
    pixels_left = config["UPLOAD_MAX_PIXELS"]
    for upload_file in files:
        data = upload_file.read(limit + 1)
        if len(data) > limit:
            tally.fail_unread(upload_file.filename, f"larger than the {size_text(limit)} limit")
            continue
        # Decoding costs by pixels, not bytes (a 35 KB PNG can be 6000×6000): the header says
        # how many before anything is decoded, and one request may only decode so many.
        pixels = declared_pixels(data)
        if pixels > pixels_left:
            tally.fail_unread(
                upload_file.filename,
                f"over this upload's {config['UPLOAD_MAX_PIXELS'] / 1e6:g} megapixel budget;"
                " send it in another upload",
            )
            continue
        pixels_left -= pixels
        pool.add_bytes(data, upload_file.filename, title=upload_file.filename[:200])
    template = "_upload_report.html" if request.headers.get("HX-Request") else "upload.html"
    return render_template(template, tally=tally)
