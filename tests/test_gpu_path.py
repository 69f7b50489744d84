"""What a CUDA run of a real SD 1.x base would load, keep and compute in, checked on the CPU.

No GPU here: these tests pin the decisions (dtypes, components, scheduler settings, what the
site passes to the loader); the memory they lead to is counted by bench/gpu_memory.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor

from app import create_app
from rating import gpu_work
from trainer import base as bases
from trainer import device as devices
from trainer import lora
from trainer.base import DEMO, BaseModelNotFound, ddim_scheduler, load_base


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cuda_card(monkeypatch, native_bf16: bool) -> None:
    """Pretend to be a CUDA card: Ampere+ computes bf16, Turing/Volta only emulate it."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_half_precision_is_what_the_card_computes_natively(monkeypatch, native, expected):
    cuda_card(monkeypatch, native_bf16=native)
    assert devices.half_dtype(torch.device("cuda")) == expected  # a T4 gets fp16, not bf16


@pytest.mark.parametrize(
    ("weights", "native", "expected"),
    [
        (torch.float16, True, torch.float16),  # fp16 weights: no recast to bf16 on Ampere
        (torch.bfloat16, True, torch.bfloat16),
        (torch.float32, True, torch.bfloat16),
        (torch.float32, False, torch.float16),  # a Turing card: fp16 with the GradScaler
    ],
)
def test_the_lora_autocasts_in_the_unets_own_dtype(monkeypatch, weights, native, expected):
    cuda_card(monkeypatch, native_bf16=native)
    config = lora.TasteLoraConfig()
    assert lora._half(torch.device("cuda"), config, weights) == expected
    assert lora._half(torch.device("cpu"), config, weights) is None
    assert (
        lora._half(torch.device("cuda"), lora.TasteLoraConfig(mixed_precision="no"), weights)
        is None
    )


@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("cuda", "auto", torch.bfloat16),
        ("cuda", "half", torch.bfloat16),
        ("cuda", "full", torch.float32),
        ("mps", "auto", torch.float32),  # Apple MPS: fp32 unless asked
        ("mps", "half", torch.float16),
        ("mps", "full", torch.float32),
        ("cpu", "half", torch.float32),  # never half on a CPU: slow, and kernels are missing
    ],
)
def test_the_precision_setting_chooses_the_weights_dtype(monkeypatch, device, precision, expected):
    cuda_card(monkeypatch, native_bf16=True)
    assert devices.weights_dtype(torch.device(device), precision) == expected


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="auto, half, full"):
        devices.weights_dtype(torch.device("cpu"), "fp8")
    from rating import settings  # the site checks the same names without importing torch

    assert settings.PRECISIONS == devices.PRECISIONS


def test_fp16_weights_on_apple_mps_train_under_fp16_autocast_with_loss_scaling():
    config = lora.TasteLoraConfig()
    mps = torch.device("mps")
    assert lora._half(mps, config, torch.float16) == torch.float16
    assert lora._half(mps, config, torch.float32) is None  # the default: plain fp32 on a Mac
    assert lora._half(mps, lora.TasteLoraConfig(mixed_precision="no"), torch.float16) is None
    scaler = torch.amp.GradScaler("mps", enabled=True)  # what the loop builds for fp16 on MPS
    assert scaler.is_enabled() and scaler._device == "mps"


class _Placed(torch.nn.Module):
    """A pipeline part that notes where it is sent; the UNet says it is on a CUDA card."""

    device = torch.device("cuda")

    def __init__(self, name: str, moves: list):
        super().__init__()
        self.name, self.moves = name, moves

    def to(self, device):
        self.moves.append((self.name, str(device)))
        return self


def test_pictures_decode_with_only_the_vae_on_the_gpu_after_all_are_rendered(monkeypatch):
    """SDXL's decoder needs 3 GiB at 1024 px in fp32: beside the UNet and both text encoders
    it would not fit an 8 GB card, so every part but the VAE waits on the CPU meanwhile."""
    from trainer import sample

    moves: list = []
    parts = ("unet", "text_encoder", "text_encoder_2")
    pipeline = SimpleNamespace(**{name: _Placed(name, moves) for name in parts})
    decoded = []

    def decode(pipe, latents):
        decoded.append(sorted(moves))  # where the others are while the VAE decodes
        return [f"picture {n}" for n in range(len(latents))]

    monkeypatch.setattr(sample, "decode", decode)
    pictures = sample.decode_all(pipeline, [torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8)])
    assert pictures == [["picture 0", "picture 1"], ["picture 0"]]
    parked = sorted((name, "cpu") for name in parts)
    assert decoded == [parked, parked]  # both text encoders too, not just the first
    assert moves[3:] == [(name, "cuda") for name in parts]  # and back for the next render


@pytest.mark.parametrize(("card_gib", "expected"), [(8, lora.SMALL_CARD_PRESET), (12, {})])
def test_an_sdxl_base_on_an_8_gb_card_trains_at_batch_1_from_the_start(
    monkeypatch, card_gib, expected
):
    from tiny_sdxl import build_tiny_sdxl

    pipeline = build_tiny_sdxl()
    monkeypatch.setattr(type(pipeline.unet), "device", property(lambda _: torch.device("cuda")))
    card = SimpleNamespace(total_memory=card_gib * 2**30 - 2**28)  # what a card reports: less
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    base = bases.BaseModel(pipeline, "tiny-sdxl", False, 64, "", family="sdxl")
    assert lora.preset_for(base) == expected
    sd1 = load_base(DEMO, device="cpu")
    plain = bases.BaseModel(sd1.pipeline, "sd1", False, 64, "", family="sd1")
    assert lora.preset_for(plain) == {}  # SD 1.x fits 8 GB at the defaults (2.7 GiB)


def test_ddim_never_clips_whatever_scheduler_the_base_came_with():
    euler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    assert "clip_sample" not in euler.config  # DDIM's own default would be True
    ddim = ddim_scheduler(euler.config)
    assert isinstance(ddim, DDIMScheduler)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    assert ddim.config.beta_schedule == "scaled_linear"  # the base's own noise schedule
    # ...and its own spacing and offset; a config without them gets SD 1.x's
    assert (ddim.config.steps_offset, ddim.config.timestep_spacing) == (0, "linspace")
    bare = {k: v for k, v in euler.config.items() if k not in ("steps_offset", "timestep_spacing")}
    assert ddim_scheduler(bare).config.steps_offset == 1
    assert ddim_scheduler(bare).config.timestep_spacing == "leading"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A diffusers folder as a finetune ships it: Euler scheduler and a safety checker."""
    pipeline = load_base(DEMO, device="cpu").pipeline
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={**tiny, "num_hidden_layers": 1},
            vision_config={**tiny, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
    )
    shipped = StableDiffusionPipeline(
        **{
            **pipeline.components,
            "safety_checker": checker,
            "feature_extractor": CLIPImageProcessor(),
        },
    )
    shipped.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    folder = tmp_path_factory.mktemp("sd") / "finetune"
    shipped.save_pretrained(folder)
    return folder


def test_a_folder_loads_without_its_safety_checker_and_samples_with_plain_ddim(sd_folder):
    loaded = load_base(str(sd_folder), device="cpu", dtype=torch.float16)
    pipe = loaded.pipeline
    assert pipe.safety_checker is None  # 0.57 GiB in fp16 that nothing here would ever run
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False
    dtypes = {
        name: next(m.parameters()).dtype
        for name, m in pipe.components.items()
        if hasattr(m, "parameters")
    }
    assert set(dtypes) == {"unet", "vae", "text_encoder"} and set(dtypes.values()) == {
        torch.float16
    }


def test_the_site_passes_its_single_file_config_and_device_to_the_loader(app, monkeypatch):
    seen = {}
    monkeypatch.setattr(bases, "load_base", lambda spec, **kwargs: seen.update(kwargs, spec=spec))
    app.config.update(BASE_MODEL_CONFIG="/models/sd15-configs", DEVICE="mps", PRECISION="half")
    with app.app_context():
        gpu_work.base_model("/models/finetune.safetensors")
    assert seen == {
        "spec": "/models/finetune.safetensors",
        "device": "mps",
        "config": "/models/sd15-configs",
        "precision": "half",
    }


def test_a_precision_the_site_does_not_know_stops_it_at_start(tmp_path):
    with pytest.raises(ValueError, match="PRECISION must be one of auto, half, full"):
        create_app({"PRECISION": "fp8", "TESTING": True}, instance_path=str(tmp_path))


def test_a_family_the_trainer_cant_train_is_refused_by_name_before_any_weight_loads(tmp_path):
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": [None, None]}
    index |= {"scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))  # configs only, no weights
    with pytest.raises(BaseModelNotFound, match="SDXL refiner") as caught:
        load_base(str(tmp_path), device="cpu")
    said = "Stable Diffusion 1.x, Stable Diffusion 2.x, SDXL family"
    assert said in str(caught.value) and "Playground v2.5" in str(caught.value)
    index |= {"scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"]}
    index |= {"text_encoder": ["transformers", "CLIPTextModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert bases.family_of(str(tmp_path)) == "playground-v2.5"  # trainable (test_playground)


def test_a_checkpoint_of_a_family_the_trainer_cant_train_is_refused_from_its_header(tmp_path):
    key = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
    path = tmp_path / "civitai-model.safetensors"
    save_file({key: torch.zeros(4)}, str(path))
    with pytest.raises(BaseModelNotFound, match="SDXL refiner"):
        load_base(str(path), device="cpu")
    sdxl = tmp_path / "sdxl-finetune.safetensors"  # with the first text encoder: the SDXL base
    save_file({key.replace("embedders.0", "embedders.1"): torch.zeros(4)}, str(sdxl))
    assert bases.family_of(str(sdxl)) == "sdxl"
    playground = tmp_path / "playground.safetensors"
    save_file({"edm_mean": torch.zeros(4)}, str(playground))
    assert bases.family_of(str(playground)) == "playground-v2.5"


def test_the_family_is_part_of_a_base_models_summary(sd_folder):
    loaded = load_base(str(sd_folder), device="cpu")
    assert loaded.family == "sd1" and bases.summarize(loaded)["family"] == "sd1"
