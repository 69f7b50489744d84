"""One synthetic rater, end to end through the trainer's CLIs: the taste reaches the pictures."""

from __future__ import annotations

import argparse

import pytest

from bench.raters import Rater, softness
from bench.taste_transfer import render_pack, run_rater
from trainer.prompts import DEMO_PROMPTS_FILE, read_prompts


@pytest.mark.slow
def test_a_pastel_lover_gets_more_pastel_pictures(tmp_path):
    args = argparse.Namespace(
        prompts=read_prompts("eval", DEMO_PROMPTS_FILE)[:6],
        seeds="100-105",
        sample_steps=15,
        lora_steps=60,
        threads=1,
    )
    pack = render_pack(tmp_path / "pack", 150)
    result = run_rater(Rater("pastel", softness), pack, tmp_path / "pastel", args)
    stars = result["true_stars"]
    assert result["scorer_srcc"] > 0.5  # the scorer learnt the taste from 150 noisy ratings
    assert result["true_gain"] > 0.2, result  # the rater's own eyes see the LoRA's pictures improve
    assert stars["-1"] < stars["0"] < stars["1"], result
    assert result["diversity"] > 0.6, result
