"""Drawing the blind check's pairs: once in the taste job's results phase, and again when the
owner asks for more pairs because their verdict is still too close to call (a GPU job).

Each pair is one held-out prompt and a seed the LoRA never saw, drawn by the base model and
with the LoRA; both pictures are kept as hidden images (`rating.blind`). A pair whose two
pictures are the same pixels is dropped: there is no choice to offer.
"""

from __future__ import annotations

from flask import current_app

from rating import blind
from rating.gpu_work import base_model, gpu_job, plain, prompts_file
from rating.jobs import JobProgress
from rating.models import Job, TasteVersion, db
from rating.taste_files import version_folder


def draw(
    base, version: TasteVersion, specs: list[dict], progress: JobProgress, report=None
) -> tuple:
    """Draw the pairs `specs` lays out (rating.blind.plan) and keep their pictures; return
    (pairs as the version records them, how many came out identical and were dropped).
    `report(pictures drawn, of how many, message)` shows the count (default: the job's)."""
    from trainer import sample

    report = report or progress.report
    lora_folder = version_folder(version) / version.lora_dir
    steps = int(current_app.config["TASTE_SAMPLE_STEPS"])
    pictures = {}  # (strength, pair index) → picture; each strength's adapter loaded once
    count = 2 * len(specs)  # one bar for both sides: it never starts over at the LoRA's turn
    for strength in (0.0, *sorted({spec["strength"] for spec in specs})):
        rows = [k for k, spec in enumerate(specs) if not strength or spec["strength"] == strength]
        said = "base model" if strength == 0 else f"LoRA at {strength:g}"
        before = len(pictures)  # pictures drawn so far, of `count`
        drawn = sample.drawn(
            base,
            [(specs[k]["prompt"], [specs[k]["seed"]]) for k in rows],
            lora=lora_folder if strength else None,
            strength=strength,
            steps=steps,
            progress=lambda done, total, _, said=said, before=before: report(
                before + done, count, f"blind check, {said}: pair {done} of {total}"
            ),
            should_stop=progress.should_stop,
        )
        progress.check()
        pictures |= {(strength, k): made.image for k, made in zip(rows, drawn, strict=True)}
    source = blind.generated_source(version)
    pairs, same = [], 0
    for k, spec in enumerate(specs):
        base_id, lora_id = (
            blind.keep_picture(pictures[key, k], source, spec["prompt"])
            for key in (0.0, spec["strength"])
        )
        if base_id == lora_id:
            same += 1
        else:
            pairs.append(blind.new_pair(spec, base_id, lora_id))
    return pairs, same


def draw_more_pairs(job: Job, progress: JobProgress) -> dict:
    """The "Judge more pairs" job: draw `pairs` more pairs for a version's blind check, on
    prompts and seeds after the ones it has, and add them to the check."""
    from trainer.prompts import read_prompts

    version = db.session.get(TasteVersion, job.params["version_id"])
    if version is None or not version.lora_dir or not blind.pairs_of(version):
        raise RuntimeError("that taste version was deleted, or has no blind check to extend")
    checked = version.metrics["blind"]
    progress.phase("blind", f"Loading {version.base_model}")
    with gpu_job():
        base = base_model(version.base_model)
        start = blind.drawn_so_far(version)
        strengths = blind.chosen_strengths(version.metrics.get("lora") or {}, checked["strengths"])
        specs = blind.plan(
            read_prompts("eval", prompts_file(base)), int(job.params["pairs"]), strengths, start
        )
        pairs, same = draw(base, version, specs, progress)
    version = db.session.get(TasteVersion, version.id, populate_existing=True)  # as it is now
    if version is None:
        raise RuntimeError("that taste version was deleted while its pairs were drawn")
    checked = version.metrics["blind"]
    grown = {"pairs": checked["pairs"] + pairs, "identical": checked.get("identical", 0) + same}
    version.metrics = {**version.metrics, "blind": checked | plain(grown)}
    job.message = f"{len(pairs)} more pairs to judge."
    db.session.commit()
    return {"version_id": version.id, "added": len(pairs), "identical": same}
