"""What a person's taste job learns from, and what it asks them to judge next.

`Judged` gathers their stars, their picks and a sample of the pool to guess at;
`active_candidates` turns the scorer's guesses into the images and pairs worth asking about.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sqlalchemy import select

from rating.models import Comparison, Image, Rating, db

ACTIVE_KEPT = 50  # unrated images kept per list for the rating page to mix in
# the edge of the top sharpens what a person loves but teaches the whole ranking less: the page
# takes the two lists in turn, so a short one is a small part of what is asked (bench/README.md)
EDGE_KEPT = 5
OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5}


def active_candidates(guesses: list[dict], stars, keep: int = ACTIVE_KEPT) -> dict:
    """The unrated images most worth rating next, by id: those whose rating would teach the
    scorer most, as a batch (`value`, see trainer.scorer.rating_value: the first k are the
    greedy batch of k, so working down the list never piles onto one kind of image), and a
    few whose predicted score sits nearest the edge of the person's top fifth (where a rating
    best separates what they love from what they merely like), least sure first; and the
    pairs whose outcome the scorer finds closest to a coin flip (nearly equal predicted
    scores, least sure first), for the compare page."""
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
        "edge_of_top": [g["image_id"] for g in near_top[: min(keep, EDGE_KEPT)]],
        "top_edge_stars": round(edge, 2),
        "coin_flips": [[a["image_id"], b["image_id"]] for a, b in close[: keep // 2]],
    }


@dataclass(frozen=True)
class Judged:
    """What a person's scorer learns from, and the pool images it guesses at."""

    rated: list  # (Image, stars), by image id
    picked: list[Image]  # images of their picks they never rated
    unrated: list[Image]  # a sample of the pool they haven't judged, seeded by their judgements
    comparisons: list  # (image a id, image b id, outcome)

    @classmethod
    def of(cls, owner: int, sample: int) -> Judged:
        """Read a person's ratings and picks, and sample up to `sample` unjudged images.

        The sample is drawn at random with a seed made of the person and how many judgements
        they have: the same ratings train the same scorer and LoRA again (the trainers are
        seeded too), and each new rating draws a fresh sample."""
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
        candidates = db.session.scalars(
            select(Image.id)
            .where(Image.hidden.is_(False), Image.id.not_in(mine), Image.id.not_in(picked_ids))
            .order_by(Image.id)
        ).all()
        seed = f"{owner}:{len(rated)}:{len(comparisons)}"
        chosen = random.Random(seed).sample(candidates, min(sample, len(candidates)))
        unrated = db.session.scalars(
            select(Image).where(Image.id.in_(chosen)).order_by(Image.id)
        ).all()
        return cls(list(rated), list(picked), list(unrated), list(comparisons))

    def description(self) -> str:
        """Say what is encoded, as the progress bar shows it."""
        said = f"{len(self.rated)} rated images"
        if self.picked:
            said += f", {len(self.picked)} only in your picks"
        if self.unrated:
            said += f" and {len(self.unrated)} unrated ones, to guess what I'd love and hate"
        return said

    @property
    def images(self) -> list[Image]:
        """Every image to encode, in row order: rated, then picked only, then unrated."""
        return [image for image, _ in self.rated] + self.picked + self.unrated

    @property
    def known(self) -> int:
        """How many leading rows the scorer learns from (rated and picked-only images)."""
        return len(self.rated) + len(self.picked)

    @property
    def stars(self) -> list[float]:
        return [float(stars) for _, stars in self.rated]

    def picks(self) -> list[tuple[int, int, float]]:
        """The picks as (row, row, outcome), rows of `images`: 1 = the first won, 0.5 = a tie."""
        rows = {image.id: row for row, image in enumerate(self.images[: self.known])}
        return [(rows[a], rows[b], OUTCOMES[o]) for a, b, o in self.comparisons]

    def learning_data(self, latents, flipped, family: str):
        """The scorer's data (trainer.latents.LatentsFile) from the encoded `images`' latents
        (of a base model of this family): the rated and picked-only rows, stars for the
        rated and NaN for the rest."""
        import torch

        from trainer.latents import LatentsFile

        known = self.known
        return LatentsFile(
            latents=latents[:known],
            scores=torch.tensor(self.stars + [math.nan] * len(self.picked)),
            flipped=flipped[:known] if flipped is not None else None,
            sha256s=[image.sha256 for image in self.images[:known]],
            metadata={"family": family},
        )
