"""What sharing a taste version exposes — the whole policy, in one place.

- A version is private to its owner until they make it public. Its owner reaches it by its
  number, 1, 2, … per person (/taste/versions/<number>), never by the database id, which
  would tell how many versions other people trained; nobody else ever does, public or not.
- A public version is reached only through its share link, /taste/shared/<token>: 128 random
  bits, never the sequential id, so public versions can't be listed by counting. Making it
  private ends the link; making it public again gives a new one.
- Public means the LoRA bundle, the before/after grid and the figures (ratings count, SRCC,
  gain, drift). Never the ratings: the latents file holds every star and, in its metadata,
  which images were rated, so it stays owner-only whatever the settings. The scorer is
  shared only when the owner also ticks "share my scorer", and the page says what that
  reveals: a model of their taste that anyone can run on any picture.
- The scorer's guesses ("images it predicts I'd love") are shown to the owner only.
"""

from __future__ import annotations

import secrets

from flask import abort, url_for
from flask_login import current_user
from sqlalchemy import select

from rating.models import TasteVersion, db

OWNER_DOWNLOADS = ("lora", "scorer", "latents")
PUBLIC_DOWNLOADS = ("lora",)
SCORER_REVEALS = (
    "A shared scorer is a model of your taste: anyone can run it on any picture to predict"
    " your stars. It does not contain your ratings or which images you rated."
)


def viewer_owns(version: TasteVersion) -> bool:
    """Return whether the signed-in person owns this version."""
    return current_user.is_authenticated and version.owner_id == current_user.id


def publish(version: TasteVersion, public: bool, share_scorer: bool = False) -> None:
    """Make a version public with a fresh share link (or private, ending the link)."""
    if not public:
        version.public_token = None
    elif not version.public:
        version.public_token = secrets.token_urlsafe(16)
    version.public = public
    version.share_scorer = public and share_scorer


def shared_version_or_404(token: str) -> TasteVersion:
    """The public version behind a share link, or 404."""
    found = db.session.scalar(select(TasteVersion).where(TasteVersion.public_token == token))
    if found is None or not found.public or not token:
        abort(404)
    return found


def downloads_for(version: TasteVersion) -> tuple[str, ...]:
    """The downloads the signed-in person (or a visitor) may take from this version."""
    if viewer_owns(version):
        return OWNER_DOWNLOADS
    if not version.public:
        return ()
    return PUBLIC_DOWNLOADS + (("scorer",) if version.share_scorer else ())


def version_url(version: TasteVersion, endpoint: str, **values) -> str:
    """The URL of a version's page, grid cell or download, as this viewer may reach it."""
    if viewer_owns(version):
        return url_for(f"taste.{endpoint}", number=version.number, **values)
    return url_for(f"taste.shared_{endpoint}", token=version.public_token, **values)


def share_url(version: TasteVersion) -> str | None:
    """The version's share link (absolute), while it is public."""
    if not version.public or not version.public_token:
        return None
    return url_for("taste.shared_version", token=version.public_token, _external=True)
