"""A taste version's files: where they live, the download bundle, and what a stopped run keeps.

Each version has its own folder, named from ids (never from a request): its latents, scorer,
LoRA checkpoints, results grid and bundle. A file counts once the version records it; a run
that stops keeps its last completed LoRA checkpoint (bundled), and anything half-written goes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from sqlalchemy import select

from rating.models import Job, TasteVersion, db
from rating.settings import storage_root
from trainer.formats import checkpoint_folders, read_history, safetensors_metadata, sanitize_name

# A version folder's entries (see version_folder); LORA holds checkpoint-NNNNNN folders.
LATENTS = "latents.safetensors"
SCORER = "scorer.safetensors"
LORA = "lora"
BUNDLE = "bundle"
BUNDLE_ZIP = "bundle.zip"
GRID_IMAGE = "grid.png"
GRID_CELLS = "grid"


def version_folder(version: TasteVersion) -> Path:
    """Return the folder of a taste version's files (made from ids, never from a request)."""
    return storage_root() / "taste" / str(version.owner_id) / f"v{version.id}"


def version_path(version: TasteVersion, name: str | None) -> Path | None:
    """Return the path of one of a version's recorded files, or None when it has none."""
    return version_folder(version) / name if name else None


def bundle_name(version: TasteVersion) -> str:
    """Return the file-name stem of a version's downloads: tastebud-ada-taste-v3."""
    return sanitize_name(f"tastebud-{version.owner.username}-taste-v{version.number}")


def checkpoint_history(version: TasteVersion | None) -> list[dict]:
    """Return the held-out figures at each LoRA checkpoint so far (read while it trains)."""
    if version is None:
        return []
    for folder in reversed(checkpoint_folders(version_folder(version) / LORA)):
        try:  # the newest holds the whole history
            return read_history(folder)
        except (OSError, ValueError):
            continue  # being written or pruned right now
    return []


def latest_checkpoint(folder: Path) -> Path | None:
    """Return the newest complete LoRA checkpoint in a version's lora folder, if any."""
    from trainer.lora import LoraFileError, read_state

    for checkpoint in reversed(checkpoint_folders(folder)):
        try:
            read_state(checkpoint)
        except LoraFileError:
            continue
        return checkpoint
    return None


def salvage(version: TasteVersion, log) -> None:
    """After a stop or failure mid-run, keep the last completed LoRA checkpoint downloadable."""
    folder = version_folder(version)
    if not version.scorer_file or version.bundle_file:
        return
    if not version.lora_dir:
        checkpoint = latest_checkpoint(folder / LORA)
        if checkpoint is None:
            return
        version.lora_dir = checkpoint.relative_to(folder).as_posix()
        log(f"kept the last completed checkpoint, {checkpoint.name}")
        db.session.commit()
    try:
        write_bundle(version, preview=None)
    except Exception as error:  # the checkpoint itself stays; only the zip is missing
        db.session.rollback()
        log(f"could not bundle {version.lora_dir}: {error}")


def write_bundle(version: TasteVersion, preview) -> None:
    """Write a version's LoRA bundle (kohya and diffusers files, preview, sidecar, README), zip
    it, and record the zip."""
    from trainer import export

    folder = version_folder(version)
    with open(folder / SCORER, "rb") as file:
        scorer_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    lora = version.metrics.get("lora") or {}
    info = {
        "base_model": version.base_model,
        "family": safetensors_metadata(folder / SCORER).get("family", "sd1"),
        "resolution": version.metrics.get("resolution", 512),
        "scorer_sha256": scorer_sha256,
        "ratings": version.ratings_count,
        "score_gain": lora.get("score_gain"),
        "config": lora.get("config") or {},
        "author": version.owner.username,
        "preferred_weight": lora.get("recommended_strength") or 1.0,
    }
    export.write_bundle(
        folder / version.lora_dir,
        folder / BUNDLE,
        name=bundle_name(version),
        preview=preview,
        info=info,
    )
    export.zip_bundle(folder / BUNDLE, folder / BUNDLE_ZIP)
    version.bundle_file = BUNDLE_ZIP
    db.session.commit()


def remove_partial_files(version: TasteVersion) -> None:
    """Delete what the version does not record (half-written files), keeping LoRA checkpoints."""
    folder = version_folder(version)
    recorded = (version.latents_file, version.scorer_file, version.grid_file, version.bundle_file)
    keep = {LORA} | {name for name in recorded if name}
    if version.grid_file:
        keep.add(GRID_CELLS)
    if version.bundle_file:
        keep.add(BUNDLE)
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)


def salvage_orphan(job: Job) -> None:
    """When a train_taste job's worker died: keep its last completed LoRA checkpoint."""
    version = db.session.scalar(select(TasteVersion).where(TasteVersion.job_id == job.id))
    if version is not None:
        salvage(version, lambda line: None)
        remove_partial_files(version)
