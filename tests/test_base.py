"""The base-model loader: the offline demo pipeline, folder round trips, clear failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from trainer import base
from trainer.base import DEMO, BaseModelNotFound, build_demo_pipeline, load_base


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Make any attempt to reach the hub fail instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo():
    """Return the demo base model on the CPU."""
    return load_base(DEMO, device="cpu")


def render(pipeline, prompt="a red apple on a table"):
    """Return a 2-step image from `pipeline` at its own resolution, from a fixed noise seed."""
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipeline(
        prompt,
        num_inference_steps=2,
        height=side,
        width=side,
        generator=generator,
        output_type="np",
    )
    return out.images[0]


def test_demo_weights_are_deterministic_per_seed():
    first, again, other = build_demo_pipeline(0), build_demo_pipeline(0), build_demo_pipeline(1)
    weights = first.unet.state_dict()
    assert all(torch.equal(w, again.unet.state_dict()[k]) for k, w in weights.items())
    assert not all(torch.equal(w, other.unet.state_dict()[k]) for k, w in weights.items())


def test_demo_does_not_disturb_the_global_random_stream():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_demo_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_demo_renders_the_same_image_twice(demo):
    first, second = render(demo.pipeline), render(load_base(DEMO, device="cpu").pipeline)
    assert first.shape == (32, 32, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_demo_has_sd1_structure(demo):
    pipe = demo.pipeline
    assert demo.is_demo and demo.name == DEMO and demo.resolution == 32
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 4  # the demo world's VAE: 3 levels, 32 px → 8×8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    latents = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_test_models_keep_sd1_structure_at_64_px():
    pipe = build_demo_pipeline()  # what unit tests build from config: random, 8× VAE
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_demo_tokenizer_works_offline(demo):
    tokenizer = demo.pipeline.tokenizer
    ids = tokenizer("Hello, world", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids
    assert max(ids) < demo.pipeline.text_encoder.config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello , world"


def test_demo_folder_round_trip(demo, tmp_path):
    demo.pipeline.save_pretrained(tmp_path / "demo-folder")
    loaded = load_base(str(tmp_path / "demo-folder"), device="cpu")
    assert not loaded.is_demo and loaded.resolution == demo.resolution
    np.testing.assert_allclose(render(loaded.pipeline), render(demo.pipeline), atol=1e-6)


def test_unknown_hub_id_offline_says_what_to_set():
    with pytest.raises(BaseModelNotFound) as caught:
        load_base("nonexistent/hub-id", device="cpu")
    message = str(caught.value)
    assert "TASTEBUD_BASE_MODEL" in message
    assert "nonexistent/hub-id is not in the local cache and this machine is offline" in message


@pytest.mark.parametrize(
    "spec", ["./no/such/folder", "/no/such/model.safetensors", "no/such/deep/path", ""]
)
def test_bad_path_says_what_to_set(spec):
    with pytest.raises(BaseModelNotFound, match="TASTEBUD_BASE_MODEL"):
        load_base(spec, device="cpu")


def test_single_file_without_local_config_offline_asks_for_one(tmp_path):
    save_file({"not_a_unet": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(BaseModelNotFound, match="pass config="):
        load_base(str(tmp_path / "model.safetensors"), device="cpu")


def test_single_file_that_is_not_sd_is_refused(demo, tmp_path):
    # No real single-file round trip: diffusers ships no diffusers→LDM checkpoint converter.
    demo.pipeline.save_pretrained(tmp_path / "config")
    save_file({"not_a_unet": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(BaseModelNotFound, match="TASTEBUD_BASE_MODEL"):
        load_base(str(tmp_path / "model.safetensors"), device="cpu", config=tmp_path / "config")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(BaseModelNotFound, match="no model_index.json"):
        load_base(str(tmp_path), device="cpu")


def test_pick_device_returns_an_available_device():
    device = base.pick_device()
    assert device.type in {"cuda", "mps", "cpu"}
    assert torch.zeros(1, device=device).device.type == device.type


def test_info_cli_prints_a_json_summary(capsys):
    base.main(["info", "--base", DEMO, "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == DEMO and summary["is_demo"] is True
    assert summary["resolution"] == 32 and summary["latent_shape"] == [4, 8, 8]
    assert summary["demo_world"]["config"]["image_size"] == 32
    assert summary["prompts_file"].endswith("prompts_demo.txt")
    assert summary["device"] == "cpu"
    assert all(count > 0 for count in summary["parameters"].values())
