"""The demo pack: procedurally generated images, so an offline install has something to rate."""

from __future__ import annotations

import io

from sqlalchemy import func, select

from rating.jobs import JobProgress, handler
from rating.media import image_store
from rating.models import Image, Job, Source, db
from rating.sources.demo_art import demo_image_style, render_demo_image

BATCH = 20  # images per commit: few enough that a crash loses little, many enough to be fast


def next_demo_index() -> int:
    """Return the first demo image index not loaded yet, so each click adds new images."""
    loaded = db.session.scalars(select(Source.params).where(Source.kind == "demo")).all()
    return max((p.get("start", 0) + p.get("count", 0) for p in loaded), default=0)


@handler("demo_pack")
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
    store, added, duplicates = image_store(), 0, 0
    for done, index in enumerate(range(start, start + count), start=1):
        picture = render_demo_image(index, seed=seed)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", compress_level=3)  # lossless original, quick to write
        stored = store.add(picture, buffer.getvalue(), "png")
        if db.session.scalar(select(func.count(Image.id)).where(Image.sha256 == stored.sha256)):
            duplicates += 1
        else:
            style = demo_image_style(index, seed=seed)
            db.session.add(
                Image(
                    sha256=stored.sha256, phash=stored.phash, width=stored.width,
                    height=stored.height, original_ext=stored.original_ext, source=source,
                    source_ref=f"demo:{seed}:{index}", title=f"Demo #{index + 1} ({style})",
                    meta={"style": style, "index": index, "seed": seed},
                )
            )
            added += 1
        if done % BATCH == 0 or done == count:
            db.session.commit()
            progress(done, count, f"Rendered {done} of {count} images")
    job.message = f"Added {added} demo images"
    if duplicates:
        job.message += f" ({duplicates} already here)"
    return {"added": added, "duplicates": duplicates, "source_id": source.id}
