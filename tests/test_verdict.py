"""The version page's verdict: a gain is claimed only by a scorer shown to know the taste."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rating.verdict import beyond_chance, verdict


def version(srcc: float | None, held_out: int, gain: float = 1.55, ratings: int = 43):
    metrics = {
        "scorer": {"srcc": srcc, "val_size": held_out},
        "lora": {"score_gain": gain, "diversity": 0.82},
    }
    return SimpleNamespace(metrics=metrics, ratings_count=ratings, picks_count=0)


@pytest.mark.parametrize(
    ("srcc", "held_out", "expected"),
    [(0.31, 11, False), (0.60, 11, True), (0.31, 60, True), (0.25, 60, False), (-0.2, 40, False)],
)
def test_a_scorer_beats_chance_only_past_the_bound_for_its_held_out_images(
    srcc, held_out, expected
):
    assert beyond_chance(srcc, held_out) is expected


def test_random_ratings_get_no_success_headline():
    said = verdict(version(0.31, 11))  # a probe's random stars: 0.31 on 11 held-out images
    assert said.tone == "open"
    assert "raises your scorer's score" not in said.line
    assert "+1.55 stars higher, but it doesn't know your taste well enough" in said.line
    assert "rate more images (you have 43; 100+ helps)" in said.line
    assert said.caveats == [
        "Your scorer doesn't know your taste yet: it ranks your held-out images at SRCC 0.31"
        " on 11 images, which chance alone could give, and every score on this page comes"
        " from it."
    ]
    assert verdict(version(-0.23, 11)).tone == "open"  # worse than chance: no claim either


def test_too_few_held_out_images_say_it_cant_be_told_yet():
    said = verdict(version(0.9, 8))
    assert said.tone == "open" and "can't be told from so few held-out images" in said.line


def test_a_scorer_that_knows_the_taste_claims_its_gain():
    said = verdict(version(0.7, 20))
    assert said.tone == "good" and said.caveats == []
    assert said.line.startswith("Your taste LoRA raises your scorer's score by +1.55 stars")


def test_the_persons_own_eyes_settle_it_either_way():
    agree = {"won": 10, "answered": 12, "rate": 0.83, "low": 0.55, "high": 0.95}
    said = verdict(version(0.31, 11), blind=agree)
    assert said.tone == "good" and said.caveats[0].endswith("your own eyes agree.")
    disagree = {"won": 2, "answered": 12, "rate": 0.17, "low": 0.05, "high": 0.45}
    assert verdict(version(0.7, 20), blind=disagree).tone == "bad"


def test_a_lora_that_kept_step_0_says_it_draws_what_the_base_draws_and_why_that_may_be():
    kept = version(0.8, 60, gain=0.0)
    kept.metrics["lora"]["chosen_step"] = 0
    said = verdict(kept)
    assert said.tone == "bad"
    assert "so it kept step 0 and draws what the base draws" in said.line
    assert said.caveats[-1].startswith("A LoRA changes how the picture a prompt asks for looks")
    moved = version(0.8, 60, gain=0.0)
    moved.metrics["lora"]["chosen_step"] = 40
    assert verdict(moved).line.startswith("This LoRA didn't beat the base model")
    assert not any("what a prompt names" in c for c in verdict(moved).caveats)
