"""The "Improve this image" job: an image's latents nudged toward my scorer, within a bound."""

from __future__ import annotations

from pathlib import Path

from flask import current_app
from sqlalchemy import select

from rating.gpu_work import base_model, gpu_job, plain
from rating.jobs import JobProgress
from rating.media import image_store
from rating.models import Image, Job, TasteVersion, User, db
from rating.settings import storage_root
from rating.taste_files import version_path


def refine_folder(job: Job) -> Path:
    """Return the folder of an "Improve this image" job's before and after images."""
    return storage_root() / "taste" / str(job.owner_id) / "refine" / str(job.id)


def latest_scorer_version(user: User) -> TasteVersion | None:
    """Return the person's newest version that has a scorer (for "Improve this image")."""
    return db.session.scalar(
        select(TasteVersion)
        .where(TasteVersion.owner_id == user.id, TasteVersion.scorer_file.is_not(None))
        .order_by(TasteVersion.id.desc())
    )


def refine_image(job: Job, progress: JobProgress) -> dict:
    """Refine one image towards my scorer; save before and after with both scores."""
    version = db.session.get(TasteVersion, job.params["version_id"])
    image = db.session.get(Image, job.params["image_id"])
    if version is None or version.scorer_file is None or image is None:
        raise RuntimeError("that taste version or image was deleted; train your taste again")
    progress.phase("refine", f"Loading {version.base_model}")
    with gpu_job():
        refined = _refine(version, image, progress)
    progress.check()
    folder = refine_folder(job)
    folder.mkdir(parents=True, exist_ok=True)
    refined.before.save(folder / "before.png")
    refined.after.save(folder / "after.png")
    job.message = (
        f"Your scorer: {refined.before_score:.2f} before, {refined.after_score:.2f} after."
    )
    return plain(
        {
            "before_score": refined.before_score,
            "after_score": refined.after_score,
            "steps": refined.steps,
            "change": refined.change,
            "reencoded_score": refined.reencoded_score,
            "version_id": version.id,
            "is_demo": version.is_demo,
        }
    )


def _refine(version: TasteVersion, image: Image, progress: JobProgress):
    """Load the base model and my scorer, and refine the image's latents."""
    from PIL import Image as PILImage

    from trainer import sample
    from trainer.scorer import load_scorer

    base = base_model(version.base_model, vae_only=True)  # refining needs no UNet
    model, _ = load_scorer(version_path(version, version.scorer_file))
    model.to(base.pipeline.device)
    with PILImage.open(image_store().original_path(image.sha256, image.original_ext)) as opened:
        picture = opened.convert("RGB")
    settings = current_app.config["TASTE_REFINE"]
    return sample.refine(
        base,
        model,
        picture,
        config=sample.RefineConfig.from_dict(settings) if settings else None,
        progress=progress.report,
        should_stop=progress.should_stop,
    )
