"""Serving image files: thumbnails and originals under content-addressed URLs."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

from flask import Blueprint, abort, current_app, send_file
from flask_login import current_user, login_required
from sqlalchemy import select

from rating.models import Image, db
from rating.store import ImageStore

bp = Blueprint("media", __name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")
ONE_YEAR = 365 * 24 * 3600
IN_MEMORY = 1 << 20  # files up to this size (every thumbnail) are sent from memory


def image_store() -> ImageStore:
    """Return the image store under the configured storage root."""
    root = Path(current_app.config["STORAGE_ROOT"]) / "images"
    return ImageStore(root, thumb_side=current_app.config["THUMBNAIL_SIDE"])


def _send_immutable(path: Path, mimetype: str):
    try:
        found = path.stat()
    except OSError:
        abort(404)
    if not stat.S_ISREG(found.st_mode):
        abort(404)
    source = path
    if found.st_size <= IN_MEMORY:
        # Read at once: a browser that drops the request (a key pressed before the card's
        # images arrive) leaves no open file behind in the server.
        source = io.BytesIO(path.read_bytes())
    response = send_file(
        source,
        mimetype=mimetype,
        max_age=ONE_YEAR,
        conditional=True,
        etag=path.stem,  # the content's hash: the same bytes, whichever way they are sent
        last_modified=found.st_mtime,
    )
    # The URL names the content, so it never changes; private: only signed-in people see it.
    response.cache_control.immutable = True
    response.cache_control.private = True
    response.cache_control.public = False
    return response


def _shown_image_or_404(sha256: str) -> Image:
    """The image with this sha256, unless an admin hid it (admins still see it, to unhide)."""
    if not SHA256.match(sha256):
        abort(404)
    image = db.session.scalar(select(Image).where(Image.sha256 == sha256))
    if image is None or (image.hidden and not current_user.is_admin):
        abort(404)
    return image


@bp.get("/img/<sha256>.jpg")
@login_required
def thumb(sha256: str):
    """Send an image's thumbnail (at most THUMBNAIL_SIDE px on the long side)."""
    image = _shown_image_or_404(sha256)
    return _send_immutable(image_store().thumb_path(image.sha256), "image/jpeg")


@bp.get("/img/<sha256>/original")
@login_required
def original(sha256: str):
    """Send an image's original file."""
    image = _shown_image_or_404(sha256)
    path = image_store().original_path(image.sha256, image.original_ext)
    mimetype = "image/jpeg" if image.original_ext == "jpg" else f"image/{image.original_ext}"
    return _send_immutable(path, mimetype)
