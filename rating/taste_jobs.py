"""The "Train my taste" job: latents → scorer → taste LoRA → results, one phase each.

A GPU job: it runs on the GPU queue, one at a time per worker. What it learns from is
gathered by `rating.taste_data`; where its files go, and what a stopped run keeps, is
`rating.taste_files`. Trainer modules are imported inside the phases, not at the top:
diffusers takes seconds to import, and the web process never needs it.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import replace
from pathlib import Path

from flask import current_app
from sqlalchemy import update

from rating import blind, blind_jobs
from rating.crowd_jobs import crowd_model_path
from rating.gpu_work import (
    base_model,
    encode_pictures,
    gpu_job,
    plain,
    prompts_file,
    release_memory,
)
from rating.jobs import JobCancelled, JobProgress
from rating.models import Job, TasteVersion, User, db
from rating.rate import judged_counts
from rating.taste_data import Judged, active_candidates
from rating.taste_files import (
    GRID_CELLS,
    GRID_IMAGE,
    LATENTS,
    LORA,
    SCORER,
    remove_partial_files,
    salvage,
    version_folder,
    write_bundle,
)
from trainer.formats import STRENGTHS, safetensors_metadata

PHASES = {
    "encode": "Encode my images",
    "scorer": "Train my scorer",
    "lora": "Train my taste LoRA",
    "results": "Render the results",
}
LOVE_HATE = 8  # unrated images shown as the scorer's best and worst guesses


def new_version(job: Job) -> TasteVersion:
    """Create the version a train_taste job fills, numbered after the owner's last one."""
    # One UPDATE takes the next number: it locks the owner's row until the commit below, so
    # two jobs at once get different numbers, and a deleted version's number is never reused.
    number = db.session.execute(
        update(User)
        .where(User.id == job.owner_id)
        .values(last_taste_number=User.last_taste_number + 1)
        .returning(User.last_taste_number)
    ).scalar_one()
    base_model = current_app.config["BASE_MODEL"]
    rated, picked = judged_counts(job.owner_id)  # what it starts from; encode() counts exactly
    version = TasteVersion(
        owner_id=job.owner_id,
        number=number,
        ratings_count=rated,
        picks_count=picked,
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
        self.pool_latents = None  # every encoded picture, mirrored too: one-step LoRA steps
        self.judged = None  # what the scorer learns from; set by encode()

    def record(self, **metrics) -> None:
        """Add figures to the version's metrics and commit, so the page shows them now."""
        self.version.metrics = {**self.version.metrics, **plain(metrics)}
        db.session.commit()

    def load_base(self) -> None:
        """Load the configured base model (the demo builds in a second, offline)."""
        from trainer.families import describe

        self.progress.log(f"loading the base model {self.version.base_model}")
        self.base = base_model(self.version.base_model)
        self.record(
            resolution=self.base.resolution,
            device=str(self.base.pipeline.device),
            family=describe(self.base.family, self.base.pipeline.scheduler.config),
        )

    def encode(self) -> None:
        """Encode my rated images, the images of my picks I never rated, and a sample of
        unrated ones (new ones only; the rest come from the cache); write my latents+scores
        file (the rated ones: it carries my stars)."""
        judged = Judged.of(self.job.owner_id, int(self.config["TASTE_PREDICT_POOL"]))
        what = judged.description()
        self.progress(0, len(judged.images), f"{what}: looking in the cache")
        encoded = encode_pictures(
            self.base,
            judged.images,
            lambda step, total, said: self.progress.report(step, total, f"{what}: {said}"),
            self.progress.should_stop,
        )
        if judged.rated:
            self.save_latents(judged, encoded)
        self.judged = judged.learning_data(encoded.latents, encoded.flipped, self.base.family)
        self.picks = judged.picks()
        self.unrated_ids = [image.id for image in judged.unrated]
        self.unrated_latents = encoded.latents[judged.known :]
        self.pool_latents = pool_latents(encoded)
        self.version.ratings_count, self.version.picks_count = len(judged.rated), len(self.picks)
        cached = len(set(encoded.sha256s)) - encoded.encoded
        self.progress.log(
            f"encoded {encoded.encoded} new images ({len(judged.picked)} only in your picks); "
            f"{cached} came from the cache"
        )
        counts = {"new": encoded.encoded, "cached": cached, "picked_only": len(judged.picked)}
        self.record(encoded={**counts, "unrated": len(judged.unrated)})

    def save_latents(self, judged: Judged, encoded) -> None:
        """Write my latents + stars file: the rated rows, for download and reuse."""
        from trainer.latents import save_latents_file

        n = len(judged.rated)
        save_latents_file(
            self.folder / LATENTS,
            encoded.latents[:n],
            judged.stars,
            [image.sha256 for image, _ in judged.rated],
            flipped=encoded.flipped[:n] if encoded.flipped is not None else None,
            metadata={
                "base_model": self.version.base_model,
                "family": self.base.family,
                "owner": self.version.owner.username,
            },
        )
        self.version.latents_file = LATENTS

    def scorer_init(self, shape: list[int]) -> tuple[str | None, str]:
        """Pick the trunk to start from: the configured file, else a fitting crowd model.

        Returns the file (None: from scratch) and how to name it on the page.
        """
        if self.config["SCORER_INIT"]:
            return str(self.config["SCORER_INIT"]), "the configured trunk (SCORER_INIT)"
        crowd = crowd_model_path(self.version.base_model)
        if not crowd.is_file():
            return None, "scratch"
        metadata = safetensors_metadata(crowd)
        fits = json.loads(metadata.get("input_shape", "null")) == shape
        if not fits or metadata.get("family", self.base.family) != self.base.family:
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
            progress=self.progress.in_words("Learning what you like from your ratings"),
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
        return prompts_file(self.base)

    def train_lora(self) -> None:
        """Train my taste LoRA against my scorer; on GPU OOM retry once, smaller."""
        from trainer import lora

        preset = lora.preset_for(self.base) | {"prompts_file": str(self.prompts_file)}
        if self.config["PRECISION"] == "full":  # fp32 weights, and no autocast over them
            preset["mixed_precision"] = "no"
        config = lora.TasteLoraConfig.from_dict({**preset, **self.config["TASTE_LORA"]})
        train = functools.partial(
            lora.train,
            self.base,
            self.folder / SCORER,
            self.folder / LORA,
            images=self.pool_latents,
            progress=self.progress.in_words("Teaching the model to draw more of what you like"),
            should_stop=self.progress.should_stop,
        )
        result = self.smaller_after_oom(train, config)
        chosen = result.get("chosen_checkpoint")
        if chosen:
            self.version.lora_dir = Path(chosen).relative_to(self.folder).as_posix()
        self.record(lora={k: v for k, v in result.items() if k != "chosen_checkpoint"})
        if result.get("stopped"):
            if self.version.lora_dir:
                write_bundle(self.version, preview=None)
            raise JobCancelled()

    def smaller_after_oom(self, train, config) -> dict:
        """`train(config)`; when the GPU runs out of memory, once more with `smaller(config)`,
        saying so on the page."""
        import torch

        try:
            return train(config)
        except torch.OutOfMemoryError:
            pass  # retried below: inside `except` the traceback would keep the failed
            # attempt's frames, and with them its activations and graph, in GPU memory
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
            return train(config)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"out of GPU memory even with gradient checkpointing, batch size "
                f"{config.batch_size} and {config.eval_prompts} evaluation prompts. Lower "
                "rank, sample_steps or eval_seeds in TASTE_LORA, or use a GPU with more "
                "memory."
            ) from error

    def render_results(self) -> None:
        """Render the before/after grid with my scorer's scores, then the download bundle."""
        from trainer import sample
        from trainer.prompts import read_prompts
        from trainer.scorer import load_scorer

        prompts = read_prompts("eval", self.prompts_file)[: int(self.config["TASTE_GRID_PROMPTS"])]
        seeds = list(range(int(self.config["TASTE_GRID_SEEDS"])))
        # one count for the phase: the grid's renders, the blind check's pictures, the bundle
        renders = len(STRENGTHS) * len(prompts)
        count = renders + 2 * max(0, int(self.config["TASTE_BLIND_PAIRS"])) + 1
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
            progress=self.progress.part(0, count),
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
        self.render_blind_check(report=self.progress.part(renders, count))
        self.progress(count - 1, count, "writing the download bundle")
        write_bundle(self.version, preview=grid.image)
        self.progress(count, count, "done")

    def render_blind_check(self, report) -> None:
        """Render the blind check's pairs: a held-out prompt and a fresh seed, drawn by the base
        model and by my LoRA, each kept as a hidden image for the owner to judge unlabelled
        (`report`: the results phase's count, after the grid)."""
        from trainer.prompts import read_prompts

        wanted = int(self.config["TASTE_BLIND_PAIRS"])
        if wanted <= 0:
            return
        strengths = blind.chosen_strengths(
            self.version.metrics.get("lora") or {}, self.config["TASTE_BLIND_STRENGTHS"]
        )
        specs = blind.plan(read_prompts("eval", self.prompts_file), wanted, strengths)
        pairs, same = blind_jobs.draw(self.base, self.version, specs, self.progress, report)
        self.record(blind={"pairs": pairs, "strengths": strengths, "identical": same})


def pool_latents(encoded):
    """The latents of every picture the job encoded (rated, picked, unrated) and of their
    mirror images: the real pictures a one-step LoRA step noises and denoises."""
    import torch

    if encoded.flipped is None:
        return encoded.latents
    return torch.cat([encoded.latents, encoded.flipped])


def smaller(config):
    """A LoRA config that needs less GPU memory: what costs most, halved (batch and the
    evaluation's prompts), with gradient checkpointing on."""
    return replace(
        config,
        gradient_checkpointing=True,
        batch_size=max(1, config.batch_size // 2),
        eval_prompts=max(1, config.eval_prompts // 2),
    )


def _timed(run: TasteRun, timings: dict, name: str, step) -> None:
    started = time.monotonic()
    run.progress.phase(name, PHASES[name])
    step()
    run.progress.check(fresh=True)  # Cancel pressed during the phase ends the job in it
    timings[name] = round(time.monotonic() - started, 1)
    run.record(seconds=timings)


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
