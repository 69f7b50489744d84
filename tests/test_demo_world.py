"""The demo world: shipped weights load offline and sample as recorded; its trainer resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import demo_world as dw
from trainer.base import DEMO, load_base
from trainer.demo_art import DEMO_STYLES
from trainer.prompts import DEMO_PROMPTS_FILE, read_prompts

# A fixed-seed sample of the shipped weights, measured once after training: a changed weight
# file, pipeline or scheduler moves these figures.
SAMPLE_PROMPT, SAMPLE_MEAN, SAMPLE_STD = "a pastel mandala", 0.74235, 0.10560

TINY = dw.WorldConfig(
    vae_channels=(8, 16, 16),
    unet_channels=(16, 32),
    text_width=16,
    train_images=48,
    heldout_images=8,
    vae_steps=4,
    vae_batch=8,
    unet_steps=4,
    unet_batch=8,
    checkpoint_every=2,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Make any attempt to reach the hub fail instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def world():
    """The demo base model as shipped."""
    return load_base(DEMO, device="cpu")


def test_shipped_weights_load_with_their_record(world):
    facts = dw.read_record()
    assert world.resolution == facts["config"]["image_size"] == 32
    assert world.pipeline.vae.config.scaling_factor == pytest.approx(facts["scaling_factor"])
    record = facts["record"]
    assert record["vae_steps"] == facts["config"]["vae_steps"]
    assert record["unet_steps"] == facts["config"]["unet_steps"]
    assert record["vae_psnr_heldout"] > 20  # dB: the VAE reconstructs, it doesn't invent
    assert dw.WEIGHTS.stat().st_size < 10 * 2**20
    assert world.prompts_file == DEMO_PROMPTS_FILE


def test_a_fixed_seed_sample_matches_the_stored_statistic(world):
    generator = torch.Generator("cpu").manual_seed(0)
    pixels = world.pipeline(
        SAMPLE_PROMPT, num_inference_steps=10, generator=generator, output_type="np"
    ).images[0]
    assert pixels.shape == (32, 32, 3)
    assert float(pixels.mean()) == pytest.approx(SAMPLE_MEAN, abs=2e-3)
    assert float(pixels.std()) == pytest.approx(SAMPLE_STD, abs=2e-3)


def test_prompts_describe_what_the_generator_drew():
    assert dw.describe("mandala", "pastel") == "a pastel mandala"
    assert dw.describe("orb", "analogous", grain=0.14) == "a grainy harmonious orb"
    assert dw.describe("orb", "mono", grain=0.03) == "a monochrome orb"  # faint grain unsaid
    assert dw.with_article("orb") == "an orb"
    rng = np.random.default_rng(0)
    drawn = {dw.training_prompt("colorfield", "garish", 0.0, rng) for _ in range(200)}
    assert drawn == {"a garish color field", "a color field", "a garish picture"}


def test_demo_prompt_file_holds_out_three_styles():
    train, evaluate = (
        read_prompts("train", DEMO_PROMPTS_FILE),
        read_prompts("eval", DEMO_PROMPTS_FILE),
    )
    assert not set(train) & set(evaluate)
    for style in ("marble", "orb", "rings"):
        assert not any(style in p for p in train) and any(style in p for p in evaluate)
    words = {dw.STYLE_WORDS[s] for s in DEMO_STYLES}
    assert all(any(w in p for w in words) or p.endswith("picture") for p in train)


class Interrupted(Exception):
    """Stands in for a killed process."""


def test_training_resumes_to_the_same_model_and_repeats(tmp_path):
    whole = dw.train_world(TINY, tmp_path / "whole", tmp_path / "whole.safetensors")
    assert whole["vae_steps"] == whole["unet_steps"] == 4

    def die_at_unet_step_3(step, total, message):
        if message.startswith("unet") and step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):  # after the step-2 checkpoint, before the next one
        dw.train_world(
            TINY, tmp_path / "cut", tmp_path / "cut.safetensors", progress=die_at_unet_step_3
        )
    assert not (tmp_path / "cut.safetensors").exists()
    seen = []
    dw.train_world(
        TINY,
        tmp_path / "cut",
        tmp_path / "cut.safetensors",
        progress=lambda step, total, message: seen.append((message.split()[0], step)),
    )
    assert seen == [("unet", 3), ("unet", 4)]  # the VAE was done; the UNet went on from 2
    a = dw.load_world(tmp_path / "whole.safetensors")
    b = dw.load_world(tmp_path / "cut.safetensors")
    for part in ("unet", "vae", "text_encoder"):
        wa, wb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part  # resumed = uninterrupted


def test_a_missing_or_foreign_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(dw.DemoWorldError, match="no demo-world weights"):
        dw.load_world(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "x"})
    with pytest.raises(dw.DemoWorldError, match="not a demo-world weights file"):
        dw.load_world(tmp_path / "other.safetensors")


def test_cli_info_prints_the_record(capsys):
    dw.main(["info"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["image_size"] == 32 and "vae_psnr_heldout" in printed["record"]


def test_cli_refuses_to_overwrite_checkpoints_without_resume(tmp_path, capsys):
    (tmp_path / "vae-checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        dw.main(["train", "--work", str(tmp_path), "--out", str(tmp_path / "w.safetensors")])
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err
