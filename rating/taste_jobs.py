"""The "Train my taste" job (latents → scorer → taste LoRA → results) and "Improve this image".

Both are GPU jobs: they run on the GPU queue, one at a time per worker. Trainer modules are
imported inside the jobs, not at the top: diffusers takes seconds to import, and the web
process never needs it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flask import current_app
from sqlalchemy import func, select

from rating import blind
from rating.crowd_jobs import crowd_model_path
from rating.gpu_work import base_model, encode_pictures, gpu_job, plain, release_memory
from rating.jobs import JobCancelled, JobProgress
from rating.models import Comparison, Image, Job, Rating, TasteVersion, db
from rating.rate import PICKS_COUNT, RATED_COUNT
from rating.settings import storage_root
from trainer.formats import (
    STRENGTHS,
    checkpoint_folders,
    read_history,
    safetensors_metadata,
    sanitize_name,
)

PHASES = {
    "encode": "Encode my images",
    "scorer": "Train my scorer",
    "lora": "Train my taste LoRA",
    "results": "Render the results",
}
LOVE_HATE = 8  # unrated images shown as the scorer's best and worst guesses
ACTIVE_KEPT = 50  # unrated images kept per list for the rating page to mix in
# A version folder's entries (see version_folder); LORA holds checkpoint-NNNNNN folders.
LATENTS = "latents.safetensors"
SCORER = "scorer.safetensors"
LORA = "lora"
BUNDLE = "bundle"
BUNDLE_ZIP = "bundle.zip"
GRID_IMAGE = "grid.png"
GRID_CELLS = "grid"
OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5}


def version_folder(version: TasteVersion) -> Path:
    """Return the folder of a taste version's files (made from ids, never from a request)."""
    return storage_root() / "taste" / str(version.owner_id) / f"v{version.id}"


def version_path(version: TasteVersion, name: str | None) -> Path | None:
    """Return the path of one of a version's recorded files, or None when it has none."""
    return version_folder(version) / name if name else None


def bundle_name(version: TasteVersion) -> str:
    """Return the file-name stem of a version's downloads: tastebud-ada-taste-v3."""
    return sanitize_name(f"tastebud-{version.owner.username}-taste-v{version.number}")


def new_version(job: Job) -> TasteVersion:
    """Create the version a train_taste job fills, numbered after the owner's last one."""
    number = db.session.scalar(
        select(func.coalesce(func.max(TasteVersion.number), 0)).where(
            TasteVersion.owner_id == job.owner_id
        )
    )
    base_model = current_app.config["BASE_MODEL"]
    who = {"user_id": job.owner_id}  # what it starts from; encode() counts them exactly
    version = TasteVersion(
        owner_id=job.owner_id,
        number=number + 1,
        ratings_count=db.session.scalar(RATED_COUNT, who),
        picks_count=db.session.scalar(PICKS_COUNT, who),
        job_id=job.id,
        base_model=base_model,
        is_demo=base_model.strip() == "demo",
        metrics={},
    )
    db.session.add(version)
    db.session.commit()
    job.params = {**job.params, "version_id": version.id}
    db.session.commit()
    return version


def active_candidates(guesses: list[dict], stars, keep: int = ACTIVE_KEPT) -> dict:
    """The unrated images most worth rating next, by id: those whose rating would teach the
    scorer most (`value`, see trainer.scorer.rating_value), and those whose predicted score
    sits nearest the edge of the person's top fifth (where a rating best separates what they
    love from what they merely like), least sure first; and the pairs whose outcome the scorer
    finds closest to a coin flip (nearly equal predicted scores, least sure first), for the
    compare page."""
    import torch

    rated = stars[torch.isfinite(stars)]
    edge = float(rated.quantile(0.8)) if len(rated) else 4.0
    informative = sorted(guesses, key=lambda g: -g["value"])
    near_top = sorted(guesses, key=lambda g: abs(g["score"] - edge) - 0.5 * g["spread"])
    by_score = sorted(guesses, key=lambda g: g["score"])
    neighbours = list(zip(by_score, by_score[1:], strict=False))
    close = sorted(
        neighbours,
        key=lambda p: p[1]["score"] - p[0]["score"] - 0.25 * (p[0]["spread"] + p[1]["spread"]),
    )
    return {
        "informative": [g["image_id"] for g in informative[:keep]],
        "edge_of_top": [g["image_id"] for g in near_top[:keep]],
        "top_edge_stars": round(edge, 2),
        "coin_flips": [[a["image_id"], b["image_id"]] for a, b in close[: keep // 2]],
    }


@dataclass(frozen=True)
class Judged:
    """What a person's scorer learns from, and the pool images it guesses at."""

    rated: list  # (Image, stars), by image id
    picked: list[Image]  # images of their picks they never rated
    unrated: list[Image]  # a random sample of the pool they haven't judged
    comparisons: list  # (image a id, image b id, outcome)

    @classmethod
    def of(cls, owner: int, sample: int) -> Judged:
        """Read a person's ratings and picks, and sample up to `sample` unjudged images."""
        rated = db.session.execute(
            select(Image, Rating.stars)
            .join(Rating, Rating.image_id == Image.id)
            .where(Rating.user_id == owner)
            .order_by(Image.id)
        ).all()
        comparisons = db.session.execute(
            select(Comparison.image_a_id, Comparison.image_b_id, Comparison.outcome).where(
                Comparison.user_id == owner
            )
        ).all()
        rated_ids = {image.id for image, _ in rated}
        picked_ids = {i for a, b, _ in comparisons for i in (a, b)} - rated_ids
        picked = db.session.scalars(select(Image).where(Image.id.in_(picked_ids))).all()
        mine = select(Rating.image_id).where(Rating.user_id == owner)
        unrated = db.session.scalars(
            select(Image)
            .where(Image.hidden.is_(False), Image.id.not_in(mine), Image.id.not_in(picked_ids))
            .order_by(func.random())
            .limit(sample)
        ).all()
        return cls(list(rated), list(picked), list(unrated), list(comparisons))

    def description(self) -> str:
        """Say what is encoded, as the progress bar shows it."""
        said = f"{len(self.rated)} rated images"
        if self.picked:
            said += f", {len(self.picked)} only in my picks"
        if self.unrated:
            said += f" and {len(self.unrated)} unrated ones, to guess what I'd love and hate"
        return said


class TasteRun:
    """One train_taste job: the version it fills, the base model, what phases pass on."""

    def __init__(self, job: Job, progress: JobProgress):
        self.job, self.progress, self.config = job, progress, current_app.config
        self.version = new_version(job)
        self.folder = version_folder(self.version)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base = None
        self.picks: list[tuple[int, int, float]] = []
        self.unrated_ids: list[int] = []
        self.unrated_latents = None
        self.judged = None  # what the scorer learns from; set by encode()

    def record(self, **metrics) -> None:
        """Add figures to the version's metrics and commit, so the page shows them now."""
        self.version.metrics = {**self.version.metrics, **plain(metrics)}
        db.session.commit()

    def load_base(self) -> None:
        """Load the configured base model (the demo builds in a second, offline)."""
        from trainer.families import NAMES

        self.progress.log(f"loading the base model {self.version.base_model}")
        self.base = base_model(self.version.base_model)
        self.record(
            resolution=self.base.resolution,
            device=str(self.base.pipeline.device),
            family=NAMES[self.base.family],
        )

    def encode(self) -> None:
        """Encode my rated images, the images of my picks I never rated, and a sample of
        unrated ones (new ones only; the rest come from the cache); write my latents+scores
        file (the rated ones: it carries my stars)."""
        import torch

        from trainer.latents import LatentsFile, save_latents_file

        judged = Judged.of(self.job.owner_id, int(self.config["TASTE_PREDICT_POOL"]))
        rated, picked, unrated = judged.rated, judged.picked, judged.unrated
        images = [image for image, _ in rated] + picked + unrated
        what = judged.description()
        self.progress(0, len(images), f"{what}: looking in the cache")
        encoded = encode_pictures(
            self.base,
            images,
            lambda step, total, said: self.progress.report(step, total, f"{what}: {said}"),
            self.progress.should_stop,
        )
        n, known = len(rated), len(rated) + len(picked)
        if rated:
            flipped = encoded.flipped[:n] if encoded.flipped is not None else None
            save_latents_file(
                self.folder / LATENTS,
                encoded.latents[:n],
                [float(stars) for _, stars in rated],
                [image.sha256 for image, _ in rated],
                flipped=flipped,
                metadata={
                    "base_model": self.version.base_model,
                    "owner": self.version.owner.username,
                },
            )
            self.version.latents_file = LATENTS
        self.judged = LatentsFile(
            latents=encoded.latents[:known],
            scores=torch.tensor([float(stars) for _, stars in rated] + [math.nan] * len(picked)),
            flipped=encoded.flipped[:known] if encoded.flipped is not None else None,
            sha256s=[image.sha256 for image in images[:known]],
            metadata={},
        )
        self.unrated_ids = [image.id for image in unrated]
        self.unrated_latents = encoded.latents[known:]
        rows = {image.id: row for row, image in enumerate(images[:known])}
        self.picks = [(rows[a], rows[b], OUTCOMES[o]) for a, b, o in judged.comparisons]
        self.version.ratings_count, self.version.picks_count = n, len(self.picks)
        cached = len(set(encoded.sha256s)) - encoded.encoded
        self.progress.log(
            f"encoded {encoded.encoded} new images ({len(picked)} only in my picks); "
            f"{cached} came from the cache"
        )
        self.record(
            encoded={
                "new": encoded.encoded,
                "cached": cached,
                "picked_only": len(picked),
                "unrated": len(unrated),
            }
        )

    def scorer_init(self, shape: list[int]) -> tuple[str | None, str]:
        """Pick the trunk to start from: the configured file, else a fitting crowd model.

        Returns the file (None: from scratch) and how to name it on the page.
        """
        if self.config["SCORER_INIT"]:
            return str(self.config["SCORER_INIT"]), "the configured trunk (SCORER_INIT)"
        crowd = crowd_model_path(self.version.base_model)
        if not crowd.is_file():
            return None, "scratch"
        fits = json.loads(safetensors_metadata(crowd).get("input_shape", "null")) == shape
        if not fits:
            self.progress.log("the crowd model was trained on other latents; starting afresh")
            return None, "scratch"
        return str(crowd), "the crowd model"

    def finetune_scorer(self) -> None:
        """Train my scorer on my latents file; record its held-out figures and its guesses."""
        from trainer import scorer

        data = self.judged  # my stars, and my picks' images I never rated (score NaN)
        init, start = self.scorer_init(list(data.latents.shape[1:]))
        trained = scorer.train(
            data,
            scorer.ScorerConfig.from_dict(self.config["TASTE_SCORER"]),
            picks=self.picks,
            init=init,
            progress=self.progress.report,
            should_stop=self.progress.should_stop,
        )
        self.progress.check()
        scorer.save_scorer(self.folder / SCORER, trained)
        self.version.scorer_file = SCORER
        love, hate, active, spread = [], [], {}, None
        if self.unrated_ids:
            unrated = self.unrated_latents
            guesses = scorer.predict(trained.model, unrated).tolist()
            spreads = scorer.uncertainty(trained.model, unrated).tolist()
            spread = sum(spreads) / len(spreads)
            values = scorer.rating_value(trained.model, data.latents, data.scores, unrated)
            ranked = sorted(zip(guesses, spreads, self.unrated_ids, strict=True), reverse=True)
            pairs = [
                {"image_id": i, "score": round(g, 2), "spread": round(u, 2)} for g, u, i in ranked
            ]
            shown = min(LOVE_HATE, len(pairs) // 2)  # no image is both loved and hated
            love, hate = pairs[:shown], pairs[::-1][:shown]
            value_of = dict(zip(self.unrated_ids, values.tolist(), strict=True))
            candidates = [{**pair, "value": value_of[pair["image_id"]]} for pair in pairs]
            active = active_candidates(candidates, data.scores)
        self.record(
            scorer={**trained.metrics, "init": start, "spread": spread},
            love=love,
            hate=hate,
            active=active,
        )

    @property
    def prompts_file(self) -> Path:
        """The prompt set: the TASTE_PROMPTS setting, else the base model's own."""
        return Path(self.config.get("TASTE_PROMPTS") or self.base.prompts_file)

    def train_lora(self) -> None:
        """Train my taste LoRA against my scorer; on GPU OOM retry once, smaller."""
        import torch

        from trainer import lora

        preset = lora.preset_for(self.base) | {"prompts_file": str(self.prompts_file)}
        config = lora.TasteLoraConfig.from_dict({**preset, **self.config["TASTE_LORA"]})
        train = functools.partial(
            lora.train,
            self.base,
            self.folder / SCORER,
            self.folder / LORA,
            progress=self.progress.report,
            should_stop=self.progress.should_stop,
        )
        result = None
        try:
            result = train(config)
        except torch.OutOfMemoryError:
            pass  # retried below: inside `except` the traceback would keep the failed
            # attempt's frames, and with them its activations and graph, in GPU memory
        if result is None:
            config = smaller(config)
            said = (
                "Out of GPU memory: retrying once with gradient checkpointing on, batch size "
                f"{config.batch_size} and {config.eval_prompts} evaluation prompts"
            )
            self.progress.log(said)
            self.job.message = said
            self.record(notes=[said])
            release_memory()
            try:
                result = train(config)
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    f"out of GPU memory even with gradient checkpointing, batch size "
                    f"{config.batch_size} and {config.eval_prompts} evaluation prompts. Lower "
                    "rank, sample_steps or eval_seeds in TASTE_LORA, or use a GPU with more "
                    "memory."
                ) from error
        chosen = result.get("chosen_checkpoint")
        if chosen:
            self.version.lora_dir = Path(chosen).relative_to(self.folder).as_posix()
        self.record(lora={k: v for k, v in result.items() if k != "chosen_checkpoint"})
        if result.get("stopped"):
            if self.version.lora_dir:
                write_bundle(self.version, preview=None)
            raise JobCancelled()

    def render_results(self) -> None:
        """Render the before/after grid with my scorer's scores, then the download bundle."""
        from trainer import sample
        from trainer.prompts import read_prompts
        from trainer.scorer import load_scorer

        prompts = read_prompts("eval", self.prompts_file)[: int(self.config["TASTE_GRID_PROMPTS"])]
        seeds = list(range(int(self.config["TASTE_GRID_SEEDS"])))
        model, _ = load_scorer(self.folder / SCORER)
        model.to(self.base.pipeline.device)
        grid = sample.grid(
            self.base,
            model,
            prompts,
            seeds,
            lora_folder=self.folder / self.version.lora_dir,
            strengths=STRENGTHS,
            steps=int(self.config["TASTE_SAMPLE_STEPS"]),
            progress=self.progress.report,
            should_stop=self.progress.should_stop,
        )
        self.progress.check()
        cells_dir = self.folder / GRID_CELLS
        cells_dir.mkdir(exist_ok=True)
        cells = []
        for index, cell in enumerate(grid.cells):
            name = f"{GRID_CELLS}/cell-{index:03d}.png"
            cell.image.save(self.folder / name)
            cells.append(
                {
                    "prompt": cell.prompt,
                    "seed": cell.seed,
                    "strength": cell.strength,
                    "score": cell.score,
                    "file": name,
                }
            )
        grid.image.save(self.folder / GRID_IMAGE)
        self.version.grid_file = GRID_IMAGE
        self.record(
            grid={"prompts": prompts, "seeds": seeds, "strengths": STRENGTHS, "cells": cells},
            scores_by_strength=grid.scores_by_strength,
        )
        self.render_blind_check()
        self.progress(1, 2, "writing the download bundle")
        write_bundle(self.version, preview=grid.image)
        self.progress(2, 2, "done")

    def render_blind_check(self) -> None:
        """Render the blind check's pairs: a held-out prompt and a fresh seed, drawn by the base
        model and by my LoRA, each kept as a hidden image for the owner to judge unlabelled."""
        from trainer import sample
        from trainer.prompts import read_prompts

        wanted = int(self.config["TASTE_BLIND_PAIRS"])
        if wanted <= 0:
            return
        strengths = blind.chosen_strengths(
            self.version.metrics.get("lora") or {}, self.config["TASTE_BLIND_STRENGTHS"]
        )
        specs = blind.plan(read_prompts("eval", self.prompts_file), wanted, strengths)
        steps = int(self.config["TASTE_SAMPLE_STEPS"])
        lora_folder = self.folder / self.version.lora_dir
        pictures = {}  # (strength, pair index) → picture; each strength's adapter loaded once
        for strength in (0.0, *strengths):
            rows = [
                k for k, spec in enumerate(specs) if not strength or spec["strength"] == strength
            ]
            said = "base model" if strength == 0 else f"LoRA at {strength:g}"
            drawn = sample.drawn(
                self.base,
                [(specs[k]["prompt"], [specs[k]["seed"]]) for k in rows],
                lora=lora_folder if strength else None,
                strength=strength,
                steps=steps,
                progress=lambda done, total, _, said=said: self.progress.report(
                    done, total, f"blind check, {said}: pair {done} of {total}"
                ),
                should_stop=self.progress.should_stop,
            )
            self.progress.check()
            pictures |= {(strength, k): made.image for k, made in zip(rows, drawn, strict=True)}
        source = blind.generated_source(self.version)
        pairs, same = [], 0
        for k, spec in enumerate(specs):
            base_id, lora_id = (
                blind.keep_picture(pictures[key, k], source, spec["prompt"])
                for key in (0.0, spec["strength"])
            )
            if base_id == lora_id:  # the LoRA changed nothing here: no choice to offer
                same += 1
                continue
            pairs.append(blind.new_pair(spec, base_id, lora_id))
        self.record(blind={"pairs": pairs, "strengths": strengths, "identical": same})


def smaller(config):
    """A LoRA config that needs less GPU memory: what costs most, halved (batch and the
    evaluation's prompts), with gradient checkpointing on."""
    return replace(
        config,
        gradient_checkpointing=True,
        batch_size=max(1, config.batch_size // 2),
        eval_prompts=max(1, config.eval_prompts // 2),
    )


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
        "resolution": version.metrics.get("resolution", 512),
        "scorer_sha256": scorer_sha256,
        "ratings": version.ratings_count,
        "score_gain": lora.get("score_gain"),
        "config": lora.get("config") or {},
        "author": version.owner.username,
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


def _timed(run: TasteRun, timings: dict, name: str, step) -> None:
    started = time.monotonic()
    run.progress.phase(name, PHASES[name])
    step()
    run.progress.check(fresh=True)  # Cancel pressed during the phase ends the job in it
    timings[name] = round(time.monotonic() - started, 1)
    run.record(seconds=timings)


def salvage_orphan(job: Job) -> None:
    """When a train_taste job's worker died: keep its last completed LoRA checkpoint."""
    version = db.session.scalar(select(TasteVersion).where(TasteVersion.job_id == job.id))
    if version is not None:
        salvage(version, lambda line: None)
        remove_partial_files(version)


def train_taste(job: Job, progress: JobProgress) -> dict:
    """Encode my ratings, finetune my scorer, train my taste LoRA, and render the results."""
    run = TasteRun(job, progress)
    timings: dict[str, float] = {}
    with gpu_job():
        try:
            _timed(run, timings, "encode", lambda: (run.load_base(), run.encode()))
            _timed(run, timings, "scorer", run.finetune_scorer)
            _timed(run, timings, "lora", run.train_lora)
            _timed(run, timings, "results", run.render_results)
        except BaseException:
            db.session.rollback()
            salvage(run.version, progress.log)
            raise
        finally:
            run.base = None  # so that gpu_job can give its memory back
            remove_partial_files(run.version)
    job.message = f"Done: taste version {run.version.number} is ready."
    return {"version_id": run.version.id}
