"""The database: people, the image pool, ratings, pairwise picks and background jobs."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from flask import abort
from flask_login import UserMixin
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

# Named constraints so Alembic can alter them on SQLite (batch mode) and PostgreSQL alike.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# Objects keep their values after a commit: a view that commits (a rating) and then renders
# must not reload the signed-in user and its rows. Code that needs another session's change
# refreshes explicitly (see jobs.py).
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})


def utcnow() -> datetime:
    """Return the current time in UTC (stored naive, always UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


class User(UserMixin, db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(40), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    is_admin: Mapped[bool] = mapped_column(default=False)
    # True for the site's first account only, else NULL: the unique index lets the database,
    # not a count read a moment earlier, decide who made the first account.
    founder: Mapped[bool | None] = mapped_column(index=True, unique=True)
    # Part of the id every session and remember-me cookie carries; signing out replaces it,
    # so a cookie copied before then no longer signs anyone in.
    session_token: Mapped[str | None] = mapped_column(String(32))
    # Admins can disable an account without deleting the ratings it made.
    disabled: Mapped[bool] = mapped_column(default=False)
    # The number of this person's newest taste version, deleted or not: the next one gets the
    # number after it, so a deleted version's number (and its old links) never names another.
    last_taste_number: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def is_active(self) -> bool:
        """Tell Flask-Login whether this account may sign in."""
        return not self.disabled

    def get_id(self) -> str:
        """The id Flask-Login keeps in cookies: the account and its current session token."""
        if not self.session_token:
            self.new_session_token()
            db.session.commit()
        return f"{self.id}:{self.session_token}"

    def new_session_token(self) -> None:
        """Start a new session generation: cookies naming the old token stop working."""
        self.session_token = secrets.token_hex(16)

    def set_password(self, password: str) -> None:
        """Store a salted hash of `password`, never the password."""
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        """Return whether `password` matches the stored hash."""
        return check_password_hash(self.password_hash, password)


# The Source kind of pictures a taste job drew for its owner's blind check (rating/blind.py):
# hidden images, never in the pool, and not listed to admins.
GENERATED = "generated"


class Source(db.Model):
    """One import of images: the demo pack, a civitai query, a URL list, a folder, uploads;
    or a taste version's generated pictures (GENERATED)."""

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # demo|civitai|urls|folder|upload|generated
    label: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # How far an import got (items done; civitai's next cursor), so a stopped one resumes.
    # Columns of their own: rewriting `params` (a URL list can be long) for each item is slow.
    position: Mapped[int] = mapped_column(default=0, server_default="0")
    cursor: Mapped[str | None] = mapped_column(String(2000))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="source")


class Image(db.Model):
    """A candidate image, stored once by the sha256 of its normalised pixels."""

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    phash: Mapped[str] = mapped_column(String(16), index=True)
    width: Mapped[int]
    height: Mapped[int]
    original_ext: Mapped[str] = mapped_column(String(8))
    source_id: Mapped[int] = mapped_column(ForeignKey("source.id"), index=True)
    # Where it came from, for attribution and re-fetching: a URL and the source's own id.
    source_url: Mapped[str | None] = mapped_column(String(2000))
    source_ref: Mapped[str | None] = mapped_column(String(200))
    title: Mapped[str | None] = mapped_column(String(2000))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    # Hidden images leave the pool but keep their ratings.
    hidden: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    source: Mapped[Source] = relationship(back_populates="images")


class Rating(db.Model):
    """One person's 1–5 stars for one image; re-rating updates the same row."""

    __table_args__ = (
        UniqueConstraint("user_id", "image_id"),
        CheckConstraint("stars BETWEEN 1 AND 5", name="stars_range"),
        Index("ix_rating_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id"))
    stars: Mapped[int]
    # The stars before the last change (None: the rating was new), so undo can restore them.
    undo_stars: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship()


class Comparison(db.Model):
    """One pairwise pick: image a against image b, won by a, by b, or a tie."""

    __table_args__ = (
        CheckConstraint("outcome IN ('a', 'b', 'tie')", name="outcome_values"),
        CheckConstraint("image_a_id <> image_b_id", name="distinct_images"),
        Index("ix_comparison_user_id", "user_id"),
        # One pick per shown pair: a double-sent pick carries the same token and is refused.
        UniqueConstraint("user_id", "token", name="uq_comparison_user_token"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    image_a_id: Mapped[int] = mapped_column(ForeignKey("image.id"))
    image_b_id: Mapped[int] = mapped_column(ForeignKey("image.id"))
    outcome: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    token: Mapped[str | None] = mapped_column(String(32))  # the pair card's one-time token

    image_a: Mapped[Image] = relationship(foreign_keys=[image_a_id])
    image_b: Mapped[Image] = relationship(foreign_keys=[image_b_id])


class Job(db.Model):
    """A background job and its progress, as the page shows it."""

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(12), default="queued")
    progress: Mapped[int] = mapped_column(default=0)
    total: Mapped[int] = mapped_column(default=0)
    message: Mapped[str] = mapped_column(String(500), default="")
    error: Mapped[str | None] = mapped_column(String(4000))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    stop_requested: Mapped[bool] = mapped_column(default=False)
    # A job in several phases (train_taste) names the one running; progress counts within it.
    phase: Mapped[str] = mapped_column(String(20), default="", server_default="")
    phase_started_at: Mapped[datetime | None]
    # The last lines of what the job reported, shown when it fails.
    log: Mapped[str] = mapped_column(Text, default="", server_default="")
    # At most one unfinished job per key ("train_taste:7"): the unique index refuses a second
    # one inside the inserting transaction; the key is cleared when the job ends.
    lock_key: Mapped[str | None] = mapped_column(String(80), unique=True)
    # Which process runs it ("host:pid") and when it last reported, to tell a dead worker's
    # job from one a live worker elsewhere is still running.
    worker: Mapped[str | None] = mapped_column(String(120))
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    FINAL = ("succeeded", "failed", "cancelled")

    @property
    def done(self) -> bool:
        """Return whether the job reached a final state."""
        return self.status in self.FINAL

    @property
    def percent(self) -> int:
        """Return progress as a whole percentage."""
        return int(100 * self.progress / self.total) if self.total else 0

    @property
    def eta_seconds(self) -> int | None:
        """Estimate the seconds left (in this phase) from the pace so far (None before a pace)."""
        since = self.phase_started_at or self.started_at
        if self.done or not since or not self.progress or not self.total:
            return None
        elapsed = (utcnow() - since).total_seconds()
        return round(elapsed * max(self.total - self.progress, 0) / self.progress)


class TasteVersion(db.Model):
    """One run of "Train my taste": the scorer and taste LoRA made from a person's ratings.

    Its files live in their own folder (see rating.taste_files.version_folder); the *_file
    columns name them relative to it, and stay empty until that file is complete. Its owner's
    URLs name it by `number`, never by `id`: the global id would tell how many versions
    other people trained.
    """

    __table_args__ = (UniqueConstraint("owner_id", "number", name="uq_taste_version_owner_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("user.id"), index=True)
    number: Mapped[int]  # 1, 2, … per person: "version 3" (see User.last_taste_number)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ratings_count: Mapped[int] = mapped_column(default=0)
    picks_count: Mapped[int] = mapped_column(default=0)
    base_model: Mapped[str] = mapped_column(String(500))
    is_demo: Mapped[bool] = mapped_column(default=False)
    latents_file: Mapped[str | None] = mapped_column(String(200))
    scorer_file: Mapped[str | None] = mapped_column(String(200))
    lora_dir: Mapped[str | None] = mapped_column(String(200))  # the chosen checkpoint folder
    bundle_file: Mapped[str | None] = mapped_column(String(200))  # the zip
    grid_file: Mapped[str | None] = mapped_column(String(200))
    # scorer metrics, love/hate predictions, LoRA figures, the grid's cells, phase timings
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    public: Mapped[bool] = mapped_column(default=False)
    # What sharing exposes is decided in rating/sharing.py: the share link's token, and
    # whether the owner also shares the scorer (never the ratings).
    public_token: Mapped[str | None] = mapped_column(String(32), unique=True)
    share_scorer: Mapped[bool] = mapped_column(default=False)

    owner: Mapped[User] = relationship()
    job: Mapped[Job | None] = relationship()

    @property
    def training(self) -> bool:
        """Return whether its job is still queued or running."""
        return self.job is not None and not self.job.done

    @property
    def complete(self) -> bool:
        """Return whether every phase finished: scorer, LoRA, grid and bundle."""
        return bool(self.scorer_file and self.lora_dir and self.grid_file and self.bundle_file)


def get_or_404(model, ident, owner: User | None = None):
    """Load a row by id or abort 404, also when it belongs to someone other than `owner`."""
    row = db.session.get(model, ident)
    if row is None:
        abort(404)
    owner_field = "owner_id" if hasattr(model, "owner_id") else "user_id"
    if owner is not None and getattr(row, owner_field) != owner.id:
        abort(404)
    return row


def get_version_or_404(number: int, owner: User) -> TasteVersion:
    """Load the owner's taste version by its number ("version 3") or abort 404."""
    found = db.session.scalar(
        select(TasteVersion).where(TasteVersion.owner_id == owner.id, TasteVersion.number == number)
    )
    if found is None:
        abort(404)
    return found


class Setting(db.Model):
    """A setting admins change on the site (the rest live in app.config)."""

    key: Mapped[str] = mapped_column(String(60), primary_key=True)
    value: Mapped[object] = mapped_column(JSON)


# Admin-editable settings and their defaults.
SITE_SETTINGS: dict[str, object] = {
    "allow_uploads": False,  # signed-in people may upload images to the pool
    "allow_private_urls": False,  # URL imports may reach loopback/private addresses (intranet)
    "civitai_api_key": "",  # optional; sent as a Bearer token, never shown back in full
}


def site_setting(key: str):
    """Return an admin-editable setting, or its default."""
    row = db.session.get(Setting, key)
    return SITE_SETTINGS[key] if row is None else row.value


def set_site_setting(key: str, value) -> None:
    """Store an admin-editable setting (the caller commits)."""
    if key not in SITE_SETTINGS:
        raise KeyError(key)
    row = db.session.get(Setting, key) or Setting(key=key)
    row.value = value
    db.session.add(row)
