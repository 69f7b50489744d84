"""A taste version's results in plain words: the one-line verdict and how far to trust it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rating.blind import call
from rating.models import TasteVersion

MIN_GAIN = 0.05  # stars: a held-out gain smaller than this is no gain worth claiming
FEW_HELD_OUT = 10  # held-out images below which the scorer's figures can't be judged
WEAK_SRCC = 0.3  # a scorer ranking held-out images worse than this is a rough guess
ENOUGH_JUDGEMENTS = 100  # ratings + picks from which scorers usually settle
FULL_VARIETY = 0.95  # diversity (against the base model) that counts as not narrowed
KEPT_NOTHING = (
    "A LoRA changes how the picture a prompt asks for looks, not what it asks for: if your"
    " stars follow what a prompt names (a subject, a style), there is little for it to learn."
    " Rate by what you like within each kind of picture, and train again."
)


@dataclass(frozen=True)
class Verdict:
    tone: str  # good | bad | open: how the page colours it
    line: str  # the one-line verdict
    caveats: list[str]  # what limits it, each a sentence


def judgements(version: TasteVersion) -> int:
    """The ratings and picks the version learned from."""
    return version.ratings_count + version.picks_count


def beyond_chance(srcc: float, held_out: int) -> bool:
    """Whether a held-out SRCC shows the scorer ranks better than chance: above the one-sided
    95% bound of a rank correlation on that many images (1.645 / √(n − 1): 0.52 on 11 images,
    0.24 on 50), and never below WEAK_SRCC."""
    return held_out >= 2 and srcc >= max(WEAK_SRCC, 1.645 / math.sqrt(held_out - 1))


def scorer_caveat(version: TasteVersion) -> str | None:
    """Why the scorer's own figures are too thin to lean on, or None."""
    scorer = version.metrics.get("scorer") or {}
    held_out, srcc = scorer.get("val_size") or 0, scorer.get("srcc")
    if held_out < FEW_HELD_OUT:
        return (
            f"Your scorer was checked on only {held_out} held-out images, too few to judge how"
            " well it knows your taste; every score on this page comes from it."
        )
    if srcc is None or not beyond_chance(srcc, held_out):
        ranks = "at chance" if srcc is None else f"at SRCC {srcc:.2f} on {held_out} images"
        return (
            f"Your scorer doesn't know your taste yet: it ranks your held-out images {ranks},"
            " which chance alone could give, and every score on this page comes from it."
        )
    return None


def verdict(version: TasteVersion, blind: dict | None = None) -> Verdict | None:
    """The version's verdict: did its LoRA beat the base model, by how much, at what cost.

    `blind` is the owner's blind-check summary (rating.blind.summary), when they took it.
    None while the LoRA is not trained yet.
    """
    lora = version.metrics.get("lora")
    if not lora or lora.get("score_gain") is None:
        return None
    gain, diversity = lora["score_gain"], lora.get("diversity") or 0.0
    count = judgements(version)
    more = (
        f"rate more images (you have {count}; {ENOUGH_JUDGEMENTS}+ helps)"
        if count < ENOUGH_JUDGEMENTS
        else "rate more images, or compare pairs, where your taste is least clear"
    )
    doubt = scorer_caveat(version)
    held_out = (version.metrics.get("scorer") or {}).get("val_size") or 0
    if gain >= MIN_GAIN and doubt:  # a gain by a scorer that can't rank my images is no claim
        tone = "open"
        why = (
            "whether it knows your taste can't be told from so few held-out images"
            if held_out < FEW_HELD_OUT
            else "it doesn't know your taste well enough yet for that to mean much"
        )
        line = (
            f"Your scorer rates this LoRA's pictures {gain:+.2f} stars higher, but {why}; {more}."
        )
    elif gain >= MIN_GAIN:
        variety = (
            "without narrowing variety"
            if diversity >= FULL_VARIETY
            else f"keeping {diversity:.0%} of the base model's variety"
        )
        tone = "good"
        line = (
            f"Your taste LoRA raises your scorer's score by {gain:+.2f} stars on prompts it never"
            f" trained on, {variety}."
        )
    elif lora.get("chosen_step") == 0:
        tone = "bad"
        line = (
            "No checkpoint of this LoRA beat the base model without drifting from it or"
            f" narrowing its variety, so it kept step 0 and draws what the base draws; {more}."
        )
    else:
        tone = "bad"
        line = f"This LoRA didn't beat the base model; {more}."
    caveats = [doubt] if doubt else []
    if lora.get("chosen_step") == 0:
        caveats.append(KEPT_NOTHING)
    if blind:
        said = (
            f"In your blind check you preferred it in {blind['won']:g} of {blind['answered']}"
            f" pairs ({blind['rate']:.0%}, 95% CI {blind['low']:.0%}–{blind['high']:.0%})"
        )
        said_by_eyes = call(blind)
        if said_by_eyes == "lora":
            tone = "good" if tone == "open" else tone  # their own eyes outrank any scorer
            caveats.insert(0, f"{said}: your own eyes agree.")
        elif said_by_eyes == "base":
            tone = "bad"
            caveats.insert(0, f"{said}: your own eyes disagree with the scorer; {more}.")
        else:
            tone = "open" if tone == "good" else tone
            caveats.insert(0, f"{said}: too close to call yet.")
    elif tone == "good" and caveats:
        tone = "open"
    return Verdict(tone, line, caveats)
