"""The demo pack: procedurally generated images, so an offline install has something to rate."""

from __future__ import annotations

import io

from sqlalchemy import select

from rating.jobs import JobProgress
from rating.models import Job, Source, db
from rating.pool import ImportTally, PoolImporter
from trainer.demo_art import demo_image_style, render_demo_image

LOCK = "demo_pack"  # one demo pack at a time: each takes the next images, two would overlap


def next_demo_index() -> int:
    """Return the first demo image index not loaded yet, so each click adds new images."""
    loaded = db.session.scalars(select(Source.params).where(Source.kind == "demo")).all()
    return max((p.get("start", 0) + p.get("count", 0) for p in loaded), default=0)


def import_demo_pack(job: Job, progress: JobProgress) -> dict:
    """Render `count` demo images into the store and the pool."""
    count, seed = int(job.params["count"]), int(job.params.get("seed", 0))
    start = next_demo_index()
    source = Source(
        kind="demo",
        label=f"Demo pack, images {start + 1}–{start + count}",
        params={"start": start, "count": count, "seed": seed},
        created_by_id=job.owner_id,
    )
    db.session.add(source)
    db.session.commit()
    tally = ImportTally()
    # The pack's images are distinct by construction; only exact copies (a re-run) are skipped.
    pool = PoolImporter(source, tally, near_distance=-1)
    for done, index in enumerate(range(start, start + count), start=1):
        picture = render_demo_image(index, seed=seed)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", compress_level=3)  # lossless original, quick to write
        style = demo_image_style(index, seed=seed)
        pool.add_image(
            picture,
            buffer.getvalue(),
            "png",
            source_ref=f"demo:{seed}:{index}",
            title=f"Demo #{index + 1} ({style})",
            meta={"style": style, "index": index, "seed": seed},
        )
        progress(done, count, f"Rendered {done} of {count} images")
    job.message = f"Added {tally.added} demo images"
    if tally.duplicates:
        job.message += f" ({tally.duplicates} already here)"
    return tally.as_dict() | {"source_id": source.id}
