"""The SDXL family end to end on a tiny SDXL-structured model saved as a diffusers folder:
loading, latents, a taste LoRA with SDXL's conditioning, sampling with it, and its files."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_lora import QUICK, save_random_scorer
from tests.tiny_sdxl import build_tiny_sdxl
from trainer import base as base_module
from trainer import export, lora, sample
from trainer.base import load_base
from trainer.conditioning import embed
from trainer.families import describe
from trainer.latents import encode_pixels


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    build_tiny_sdxl().save_pretrained(folder)
    return folder


@pytest.fixture
def base(sdxl_folder):
    return load_base(str(sdxl_folder), device="cpu")


def test_an_sdxl_folder_loads_as_the_sdxl_family_with_its_conditioning(base):
    assert base.family == "sdxl" and base.resolution == 64
    cond = embed(base.pipeline, ["a red fox", "a lighthouse"], base.resolution)
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    latents = encode_pixels(torch.rand(2, 3, 64, 64) * 2 - 1, base.pipeline.vae)
    assert latents.shape == (2, 4, 8, 8)


def test_a_taste_lora_trains_on_sdxl_samples_and_exports_for_the_sdxl_loaders(base, tmp_path):
    scorer = save_random_scorer(tmp_path / "scorer.safetensors", family="sdxl")
    summary = lora.train(base, scorer, tmp_path / "run", replace(QUICK, steps=4, eval_every=2))
    assert summary["steps"] == 4 and summary["score_gain"] is not None
    checkpoint = tmp_path / "run" / "checkpoint-000004"  # the last: the chosen may be step 0
    with_lora = sample.drawn(base, [("a red fox", [0])], lora=checkpoint, strength=1.0, steps=4)
    without = sample.drawn(base, [("a red fox", [0])], steps=4)
    assert with_lora[0].image.size == (64, 64)
    assert not torch.equal(with_lora[0].latents, without[0].latents)  # the LoRA acts

    path = export.save_kohya(
        checkpoint,
        tmp_path / "taste.safetensors",
        name="taste",
        info={"base_model": "tiny-sdxl", "resolution": 64, "family": "sdxl"},
    )
    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    unet_layers = {  # of a plain SDXL UNet (the one in `base` holds an adapter now)
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_")
        for k in build_tiny_sdxl().unet.state_dict()
    }
    modules = {key.split(".")[0] for key in load_file(str(path))}
    assert modules and modules <= unet_layers  # ComfyUI's naming of SDXL UNet layers
    assert any("transformer_blocks_1" in m for m in modules)  # SDXL's deeper blocks too

    # diffusers reads the kohya file back into an SDXL UNet as the trained checkpoint does
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]))
    cond = embed(base.pipeline, ["a red fox"], base.resolution).unet_kwargs()

    def unet_out(pipe):
        with torch.no_grad():
            return pipe.unet(*inputs, **cond).sample

    from_file, from_checkpoint, plain = build_tiny_sdxl(), build_tiny_sdxl(), build_tiny_sdxl()
    from_file.load_lora_weights(str(path), adapter_name="taste")
    lora.apply_lora(from_checkpoint, checkpoint)
    effect = (unet_out(from_checkpoint) - unet_out(plain)).abs().max().item()
    assert effect > 0
    assert (unet_out(from_file) - unet_out(from_checkpoint)).abs().max().item() <= 1e-2 * effect


def test_a_v_prediction_single_file_samples_and_trains_as_it_says(monkeypatch, tmp_path):
    """NoobAI-XL V-Pred and its kind say so only by empty `v_pred` and `ztsnr` tensors in the
    file: the base then predicts velocity on a zero-terminal-SNR schedule, sampled from its
    last timestep. (diffusers' own conversion of the weights is stood in for by a tiny SDXL.)"""
    marker = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    checkpoint = tmp_path / "noobai-vpred.safetensors"
    save_file({marker: torch.zeros(2), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)},
              checkpoint)  # fmt: skip
    monkeypatch.setattr(base_module, "_load_single_file", lambda *args: build_tiny_sdxl())
    base = load_base(str(checkpoint), device="cpu")
    scheduler = base.pipeline.scheduler.config
    assert base.family == "sdxl" and scheduler.prediction_type == "v_prediction"
    assert scheduler.rescale_betas_zero_snr and scheduler.timestep_spacing == "trailing"
    assert describe(base.family, scheduler).endswith("v-prediction, zero terminal SNR")
    base.pipeline.scheduler.set_timesteps(4)
    assert int(base.pipeline.scheduler.timesteps[0]) == 999  # from pure noise
    assert float(base.pipeline.scheduler.alphas_cumprod[-1]) == 0.0

    scorer = save_random_scorer(tmp_path / "scorer.safetensors", family="sdxl")
    summary = lora.train(base, scorer, tmp_path / "run", replace(QUICK, steps=2, eval_every=2))
    assert (
        summary["steps"] == 2
        and summary["history"]
        and all(torch.isfinite(torch.tensor(row["score"])) for row in summary["history"])
    )

    plain = tmp_path / "sdxl.safetensors"  # no markers: SDXL's own epsilon schedule
    save_file({marker: torch.zeros(2)}, plain)
    scheduler = load_base(str(plain), device="cpu").pipeline.scheduler.config
    assert scheduler.prediction_type == "epsilon" and not scheduler.rescale_betas_zero_snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_lora_steps_train_on_sdxl_latents_whatever_the_model_predicts(
    base, tmp_path, prediction_type
):
    """The one-step step on SDXL's conditioning, x̂0 rebuilt as the scheduler's config says."""
    pipe = base.pipeline
    pipe.scheduler = type(pipe.scheduler).from_config(
        pipe.scheduler.config, prediction_type=prediction_type
    )
    scorer = save_random_scorer(tmp_path / "scorer.safetensors", family="sdxl")
    pool = encode_pixels(torch.rand(4, 3, 64, 64) * 2 - 1, pipe.vae)
    config = replace(QUICK, mode="one_step", steps=2, eval_every=2)
    summary = lora.train(base, scorer, tmp_path / "run", config, images=pool)
    assert summary["steps"] == 2 and summary["mode"] == "one_step"
    weights = load_file(str(tmp_path / "run" / "checkpoint-000002" / lora.WEIGHTS_NAME))
    assert any(k.endswith("lora.up.weight") and v.abs().max() > 0 for k, v in weights.items())
    run = lora._prepare(base, scorer, config, pool)  # the schedule the step rebuilt x̂0 with
    try:
        assert run.scheduler.config.prediction_type == prediction_type
    finally:
        lora._release(base)
