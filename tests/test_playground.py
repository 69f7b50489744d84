"""Playground v2.5 (SDXL-structured, EDM-trained) end to end on a tiny Playground-structured
model saved as a diffusers folder: recognised, run as a DDPM model whose x̂0 is exactly the
EDM denoiser's, its latents scaled per channel, a taste LoRA trained, sampled and exported."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_lora import QUICK, save_random_scorer
from tests.tiny_sdxl import build_tiny_playground, build_tiny_sdxl
from trainer import edm, export, lora, sample
from trainer.base import load_base
from trainer.conditioning import embed
from trainer.families import describe, family_of_folder
from trainer.latents import encode_pixels, scale_latents, unscale_latents


@pytest.fixture(scope="module")
def playground_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground") / "tiny-playground"
    build_tiny_playground().save_pretrained(folder)
    return folder


@pytest.fixture
def base(playground_folder):
    return load_base(str(playground_folder), device="cpu")


def test_it_is_recognised_and_sampled_from_its_noisiest_level(base, playground_folder):
    assert family_of_folder(playground_folder) == "playground-v2.5"
    assert base.family == "playground-v2.5" and describe(base.family) == "Playground v2.5"
    scheduler = base.pipeline.scheduler
    assert type(scheduler).__name__ == "DDIMScheduler" and not scheduler.config.clip_sample
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == edm.TRAIN_STEPS - 1
    sigmas = edm.noise_levels(build_tiny_playground().scheduler.config)
    assert sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0)
    expected = (1 / (1 + sigmas**2)).float()  # ᾱ_t = 1 / (1 + σ_t²)
    assert torch.allclose(scheduler.alphas_cumprod, expected, rtol=1e-4)


@pytest.mark.parametrize("t", [0, 400, 999])
def test_the_ddpm_view_gives_exactly_the_edm_denoisers_x0(base, t):
    """DDIM's x̂0 from the hooked UNet's ε is the EDM denoiser's own x̂0 at that noise level."""
    playground = build_tiny_playground()  # the same weights, run by EDM's own formulas
    edm_scheduler, unet = playground.scheduler, playground.unet
    cond = embed(base.pipeline, ["a red fox", "a lighthouse"], base.resolution).unet_kwargs()
    g = torch.Generator().manual_seed(t)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g) * 0.5, torch.randn(2, 4, 8, 8, generator=g)
    sigma = float(edm.noise_levels(edm_scheduler.config)[t])
    x = x0 + sigma * noise  # EDM's noisy latents
    with torch.no_grad():
        raw = unet(
            edm_scheduler.precondition_inputs(x, sigma),
            edm_scheduler.precondition_noise(torch.tensor([sigma] * 2)),
            **cond,
        ).sample
        edm_x0 = edm_scheduler.precondition_outputs(x, raw, sigma)

        ddim = base.pipeline.scheduler
        ddim.set_timesteps(10)
        x_vp = x / (1 + sigma**2) ** 0.5
        eps = base.pipeline.unet(x_vp, torch.tensor(t), **cond).sample
        alpha = ddim.alphas_cumprod[t]
        ddpm_x0 = (x_vp - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    assert (ddpm_x0 - edm_x0).abs().max() < 1e-4  # fp32 rounding (2e-5 at σ = 80)


def test_latents_are_scaled_per_channel_and_back(base):
    raw = torch.randn(2, 4, 8, 8) * 5 + 1
    scaled = scale_latents(raw, base.pipeline.vae.config)
    mean = torch.tensor(base.pipeline.vae.config.latents_mean).reshape(1, 4, 1, 1)
    std = torch.tensor(base.pipeline.vae.config.latents_std).reshape(1, 4, 1, 1)
    assert torch.allclose(scaled, (raw - mean) * 0.5 / std)
    assert torch.allclose(unscale_latents(scaled, base.pipeline.vae.config), raw, atol=1e-5)


def test_a_taste_lora_trains_samples_and_exports_for_the_sdxl_loaders(base, tmp_path):
    scorer = save_random_scorer(tmp_path / "scorer.safetensors", family="playground-v2.5")
    summary = lora.train(base, scorer, tmp_path / "run", replace(QUICK, steps=4, eval_every=2))
    assert summary["steps"] == 4 and summary["score_gain"] is not None
    assert all(torch.isfinite(torch.tensor(row["score"])) for row in summary["history"])
    checkpoint = tmp_path / "run" / "checkpoint-000004"
    with_lora = sample.drawn(base, [("a red fox", [0])], lora=checkpoint, strength=1.0, steps=4)
    without = sample.drawn(base, [("a red fox", [0])], steps=4)
    assert with_lora[0].image.size == (64, 64)
    assert torch.isfinite(without[0].latents).all()
    assert not torch.equal(with_lora[0].latents, without[0].latents)  # the LoRA acts

    path = export.save_kohya(
        checkpoint,
        tmp_path / "taste.safetensors",
        name="taste",
        info={"base_model": "tiny-playground", "resolution": 64, "family": "playground-v2.5"},
    )
    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
    assert meta["ss_base_model_version"] == "playground_v2.5"
    assert meta["modelspec.architecture"] == "playground-v2.5/lora"
    unet_layers = {  # an SDXL-structured UNet's layers, as ComfyUI names them
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_")
        for k in build_tiny_sdxl().unet.state_dict()
    }
    modules = {key.split(".")[0] for key in load_file(str(path))}
    assert modules and modules <= unet_layers
    base.pipeline.unet.edm_as_epsilon.remove()  # the hooks come off: a plain EDM UNet again
    assert not base.pipeline.unet._forward_pre_hooks and not base.pipeline.unet._forward_hooks


def test_one_step_steps_train_on_playground_latents(playground_folder, tmp_path):
    """The default mode: pool latents noised to a random level, x̂0 from one (hooked) UNet
    prediction, as on SDXL."""
    base = load_base(str(playground_folder), device="cpu")
    scorer = save_random_scorer(tmp_path / "scorer.safetensors", family="playground-v2.5")
    pool = encode_pixels(torch.rand(4, 3, 64, 64) * 2 - 1, base.pipeline.vae)
    config = replace(QUICK, mode="one_step", steps=2, eval_every=2)
    summary = lora.train(base, scorer, tmp_path / "run", config, images=pool)
    assert summary["steps"] == 2 and summary["mode"] == "one_step"
    assert all(torch.isfinite(torch.tensor(row["score"])) for row in summary["history"])
    weights = load_file(str(tmp_path / "run" / "checkpoint-000002" / lora.WEIGHTS_NAME))
    assert any(k.endswith("lora.up.weight") and v.abs().max() > 0 for k, v in weights.items())
