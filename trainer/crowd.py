"""The crowd model: one scorer trained on everyone's ratings, each rater's stars z-scored first.

It is the cold-start scorer (what a new user sees before they have rated much) and the trunk
a personal scorer is finetuned from when no imported or pretrained trunk is configured. It is
an ordinary scorer file (`trainer.scorer.save_scorer`), so `trainer.scorer.train(init=...)`
and `python -m trainer.scorer score` take it as they are; its metrics say it is a crowd model.

Why z-score: a harsh rater's 3 and a lenient rater's 5 can mean the same thing. Averaging raw
stars would make an image's crowd score depend on who happened to rate it; subtracting each
rater's mean and dividing by their spread keeps only what every rater can tell us — which
images they like more than their own usual.

    python -m trainer.crowd train --data x.safetensors --ratings ratings.csv --out crowd.safetensors

ratings.csv has a header with `rater`, `stars` and either `sha256` (matched against the latents
file's sha256s) or `row` (an index into the latents file).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from trainer.callbacks import Progress, StopCheck, never_stop, no_progress
from trainer.latents import LatentsFile, LatentsFileError, load_latents_file
from trainer.scorer import (
    TASTES,
    RidgeDesign,
    Scorer,
    ScorerConfig,
    ScorerFileError,
    TrainedScorer,
    ridge,
    ridge_choice,
    save_scorer,
    train,
)

# Below this, a rater's mean and spread are guesses: with two ratings every rater's z-scores are
# ±1 whatever stars they gave. Their ratings are left out rather than trusted.
MIN_RATINGS_PER_RATER = 5
# Stars. A rater who gives nearly the same stars to everything would otherwise have a tiny
# spread, and their one odd rating a huge z-score; one who gives only 4s gets z = 0 everywhere
# (they saw the images and told them apart no more than that).
STD_FLOOR = 0.5
STAR_RANGE = (1.0, 5.0)
CENTRE = 3.0  # the middle star: where a crowd score of "as liked as raters' own average" sits


def _crowd_targets(
    rater_ids: Sequence[int],
    rows: Sequence[int],
    stars: Sequence[float],
    n_rows: int,
    min_ratings_per_rater: int,
    std_floor: float,
) -> tuple[torch.Tensor, dict]:
    """Crowd scores per row and a JSON-ready account of whom and what they came from."""
    raters = torch.as_tensor(rater_ids, dtype=torch.long)
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    stars_t = torch.as_tensor(stars, dtype=torch.float64)  # float64: sums over many ratings
    if not (raters.ndim == rows_t.ndim == stars_t.ndim == 1):
        raise ValueError("rater_ids, rows and stars must be flat sequences")
    if not len(raters) == len(rows_t) == len(stars_t):
        raise ValueError(
            f"{len(raters)} rater ids, {len(rows_t)} rows and {len(stars_t)} stars: "
            "one of each per rating"
        )
    if len(rows_t) and (rows_t.min() < 0 or rows_t.max() >= n_rows):
        raise ValueError(f"a row index is outside 0..{n_rows - 1}")
    if not torch.isfinite(stars_t).all():
        raise ValueError("stars holds NaN or infinite values")

    _, rater = torch.unique(raters, return_inverse=True)
    count = torch.bincount(rater).double()
    mean = torch.bincount(rater, weights=stars_t) / count
    spread = (torch.bincount(rater, weights=(stars_t - mean[rater]).square()) / count).sqrt()
    spread = spread.clamp(min=std_floor)
    kept_rater = count >= min_ratings_per_rater
    kept = kept_rater[rater]

    scores = torch.full((n_rows,), float("nan"), dtype=torch.float64)
    account = {
        "raters": int(kept_rater.sum()),
        "ratings": int(kept.sum()),
        "images": 0,
        "raters_left_out": int((~kept_rater).sum()),
        "ratings_left_out": int((~kept).sum()),
        "min_ratings_per_rater": min_ratings_per_rater,
        "std_floor": std_floor,
    }
    if not kept.any():
        return scores.float(), account
    z = (stars_t - mean[rater]) / spread[rater]
    z_sum = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows_t[kept], z[kept])
    z_count = torch.bincount(rows_t[kept], minlength=n_rows)
    rated = z_count > 0
    # Back to stars, because the scorer's head predicts on the 1–5 scale: then the crowd model
    # is a usable cold-start scorer, and its head starts on the scale personal ratings use.
    # The centre is the middle star, not the crowd's mean star, so no rater's offset leaks
    # back in (an all-lenient crowd gives the same scores as an all-harsh one); the scale is
    # the typical distance of a rating from its rater's own mean, so the scores spread like
    # one rater's stars.
    deviation = stars_t[kept] - mean[rater[kept]]
    scale = max(float(deviation.square().mean().sqrt()), std_floor)
    scores[rated] = (CENTRE + scale * z_sum[rated] / z_count[rated]).clamp(*STAR_RANGE)
    account.update(images=int(rated.sum()), scale=round(scale, 4))
    return scores.float(), account


def crowd_scores(
    rater_ids: Sequence[int],
    rows: Sequence[int],
    stars: Sequence[float],
    n_rows: int,
    *,
    min_ratings_per_rater: int = MIN_RATINGS_PER_RATER,
    std_floor: float = STD_FLOOR,
) -> torch.Tensor:
    """Return each row's crowd score on the star scale from z-scored ratings; NaN if unrated.

    Rating k says rater `rater_ids[k]` gave row `rows[k]` `stars[k]` stars. Each rater's stars
    become z-scores against their own mean and spread (the spread floored at `std_floor`);
    raters with fewer than `min_ratings_per_rater` ratings are left out. A row's crowd score
    is its mean z-score mapped back to stars (3 + z · the raters' typical spread), clamped
    to [1, 5]. Two ratings of one row by one rater count as two (the site keeps one).
    """
    scores, _ = _crowd_targets(rater_ids, rows, stars, n_rows, min_ratings_per_rater, std_floor)
    return scores


def train_crowd(
    data: LatentsFile,
    rater_ids: Sequence[int],
    rows: Sequence[int],
    stars: Sequence[float],
    config: ScorerConfig | None = None,
    *,
    init: str | Path | None = None,
    min_ratings_per_rater: int = MIN_RATINGS_PER_RATER,
    std_floor: float = STD_FLOOR,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> TrainedScorer:
    """Train the crowd scorer on everyone's ratings of a latents file's rows (its scores unused).

    `init` is an imported or pretrained trunk to start from; without it the crowd model trains
    from scratch. Rows nobody (counted) rated are left out of training. The result's metrics
    hold a `crowd` entry (raters, ratings, images, what was left out and why) and its
    `ratings` counts individual ratings, not images.
    """
    n_rows = len(data.latents)
    scores, account = _crowd_targets(
        rater_ids, rows, stars, n_rows, min_ratings_per_rater, std_floor
    )
    if not account["images"]:
        raise ValueError(
            f"no rater has {min_ratings_per_rater} ratings yet: nothing to train a crowd model on"
        )
    rated = torch.isfinite(scores)
    # Unrated rows would cost a forward pass each step and add nothing: train on the rated ones.
    keep = rated.nonzero().squeeze(1)
    crowd = replace(
        data,
        latents=data.latents[keep],
        scores=scores[keep],
        flipped=data.flipped[keep] if data.flipped is not None else None,
        sha256s=[data.sha256s[k] for k in keep.tolist()] if data.sha256s is not None else None,
    )
    progress(0, 1, f"crowd targets: {account['ratings']} ratings from {account['raters']} raters")
    trained = train(crowd, config, init=init, progress=progress, should_stop=should_stop)
    model = trained.model
    if model.stats_head is not None:
        found = taste_directions(model, data.latents, rater_ids, rows, stars)
        model.stats_tastes.zero_()
        model.stats_tastes[: len(found)] = found
        account = {**account, "taste_directions": len(found)}
    return replace(
        trained, metrics={**trained.metrics, "crowd": account}, ratings=account["ratings"]
    )


MIN_TASTE_RATINGS = 20  # a rater's ratings before their taste counts towards the directions


def taste_directions(
    model: Scorer,
    latents: torch.Tensor,
    rater_ids: Sequence[int],
    rows: Sequence[int],
    stars: Sequence[float],
    keep: int = TASTES,
) -> torch.Tensor:
    """The directions the crowd's tastes span, in the model's scaled statistics: each rater
    with `MIN_TASTE_RATINGS` or more gets a ridge fit of their own stars; the top right
    singular vectors of those fits (each of unit length) are the directions, [≤ keep, width].

    A personal scorer started from this model may lean on them (`trainer.scorer.designs`): a
    newcomer whose taste is like some of the crowd's then needs far fewer ratings to be read.
    """
    by_rater: dict[int, list[tuple[int, float]]] = {}
    for rater, row, given in zip(rater_ids, rows, stars, strict=True):
        by_rater.setdefault(rater, []).append((row, float(given)))
    z = model.standardised_stats(latents)
    design = RidgeDesign(model.stats_scale.cpu())
    fits = []
    for judged in by_rater.values():
        y = torch.tensor([given for _, given in judged])
        if len(judged) < MIN_TASTE_RATINGS or y.std() == 0:
            continue
        mine = z[[row for row, _ in judged]]
        _, alpha, _ = ridge_choice(mine, y, [design])
        weights, _ = ridge(design.features(mine), y, alpha)
        if weights.norm() > 0:
            fits.append(weights / weights.norm())
    if len(fits) < 2:
        return torch.zeros(0, z.shape[1])
    _, _, directions = torch.linalg.svd(torch.stack(fits).double(), full_matrices=False)
    return directions[:keep].float()


# ---- command line ---------------------------------------------------------------------------


def read_ratings_csv(
    path: str | Path, data: LatentsFile
) -> tuple[list[int], list[int], list[float], int]:
    """Read `rater`, `stars` and `sha256` or `row` columns; return ids, rows, stars, skipped.

    Raters may be named by anything (user ids, names); they are numbered in order of first
    appearance. A sha256 the latents file does not hold is skipped and counted, since a
    ratings export often covers more images than one latents file.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = set(reader.fieldnames or ())
        if not {"rater", "stars"} <= columns or not columns & {"sha256", "row"}:
            raise ValueError(f"{path}: needs a header with rater, stars and sha256 or row")
        by_sha = None
        if "row" not in columns:
            if data.sha256s is None:
                raise ValueError(f"{path} names images by sha256 but the latents file has none")
            by_sha = {sha.lower(): k for k, sha in enumerate(data.sha256s)}
        numbers: dict[str, int] = {}
        rater_ids, rows, stars, skipped = [], [], [], 0
        for line, record in enumerate(reader, start=2):
            try:
                rater, value = record["rater"].strip(), float(record["stars"])
                if by_sha is not None:
                    row = by_sha.get(record["sha256"].strip().lower())
                else:
                    row = int(record["row"])
            except (TypeError, ValueError, AttributeError):  # AttributeError: a short line
                raise ValueError(f"{path} line {line}: unreadable rater, stars or row") from None
            if row is None:
                skipped += 1
                continue
            rater_ids.append(numbers.setdefault(rater, len(numbers)))
            rows.append(row)
            stars.append(value)
    return rater_ids, rows, stars, skipped


def main(argv: list[str] | None = None) -> None:
    """Train the crowd scorer: `python -m trainer.crowd train ...`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.crowd")
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="train the crowd scorer on everyone's ratings")
    tr.add_argument("--data", required=True, help="latents .safetensors (trainer.latents)")
    tr.add_argument("--ratings", required=True, help="CSV: rater, stars, and sha256 or row")
    tr.add_argument("--out", required=True, help="the scorer .safetensors to write")
    tr.add_argument("--init", help="an imported or pretrained trunk to start from")
    tr.add_argument(
        "--min-ratings",
        type=int,
        default=MIN_RATINGS_PER_RATER,
        help="leave out raters with fewer ratings (their offset cannot be told)",
    )
    tr.add_argument("--val-fraction", type=float, default=ScorerConfig.val_fraction)
    tr.add_argument("--seed", type=int, default=ScorerConfig.seed)
    tr.add_argument("--config", help="JSON object of further ScorerConfig settings")
    args = parser.parse_args(argv)
    try:
        data = load_latents_file(args.data)
        rater_ids, rows, stars, skipped = read_ratings_csv(args.ratings, data)
        settings = json.loads(args.config) if args.config else {}
        if not isinstance(settings, dict):
            raise ValueError("--config must be a JSON object")
        settings.update(val_fraction=args.val_fraction, seed=args.seed)
        trained = train_crowd(
            data,
            rater_ids,
            rows,
            stars,
            ScorerConfig.from_dict(settings),
            init=args.init,
            min_ratings_per_rater=args.min_ratings,
        )
        save_scorer(args.out, trained)
    except (LatentsFileError, ScorerFileError, TypeError, ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    summary = {**trained.metrics, "ratings_skipped": skipped, "out": args.out}
    json.dump({**summary, "init": trained.init}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
