"""The crowd model: one scorer trained on everyone's ratings (each rater's stars z-scored),
kept per base model; personal scorers start from its trunk."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from flask import current_app
from sqlalchemy import select

from rating.gpu_work import base_model, encode_pictures, gpu_job, plain, release_memory
from rating.jobs import JobProgress
from rating.models import Image, Job, Rating, db
from rating.settings import storage_root
from trainer.formats import safetensors_metadata

CROWD_FILE = "scorer.safetensors"


def crowd_model_path(base_model: str) -> Path:
    """Return where the crowd scorer for a base model is kept (one folder per base model)."""
    # A readable part and a hash: "a/b" and "a_b" must not share a folder.
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", base_model)[-60:].strip("._") or "model"
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:10]
    return storage_root() / "models" / "crowd" / f"{readable}-{digest}" / CROWD_FILE


def train_crowd(job: Job, progress: JobProgress) -> dict:
    """Train the crowd scorer on everyone's ratings; personal scorers then start from it."""
    from trainer import scorer

    progress.phase("encode", "Encoding every rated image")
    ratings = db.session.execute(select(Rating.user_id, Rating.image_id, Rating.stars)).all()
    if not ratings:
        raise RuntimeError("nobody has rated anything yet")
    with gpu_job():
        trained = _crowd_model(ratings, progress)
    progress.check()
    path = crowd_model_path(current_app.config["BASE_MODEL"])
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer.save_scorer(path, trained)
    account = trained.metrics.get("crowd", {})
    job.message = (
        f"Crowd model ready: held-out SRCC {trained.metrics.get('srcc')} from"
        f" {account.get('ratings')} ratings by {account.get('raters')} raters."
    )
    return plain(trained.metrics)


def _crowd_model(ratings: list, progress: JobProgress):
    """Encode every rated image and train the crowd scorer on all the ratings."""
    import torch

    from trainer import crowd, scorer
    from trainer.latents import LatentsFile

    config = current_app.config
    images = db.session.scalars(
        select(Image).where(Image.id.in_({r.image_id for r in ratings})).order_by(Image.id)
    ).all()
    base = base_model(config["BASE_MODEL"])
    encoded = encode_pictures(base, images, progress.report, progress.should_stop)
    family = base.family
    base = None  # the scorer trains without it: give its GPU memory back first
    release_memory()
    row = {image.id: k for k, image in enumerate(images)}
    data = LatentsFile(
        latents=encoded.latents,
        scores=torch.zeros(len(images)),  # unused: the crowd targets come from the ratings
        flipped=encoded.flipped,
        sha256s=[image.sha256 for image in images],
        metadata={"family": family},
    )
    progress.phase("scorer", "Training the crowd model")
    return crowd.train_crowd(
        data,
        [r.user_id for r in ratings],
        [row[r.image_id] for r in ratings],
        [float(r.stars) for r in ratings],
        scorer.ScorerConfig.from_dict(config["TASTE_SCORER"]),
        init=config["SCORER_INIT"] or None,
        progress=progress.report,
        should_stop=progress.should_stop,
    )


def crowd_model_info() -> dict | None:
    """Describe the crowd model for the configured base model, or None when there is none."""
    path = crowd_model_path(current_app.config["BASE_MODEL"])
    if not path.is_file():
        return None
    metrics = json.loads(safetensors_metadata(path).get("metrics", "{}"))
    return {"metrics": metrics, "crowd": metrics.get("crowd", {})}
