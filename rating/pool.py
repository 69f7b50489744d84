"""Adding images to the pool: validate, drop exact and near duplicates, store, record, count."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from rating.media import image_store
from rating.models import GENERATED, Image, Setting, Source, db
from rating.store import ImageRejected, open_image, perceptual_hash, pixel_sha256

MAX_FAILURES_KEPT = 1000  # the report lists each failure; a runaway import must not bloat the row


@dataclass
class ImportTally:
    """What an import found and did with it, as the progress bar and the report show."""

    found: int = 0
    added: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)

    def fail(self, item: str, reason: str) -> None:
        """Count a failed item and keep its reason for the report."""
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append({"item": item[:500], "reason": reason[:500]})

    def fail_unread(self, item: str, reason: str) -> None:
        """Count an item found but lost before it could be read (download error, too big)."""
        self.found += 1
        self.fail(item, reason)

    def line(self) -> str:
        """Say the counts in one line."""
        return (
            f"found {self.found} · added {self.added} · duplicates {self.duplicates}"
            f" · near-duplicates {self.near_duplicates} · failed {self.failed}"
        )

    def as_dict(self) -> dict:
        """Return the tally as JSON-ready data."""
        return asdict(self)


def size_text(n: int) -> str:
    """Write a byte count for people: 512 KiB, 30 MiB, 10.5 MiB (one decimal at most)."""
    return f"{round(n / 2**20, 1):g} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class PhashIndex:
    """The pool's perceptual hashes, for near-duplicate lookups by Hamming distance."""

    def __init__(self, hashes: Iterable[str] = ()):
        self._hashes = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
        self._pending: list[int] = []  # appended one by one; folded into the array in chunks
        self.seen_id = 0  # the newest pool image whose hash is in the index

    @classmethod
    def from_pool(cls) -> PhashIndex:
        """Load every image's hash, hidden ones included (they must not come back either)."""
        index = cls()
        index.catch_up()
        return index

    def catch_up(self) -> None:
        """Add the hashes of images stored since the last look (by any import, anywhere); a
        taste job's generated pictures are no one's import and block nothing."""
        rows = db.session.execute(
            select(Image.id, Image.phash)
            .join(Source)
            .where(Image.id > self.seen_id, Source.kind != GENERATED)
            .order_by(Image.id)
        ).all()
        for image_id, phash in rows:
            self.add(phash)
            self.seen_id = image_id

    def nearest(self, phash: str) -> int:
        """Return the smallest Hamming distance from `phash` to the index (64 when empty)."""
        if len(self._pending) >= 256:
            self._hashes = np.concatenate([self._hashes, np.array(self._pending, np.uint64)])
            self._pending = []
        value = int(phash, 16)
        best = 64
        if self._hashes.size:
            best = int(np.bitwise_count(self._hashes ^ np.uint64(value)).min())
        return min([best, *((value ^ other).bit_count() for other in self._pending)])

    def add(self, phash: str) -> None:
        """Add a hash to the index."""
        self._pending.append(int(phash, 16))


POOL_LOCK = "pool.insert_lock"


def lock_pool() -> None:
    """Take the pool's insert lock for the rest of this transaction, on any database.

    A write to one agreed row: PostgreSQL locks that row until commit, and SQLite takes its
    database-wide write lock, so every importer, in any process, waits its turn here.
    """
    updated = db.session.execute(
        update(Setting).where(Setting.key == POOL_LOCK).values(value=Setting.value)
    ).rowcount
    if not updated:  # the first import ever: make the row (a racing twin may make it first)
        try:
            with db.session.begin_nested():
                db.session.add(Setting(key=POOL_LOCK, value=0))
        except IntegrityError:
            pass
        lock_pool()


class PoolImporter:
    """Adds images to one source, skipping what the pool already has (exactly or nearly)."""

    def __init__(self, source: Source, tally: ImportTally, near_distance: int | None = None):
        config = current_app.config
        self.source, self.tally, self.store = source, tally, image_store()
        self.limits = {
            "max_pixels": config["MAX_IMAGE_PIXELS"],
            "min_side": config["MIN_IMAGE_SIDE"],
        }
        self.near_distance = (
            config["NEAR_DUPLICATE_DISTANCE"] if near_distance is None else near_distance
        )
        self.index = PhashIndex.from_pool() if self.near_distance >= 0 else None

    def add_bytes(self, data: bytes, item: str, **fields) -> str:
        """Validate encoded bytes and add them; return what happened (added, duplicate, …)."""
        self.tally.found += 1
        try:
            image, ext = open_image(data, **self.limits)
        except ImageRejected as exc:
            self.tally.fail(item, str(exc))
            return "failed"
        return self._add(image, data, ext, fields)

    def add_image(self, image, original: bytes, ext: str, **fields) -> str:
        """Add an image already decoded (and trusted, like the demo pack's)."""
        self.tally.found += 1
        return self._add(image, original, ext, fields)

    def _add(self, image, original: bytes, ext: str, fields: dict) -> str:
        sha = pixel_sha256(image)
        if db.session.scalar(select(Image.id).where(Image.sha256 == sha)):
            self.tally.duplicates += 1
            return "duplicate"
        phash = perceptual_hash(image)
        if self.index is not None:
            # Check and insert as one step: the pool lock is held until the commit below, so
            # an import running beside this one can't add a near copy in between.
            lock_pool()
            self.index.catch_up()
            if self.index.nearest(phash) <= self.near_distance:
                db.session.rollback()  # releases the lock
                self.tally.near_duplicates += 1
                return "near_duplicate"
        # Files first: they are content-addressed, so a lost race below leaves nothing wrong.
        stored = self.store.add(image, original, ext, phash=phash, sha256=sha)
        db.session.add(
            Image(
                sha256=stored.sha256,
                phash=phash,
                width=stored.width,
                height=stored.height,
                original_ext=ext,
                source_id=self.source.id,
                **fields,
            )
        )
        try:
            db.session.commit()
        except IntegrityError:  # another import added the same image a moment ago
            db.session.rollback()
            self.tally.duplicates += 1
            return "duplicate"
        self.tally.added += 1
        return "added"
