"""Import jobs: civitai queries, URL lists, folders and uploads, each feeding the pool."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import requests
from flask import current_app
from sqlalchemy import func, select

from rating.jobs import JobCancelled, JobProgress
from rating.models import Image, Job, Source, db, site_setting
from rating.pool import ImportTally, PoolImporter, size_text
from rating.sources.civitai import CivitaiImage, CivitaiQuery, fetch_page
from rating.sources.fetch import FetchError, FetchPolicy, get_image_bytes

FOLDER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif"}


def fetch_policy() -> FetchPolicy:
    """Build the fetch limits from the settings."""
    config = current_app.config
    return FetchPolicy(
        timeout=config["FETCH_TIMEOUT"],
        max_bytes=config["FETCH_MAX_BYTES"],
        allow_private=bool(site_setting("allow_private_urls")),
        allowed_hosts=frozenset(config["FETCH_ALLOWED_HOSTS"]),
    )


def _source(job: Job) -> Source:
    source = db.session.get(Source, job.params["source_id"])
    if source is None:
        raise RuntimeError("its source was deleted")
    return source


def _report(job: Job, tally: ImportTally, progress: JobProgress, step: int, total: int) -> None:
    job.result = tally.as_dict()  # a new dict, so the JSON column notices the change; the
    # widget shows it as the tally, so the message says how far the list is
    progress(step, total, f"{step} of {total} done")


def import_urls(job: Job, progress: JobProgress) -> dict:
    """Download each URL of a list into the pool, resuming where a stopped run left off."""
    source, tally = _source(job), ImportTally()
    pool, policy, urls = PoolImporter(source, tally), fetch_policy(), source.params["urls"]
    with requests.Session() as session:
        for position in range(source.position, len(urls)):
            url = urls[position]
            try:
                data = get_image_bytes(session, url, policy=policy)
            except FetchError as exc:
                tally.fail_unread(url, str(exc))
            else:
                pool.add_bytes(data, url, source_url=url)
            source.position = position + 1
            _report(job, tally, progress, position + 1, len(urls))
    return tally.as_dict()


def folder_files(root: Path) -> Iterator[Path]:
    """Yield the image files under `root`, recursively, in a stable order."""
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in FOLDER_EXTENSIONS and path.is_file():
            yield path


def import_folder(job: Job, progress: JobProgress) -> dict:
    """Add the images under a server folder (jpg, png, webp, the first frame of gif)."""
    source, tally = _source(job), ImportTally()
    root = Path(source.params["path"])
    if not root.is_dir():
        raise RuntimeError(f"{root} is not a folder on the server")
    files = list(folder_files(root))
    pool, limit = PoolImporter(source, tally), current_app.config["FETCH_MAX_BYTES"]
    for position in range(source.position, len(files)):
        path, name = files[position], str(files[position].relative_to(root))
        if path.stat().st_size > limit:
            tally.fail_unread(name, f"larger than the {size_text(limit)} limit")
        else:
            pool.add_bytes(path.read_bytes(), name, source_ref=name, title=path.stem)
        source.position = position + 1
        _report(job, tally, progress, position + 1, len(files))
    return tally.as_dict()


def import_upload(job: Job, progress: JobProgress) -> dict:
    """Decode the files of a browser upload into the pool, deleting each once it is in."""
    source = _source(job)
    tally = ImportTally(**source.params["refused"])  # what the request refused from headers
    names, folder = source.params["files"], staging_root() / str(source.id)
    pool = PoolImporter(source, tally)
    try:
        for position in range(source.position, len(names)):
            staged = folder / f"{position:03d}"
            pool.add_bytes(staged.read_bytes(), names[position], title=names[position])
            staged.unlink()
            source.position = position + 1
            _report(job, tally, progress, position + 1, len(names))
    except JobCancelled:  # the rest is dropped; a crash instead keeps it for Resume
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return tally.as_dict()


def staging_root() -> Path:
    """Where uploaded files wait for their job: one folder per upload, named by its source."""
    return Path(current_app.config["STORAGE_ROOT"]) / "uploads"


def import_civitai(job: Job, progress: JobProgress) -> dict:
    """Page through a civitai query into the pool, saving the cursor after every page."""
    source, tally = _source(job), ImportTally()
    query = CivitaiQuery(**source.params["query"])
    pool, policy, have = PoolImporter(source, tally), fetch_policy(), _image_count(source)
    cursor = source.cursor  # a resumed import goes on from its last full page
    options = {
        "base_url": current_app.config["CIVITAI_URL"],
        "api_key": site_setting("civitai_api_key") or None,
        "policy": policy,
    }
    with requests.Session() as session:
        while have < query.target:
            images, following, raw_count = fetch_page(session, query, cursor, **options)
            for image in images:
                if have >= query.target:
                    break
                have += _add_civitai_image(session, pool, image, policy) == "added"
                _report(job, tally, progress, have, query.target)
            source.cursor = following
            db.session.commit()
            if not following or not raw_count or following == cursor:  # the end, or a loop
                break
            cursor = following
    if have < query.target:
        job.message = f"civitai has no more images for this query: {tally.line()}"
    return tally.as_dict()


def _add_civitai_image(session, pool: PoolImporter, image: CivitaiImage, policy) -> str:
    """Download one listed image (unless this pool has it already) and add it."""
    ref = f"civitai:{image.civitai_id}"
    if db.session.scalar(select(Image.id).where(Image.source_ref == ref)):
        pool.tally.found += 1
        pool.tally.duplicates += 1  # imported before, perhaps by a run that was stopped
        return "duplicate"
    try:
        data = get_image_bytes(session, image.url, policy=policy)
    except FetchError as exc:
        pool.tally.fail_unread(image.page_url, str(exc))
        return "failed"
    meta = {
        "civitai_id": image.civitai_id,
        "username": image.username,
        "base_model": image.base_model,
        "nsfw_level": image.nsfw_level,
        "reactions": image.reactions,
        "prompt": image.prompt,
    }
    return pool.add_bytes(
        data,
        image.page_url,
        source_url=image.page_url,
        source_ref=ref,
        title=(image.prompt or "")[:2000] or None,
        meta=meta,
    )


def _image_count(source: Source) -> int:
    return db.session.scalar(select(func.count(Image.id)).where(Image.source_id == source.id))
