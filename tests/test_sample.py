"""Grids and refinement on the demo model: fair columns, scores on the decoded latents, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import lora
from trainer import sample as sm
from trainer.base import DEMO, load_base, load_vae
from trainer.demo_world import load_world
from trainer.latents import encode_pixels, load_pixels
from trainer.prompts import DEMO_PROMPTS_FILE, read_prompts
from trainer.scorer import Scorer, ScorerConfig, TrainedScorer, predict, save_scorer

TINY = ScorerConfig(channels=(8, 16, 32, 64))
PROMPTS = ["a red apple on a table", "a lighthouse at dusk"]
SEEDS = [0, 1]
SIDE = 32  # the demo world's pictures


@pytest.fixture(scope="module")
def base():
    """Return the demo base model on the CPU."""
    return load_base(DEMO, device="cpu")


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    """Return a tiny random scorer: refinement must raise its score, whatever it likes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Scorer(TINY).eval()


@pytest.fixture(scope="module")
def scorer_file(scorer, tmp_path_factory):
    """Return the path of the tiny scorer saved as a scorer file."""
    path = tmp_path_factory.mktemp("scorer") / "scorer.safetensors"
    trained = TrainedScorer(scorer, TINY, {}, [4, 8, 8], ratings=0, pairs=0, init="scratch")
    save_scorer(path, trained)
    return path


@pytest.fixture(scope="module")
def taste_lora(tmp_path_factory):
    """Return a LoRA checkpoint folder whose adapter visibly changes the demo world's UNet."""
    pipe = load_world()  # a copy of the demo world, so the shared `base` stays untouched
    pipe.unet.add_adapter(lora.lora_config(4, 8), adapter_name=lora.ADAPTER)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # B starts at zero (identity adapter); make it do something
                param.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("lora") / "checkpoint"
    return lora.save_checkpoint(pipe.unet, folder, {"step": 1})


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """Return a non-square test picture (so the centre crop is exercised): bands and noise."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    pixels[:, :48, 0] = 220
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def made_grid(base, scorer, taste_lora) -> sm.Grid:
    """Return a 2 prompts × 2 seeds × 4 strengths grid from 2-step renders."""
    return sm.grid(base, scorer, PROMPTS, SEEDS, lora_folder=taste_lora, steps=2)


def plain_run(pipeline, prompt: str, seed: int, output_type: str):
    """Render one image the ordinary way, as a user of the base model would."""
    return pipeline(
        prompt,
        num_inference_steps=2,
        guidance_scale=7.5,
        height=SIDE,
        width=SIDE,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images


# ---- refinement -----------------------------------------------------------------------------


def test_refine_raises_the_score_within_the_step_count(base, scorer, picture):
    seen = []
    config = sm.RefineConfig(steps=5, step_size=0.05, max_change=0.2)
    result = sm.refine(base, scorer, picture, config=config, progress=lambda *a: seen.append(a))
    assert result.after_score > result.before_score + 1e-4
    assert result.steps == 5 and [step for step, _, _ in seen] == [1, 2, 3, 4, 5]
    assert 0 < result.change <= 0.2 + 1e-6
    assert result.before.size == result.after.size == (SIDE, SIDE)
    assert 1 <= result.reencoded_score <= 5
    before, after = np.asarray(result.before, float), np.asarray(result.after, float)
    assert np.abs(after - before).mean() > 0.5  # the edit reaches the pixels


def test_refine_starts_from_the_latents_training_would_use(base, scorer, picture, tmp_path):
    picture.save(tmp_path / "in.png")
    latents = encode_pixels(load_pixels(tmp_path / "in.png", SIDE)[None], base.pipeline.vae)
    config = sm.RefineConfig(steps=0)
    result = sm.refine(base, scorer, picture, config=config)
    assert result.before_score == pytest.approx(float(predict(scorer, latents)[0]), abs=1e-5)
    assert result.after_score == result.before_score
    assert result.steps == 0 and result.change == 0


def test_refine_respects_a_tight_change_bound_even_in_inference_mode(base, scorer, picture):
    config = sm.RefineConfig(steps=6, step_size=0.05, max_change=0.01)
    with torch.inference_mode():  # as a caller serving results might be
        result = sm.refine(base, scorer, picture, config=config)
    assert 0 < result.change <= 0.01 + 1e-6
    assert result.after_score > result.before_score


def test_refine_never_returns_a_lower_score(base, scorer, picture):
    # Huge steps overshoot; the best latents seen (x0 at worst) are what comes back.
    config = sm.RefineConfig(steps=4, step_size=3.0, max_change=3.0)
    result = sm.refine(base, scorer, picture, config=config)
    assert result.after_score >= result.before_score


def test_refine_stops_when_asked(base, scorer, picture):
    stop = iter([False, False, True]).__next__
    result = sm.refine(base, scorer, picture, should_stop=stop)
    assert result.steps == 2


def test_refine_config_refuses_unknown_keys():
    assert sm.RefineConfig.from_dict({"steps": 3}).steps == 3
    with pytest.raises(TypeError, match="unknown RefineConfig keys"):
        sm.RefineConfig.from_dict({"step": 3})


# ---- grids ----------------------------------------------------------------------------------


def test_grid_has_every_cell_and_the_composite_size(made_grid):
    assert len(made_grid.cells) == len(PROMPTS) * len(SEEDS) * len(sm.STRENGTHS)
    first_row = made_grid.cells[:4]
    assert [c.strength for c in first_row] == list(sm.STRENGTHS)
    assert {(c.prompt, c.seed) for c in first_row} == {(PROMPTS[0], SEEDS[0])}
    side = 128  # 32 px cells enlarged to MIN_CELL
    rows = len(PROMPTS) * len(SEEDS)
    height = sm.LABEL_HEIGHT + rows * (sm.LABEL_HEIGHT + side)
    assert made_grid.image.size == (4 * side, height)
    assert not made_grid.stopped
    for strength, mean in made_grid.scores_by_strength.items():
        scores = [c.score for c in made_grid.cells if c.strength == strength]
        assert mean == pytest.approx(sum(scores) / 4)
    assert set(made_grid.scores_by_strength) == set(sm.STRENGTHS)


def test_base_column_is_a_plain_base_model_run(made_grid, base, scorer):
    # Run after the grid: also proves the grid left no adapter active on the pipeline.
    assert lora.ADAPTER not in getattr(base.pipeline.unet, "peft_config", {})
    for cell in (c for c in made_grid.cells if c.strength == 0):
        pixels = plain_run(base.pipeline, cell.prompt, cell.seed, "np")[0]
        np.testing.assert_allclose(np.asarray(cell.image) / 255, pixels, atol=1.5 / 255)
        latents = plain_run(base.pipeline, cell.prompt, cell.seed, "latent")
        assert cell.score == pytest.approx(float(predict(scorer, latents)[0]), abs=1e-4)


def test_taste_columns_differ_from_the_base(made_grid):
    def picture(strength, seed):
        cell = next(c for c in made_grid.cells if c.strength == strength and c.seed == seed)
        return np.asarray(cell.image, float)

    for seed in SEEDS:
        assert np.abs(picture(1.0, seed) - picture(0.0, seed)).mean() > 1
        assert np.abs(picture(-1.0, seed) - picture(1.0, seed)).mean() > 1
    assert np.abs(picture(0.0, 0) - picture(0.0, 1)).mean() > 1  # seeds are different noise


def test_grid_stops_when_asked_and_leaves_the_rest_blank(base, scorer, taste_lora):
    stop = iter([False, True]).__next__  # stop before the second pipeline call
    made = sm.grid(base, scorer, PROMPTS, SEEDS, lora_folder=taste_lora, steps=2, should_stop=stop)
    assert made.stopped and len(made.cells) == len(SEEDS)
    assert list(made.scores_by_strength) == [0.0]
    assert made.image.size == (512, sm.LABEL_HEIGHT + 4 * (sm.LABEL_HEIGHT + 128))
    last_cell = made.image.crop((384, made.image.height - 128, 512, made.image.height))
    assert last_cell.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_grid_refuses_strengths_without_a_lora(base, scorer, tmp_path):
    with pytest.raises(ValueError, match="need a LoRA folder"):
        sm.grid(base, scorer, PROMPTS, SEEDS, lora_folder=None, steps=2)
    with pytest.raises(lora.LoraFileError, match="not a taste LoRA checkpoint"):
        sm.grid(base, scorer, PROMPTS, SEEDS, lora_folder=tmp_path, steps=2)
    base_only = sm.grid(base, scorer, PROMPTS[:1], [0], lora_folder=None, strengths=[0], steps=2)
    assert len(base_only.cells) == 1


def test_column_labels():
    labels = [sm.column_label(s) for s in sm.STRENGTHS]
    assert labels == ["base", "taste 0.5", "taste 1", "anti-taste −1"]


# ---- command line ---------------------------------------------------------------------------


def test_refine_cli_writes_the_image_and_prints_json(scorer_file, picture, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    picture.save(source)
    sm.main(
        ["refine", "--base", DEMO, "--scorer", str(scorer_file), "--image", str(source)]
        + ["--out", str(out), "--steps", "3", "--device", "cpu"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["steps"] == 3
    assert summary["after_score"] > summary["before_score"]
    assert 0 < summary["change"] <= sm.RefineConfig.max_change
    with Image.open(out) as written:
        assert written.size == (SIDE, SIDE)


def test_grid_cli_writes_the_grid_and_prints_scores(scorer_file, taste_lora, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sm.main(
        ["grid", "--base", DEMO, "--scorer", str(scorer_file), "--lora", str(taste_lora)]
        + ["--out", str(out), "--prompts", "1", "--seeds", "0,1", "--steps", "2"]
        + ["--device", "cpu"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["scores_by_strength"]) == {"0", "0.5", "1", "-1"}
    assert summary["cells"] == 8 and summary["seeds"] == [0, 1]
    assert summary["prompts"] == read_prompts("eval", DEMO_PROMPTS_FILE)[:1]  # held out
    with Image.open(out) as written:
        assert written.size == (512, sm.LABEL_HEIGHT + 2 * (sm.LABEL_HEIGHT + 128))


def test_cli_bad_scorer_path_is_a_clear_error(picture, tmp_path, capsys):
    picture.save(tmp_path / "in.png")
    (tmp_path / "scorer.pt").write_bytes(b"\x80\x04not safetensors")
    for scorer_path, reason in [
        (tmp_path / "missing.safetensors", "no file at"),
        (tmp_path / "scorer.pt", "is a pickle or torch.save file"),
    ]:
        with pytest.raises(SystemExit) as exited:
            sm.main(
                ["refine", "--scorer", str(scorer_path), "--image", str(tmp_path / "in.png")]
                + ["--out", str(tmp_path / "out.png"), "--base", DEMO]
            )
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and reason in err and str(scorer_path) in err
        assert not (tmp_path / "out.png").exists()


# ---- individual samples ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kohya_file(taste_lora, tmp_path_factory):
    """Return the kohya .safetensors of the taste LoRA, as the download bundle ships it."""
    from trainer.export import write_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return write_bundle(taste_lora, out, name="taste", preview=None, info={})["kohya"]


def test_images_cli_writes_a_png_per_prompt_and_seed_and_an_index(scorer_file, tmp_path, capsys):
    out = tmp_path / "plain"
    sm.main(
        ["images", "--base", DEMO, "--prompt", "an orb", "--prompt", "a rings"]
        + ["--seeds", "0-2", "--steps", "3", "--scorer", str(scorer_file), "--out", str(out)]
    )
    summary = json.loads(capsys.readouterr().out)
    index = json.loads((out / "index.json").read_text())
    assert summary["count"] == 6 and summary["strength"] == 0.0 and summary["lora"] is None
    assert [(e["prompt"], e["seed"]) for e in index["images"]] == [
        (p, s) for p in ("an orb", "a rings") for s in (0, 1, 2)
    ]
    for entry in index["images"]:
        with Image.open(out / entry["file"]) as written:
            assert written.size == (32, 32)
        assert isinstance(entry["score"], float)


def test_kohya_file_and_checkpoint_folder_give_the_same_samples(
    base, taste_lora, kohya_file, tmp_path
):
    plain = sm.images(base, ["an orb"], [0, 1], steps=3)
    folder = sm.images(base, ["an orb"], [0, 1], lora=taste_lora, strength=1.0, steps=3)
    kohya = sm.images(base, ["an orb"], [0, 1], lora=kohya_file, strength=1.0, steps=3)
    anti = sm.images(base, ["an orb"], [0, 1], lora=kohya_file, strength=-1.0, steps=3)
    for a, b, c in zip(folder, kohya, plain, strict=True):
        # the kohya file holds fp16 weights: equal to the trained ones within that rounding,
        # which is a small part of what the LoRA changes
        rounding, effect = (a.latents - b.latents).abs().max(), (a.latents - c.latents).abs().max()
        assert rounding < 0.05 * effect, (float(rounding), float(effect))
    assert not torch.allclose(plain[0].latents, kohya[0].latents, atol=1e-3)
    assert not torch.allclose(anti[0].latents, kohya[0].latents, atol=1e-3)
    again = sm.images(base, ["an orb"], [0, 1], steps=3)  # no adapter left behind
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(plain, again, strict=True))


def test_images_cli_refuses_a_file_that_is_not_a_lora(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(SystemExit) as exited:
        sm.main(
            ["images", "--base", DEMO, "--prompt", "an orb", "--out", str(tmp_path / "o")]
            + ["--lora", str(tmp_path / "junk.safetensors")]
        )
    assert exited.value.code == 2 and "error: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seeds"), [("0-3", [0, 1, 2, 3]), ("5", [5]), ("0-1,9", [0, 1, 9])]
)
def test_seed_lists(text, seeds):
    assert sm._seed_list(text) == seeds


def test_refine_needs_only_the_vae_on_the_device(base, scorer, picture):
    light = load_vae(DEMO, device="cpu")  # what "Improve this image" loads
    assert not hasattr(light.pipeline, "unet") and light.resolution == base.resolution
    config = sm.RefineConfig(steps=3, step_size=0.05, max_change=0.2)
    full, vae_only = (sm.refine(b, scorer, picture, config=config) for b in (base, light))
    assert vae_only.after_score == pytest.approx(full.after_score)
    assert np.array_equal(np.asarray(vae_only.after), np.asarray(full.after))
