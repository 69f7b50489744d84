"""Load a base Stable Diffusion pipeline: a hub id, a local folder, a single file, or the demo.

The "demo" base is the demo world: a tiny SD-1.x-shaped pipeline trained by this project on
its own demo-pack pictures (trainer/demo_world.py; weights shipped beside it), with a
tokenizer built here from a byte-level vocabulary, so the whole flow runs offline. Tests
build the same structure with random weights from config (`build_demo_pipeline`).
Everything that shows the demo labels it "demo".
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.conditioning import text_encoders
from trainer.device import pick_device, weights_dtype
from trainer.edm import as_variance_preserving, is_edm
from trainer.families import (
    UnsupportedFamily,
    family_of_checkpoint,
    family_of_configs,
    family_of_folder,
    refuse_unless_supported,
    scheduler_of_checkpoint,
)
from trainer.prompts import DEMO_PROMPTS_FILE, PROMPTS_FILE

DEMO = "demo"
ENV_BASE_MODEL = "TASTEBUD_BASE_MODEL"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# What to do when weights can't be found; every BaseModelNotFound message ends with it.
FIX = f"set {ENV_BASE_MODEL} to a local diffusers folder or a .safetensors file, or to {DEMO!r}"


class BaseModelNotFound(RuntimeError):
    """The base model's weights or configs are not where the spec says."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo pipeline: SD 1.x structure, shrunk so CPU tests take seconds."""

    latent_size: int = 8  # 4×8×8 latents; the image side is this × the VAE's downsampling
    unet_channels: tuple[int, ...] = (32, 64)  # two levels: one plain, one cross-attention
    unet_attention: tuple[bool, ...] = (False, True)  # cross-attention per level (text control)
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # four levels like SD 1.x → factor 8
    vae_groups: int = 16  # GroupNorm groups; must divide every VAE channel count
    text_width: int = 32  # CLIP hidden size, also the UNet's cross-attention width
    text_layers: int = 2  # enough to be a transformer, few enough to be instant
    max_tokens: int = 77  # CLIP's context length, as in SD 1.x
    vae_scaling_factor: float = 0.18215  # SD 1.x's latent scale, so latent code is shared


@dataclass(frozen=True)
class BaseModel:
    """A loaded base pipeline and what the rest of the trainer needs to know about it."""

    pipeline: StableDiffusionPipeline
    name: str  # "demo", or the hub id / path it was loaded from
    is_demo: bool
    resolution: int  # image side in pixels: 512 for SD 1.x, 32 for the demo world
    prompts_file: Path  # the prompt set LoRAs train and evaluate on unless told otherwise
    family: str = "sd1"  # trainer.families: sd1, sd2 or sdxl (the families the trainer supports)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: every byte maps to one printable character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_demo_tokenizer(max_tokens: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer from a byte-level vocabulary, with no download."""
    # No merges: every word splits into single characters, the last one marked "</w>".
    # That is a valid CLIP BPE, just a long-winded one, and it needs no vocabulary file.
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)


def build_demo_pipeline(seed: int = 0, config: DemoConfig | None = None) -> StableDiffusionPipeline:
    """Build the tiny demo pipeline with weights drawn deterministically from `seed`."""
    config = config or DemoConfig()
    tokenizer = build_demo_tokenizer(config.max_tokens)
    # fork_rng: building the demo must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=tuple(
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_attention
            ),
            up_block_types=tuple(
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_attention)
            ),
            cross_attention_dim=config.text_width,
            attention_head_dim=8,
            norm_num_groups=min(32, *config.unet_channels),
        )
        torch.manual_seed(seed + 1)
        levels = len(config.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=config.vae_groups,
            sample_size=config.latent_size * 2 ** (levels - 1),
            scaling_factor=config.vae_scaling_factor,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.text_width,
                intermediate_size=config.text_width * 4,
                num_hidden_layers=config.text_layers,
                num_attention_heads=4,
                max_position_embeddings=config.max_tokens,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # SD 1.x's training schedule, so sampling and LoRA code see the same timesteps.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@contextmanager
def only_vae_on_gpu(pipeline: StableDiffusionPipeline):
    """While encoding or decoding images, keep only the VAE on the GPU: the UNet (1.7 GB in
    fp16 for SD 1.x, 4.8 GB for SDXL) and the text encoders (SDXL's two: 1.5 GB) wait on the
    CPU, so the VAE's activations have room (SDXL's decoder: 3 GB at 1024 px in fp32)."""
    device = pipeline.unet.device
    if device.type != "cuda":
        yield
        return
    parked = [pipeline.unet, *text_encoders(pipeline)]
    for module in parked:
        module.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for module in parked:
            module.to(device)


def ddim_scheduler(config) -> DDIMScheduler:
    """DDIM on a base model's own noise schedule, its sampling settings set explicitly.

    Everything tastebud draws (the LoRA's training rollouts and evaluation, the grid, the blind
    check) samples with it, so their scores compare. The settings are SD's: a config written
    for another scheduler (Euler, DPM-Solver, DEIS: many finetunes) lacks them, and DDIM's own
    defaults would clip x̂0 to [−1, 1], which corrupts unit-variance latents.
    """
    # Zero terminal SNR: sampling must start at the last timestep, where no signal is left
    # ("leading" spacing, SDXL's own, would never reach it).
    zero_snr = config.get("rescale_betas_zero_snr", False)
    return DDIMScheduler.from_config(
        config,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=config.get("steps_offset", 1),
        timestep_spacing="trailing" if zero_snr else config.get("timestep_spacing", "leading"),
    )


# Never load SD's safety checker: 304 M parameters (0.57 GiB in fp16, a 1.2 GB download) on
# the GPU beside the UNet, and nothing here ever runs it.
NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}
# The pipeline class each family the trainer supports is loaded as, and what it is told.
PIPELINES = {
    "sd1": (StableDiffusionPipeline, NO_SAFETY_CHECKER),
    "sd2": (StableDiffusionPipeline, NO_SAFETY_CHECKER),
    "sdxl": (StableDiffusionXLPipeline, {}),  # SDXL pipelines have no safety checker
    "playground-v2.5": (StableDiffusionXLPipeline, {}),  # then run as DDPM (trainer.edm)
}


def _offline() -> bool:
    # Read the environment now, not huggingface_hub's constants, which are fixed at import.
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else the user typed is meant as a path.
    return (
        spec.startswith((".", "/", "~", "\\"))
        or spec.lower().endswith(SINGLE_FILE_SUFFIXES)
        or spec.count("/") > 1
        or os.sep in spec.replace("/", "")
        or (len(spec) > 1 and spec[1] == ":")  # Windows drive letter
    )


def _load_folder(folder: Path, dtype: torch.dtype, family: str) -> StableDiffusionPipeline:
    if not (folder / "model_index.json").is_file():
        raise BaseModelNotFound(f"{folder} is not a diffusers folder (no model_index.json); {FIX}")
    pipeline, told = PIPELINES[family]
    try:
        return pipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **told)
    except (OSError, ValueError) as error:
        raise BaseModelNotFound(
            f"could not load the diffusers folder {folder}: {error}; {FIX}"
        ) from error


def _load_single_file(
    path: Path, dtype: torch.dtype, config: str | Path | None, family: str
) -> StableDiffusionPipeline:
    if not path.is_file():
        raise BaseModelNotFound(f"no checkpoint file at {path}; {FIX}")
    if config is not None and not Path(config, "model_index.json").is_file():
        raise BaseModelNotFound(f"config {config} is not a diffusers folder (no model_index.json)")
    local_only = config is not None or _offline()
    pipeline, told = PIPELINES[family]
    try:
        return pipeline.from_single_file(
            str(path),
            config=str(config) if config is not None else None,
            dtype=dtype,
            local_files_only=local_only,
            **told,
        )
    # KeyError and SingleFileComponentError: the file is not an SD checkpoint diffusers knows.
    except (OSError, ValueError, KeyError, SingleFileComponentError) as error:
        hint = (
            ""
            if config
            else " (set TASTEBUD_BASE_MODEL_CONFIG, or pass config=, to a local diffusers folder"
            " with the model's configs)"
        )
        raise BaseModelNotFound(f"could not load {path}{hint}: {error}; {FIX}") from error


def _load_hub(repo_id: str, dtype: torch.dtype, family: str) -> StableDiffusionPipeline:
    pipeline, told = PIPELINES[family]
    # The local cache first: fast, and the only option offline.
    try:
        return pipeline.from_pretrained(repo_id, dtype=dtype, local_files_only=True, **told)
    except (OSError, ValueError) as error:
        if isinstance(error, HFValidationError):
            raise BaseModelNotFound(f"{repo_id!r} is neither a hub id nor a path; {FIX}") from None
        if _offline():
            raise BaseModelNotFound(
                f"{FIX}; hub id {repo_id} is not in the local cache and this machine is offline"
            ) from None
    try:
        return pipeline.from_pretrained(repo_id, dtype=dtype, **told)
    except (OSError, ValueError) as error:
        raise BaseModelNotFound(
            f"{FIX}; hub id {repo_id} is not in the local cache and could not be downloaded"
            f" ({type(error).__name__}: {error})"
        ) from error


def load_base(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
    precision: str = "auto",
) -> BaseModel:
    """Load a base pipeline from "demo", a hub id, a diffusers folder or a single file.

    `config` is a local diffusers folder whose configs describe a single-file checkpoint;
    without it diffusers guesses the model family and fetches its configs from the hub.
    Without `dtype`, `precision` chooses it for the device (trainer.device.weights_dtype).
    """
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or weights_dtype(device, precision)
    spec = spec.strip()
    family = family_of(spec)
    try:
        refuse_unless_supported(family, spec)
    except UnsupportedFamily as error:
        raise BaseModelNotFound(str(error)) from None
    if spec == DEMO:
        from trainer.demo_world import DemoWorldError, load_world  # it builds on this module

        try:
            pipeline = load_world()
        except DemoWorldError as error:
            raise BaseModelNotFound(str(error)) from error
        if dtype != torch.float32:  # loaders get dtype directly; only the demo is cast
            pipeline = pipeline.to(dtype=dtype)
    elif spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        pipeline = _load_single_file(Path(spec).expanduser(), dtype, config, family)
        said = scheduler_of_checkpoint(Path(spec).expanduser())  # v-prediction, zero SNR
        pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, **said)
    elif Path(spec).expanduser().is_dir():
        pipeline = _load_folder(Path(spec).expanduser(), dtype, family)
    elif _looks_like_path(spec) or not spec:
        raise BaseModelNotFound(f"no base model at {spec!r}; {FIX}")
    else:
        pipeline = _load_hub(spec, dtype, family)
    if is_edm(pipeline.scheduler.config):  # Playground v2.5: sampled and trained as DDPM
        pipeline = as_variance_preserving(pipeline)
    pipeline.scheduler = ddim_scheduler(pipeline.scheduler.config)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    is_demo = spec == DEMO
    prompts = DEMO_PROMPTS_FILE if is_demo else PROMPTS_FILE
    return BaseModel(pipeline, spec, is_demo, resolution, prompts, family)


def family_of(spec: str) -> str:
    """The family of the base model a spec names, from configs or a header, before loading
    (trainer.families); "sd1" when that can't be told yet (the loader then says why)."""
    path = Path(spec).expanduser()
    if spec == DEMO:
        return "sd1"
    if spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        return family_of_checkpoint(path) if path.is_file() else "sd1"
    if (path / "model_index.json").is_file():
        return family_of_folder(path)
    if _looks_like_path(spec) or not spec:
        return "sd1"
    try:  # a hub id: its model_index.json, from the cache, else (online) the hub
        found = hf_hub_download(spec, "model_index.json", local_files_only=_offline())
        return family_of_configs(json.loads(Path(found).read_text()))
    except (OSError, ValueError, HFValidationError):
        return "sd1"


class VaePipeline:
    """What encoding and decoding use of a pipeline: its VAE and its image processor."""

    def __init__(self, vae: torch.nn.Module, image_processor):
        self.vae, self.image_processor = vae, image_processor

    @property
    def device(self) -> torch.device:
        return self.vae.device


def load_vae(
    spec: str,
    *,
    device: torch.device | str | None = None,
    config: str | Path | None = None,
    precision: str = "auto",
) -> BaseModel:
    """Load a base model to encode and decode only ("Improve this image"): the model is read
    on the CPU and only its VAE goes to the device (SD 1.x: 160 MB in fp16, not 2 GB)."""
    device = torch.device(device) if device is not None else pick_device()
    base = load_base(spec, device="cpu", dtype=weights_dtype(device, precision), config=config)
    light = VaePipeline(base.pipeline.vae.to(device), base.pipeline.image_processor)
    return replace(base, pipeline=light)


def summarize(base: BaseModel) -> dict:
    """Return a JSON-ready summary of a loaded base model."""
    pipe = base.pipeline
    side = base.resolution // pipe.vae_scale_factor
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {
        "name": base.name,
        "is_demo": base.is_demo,
        "resolution": base.resolution,
        "latent_shape": [pipe.vae.config.latent_channels, side, side],
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "family": base.family,
        "prompts_file": str(base.prompts_file),
        "demo_world": _world_record() if base.is_demo else None,
    }


def _world_record() -> dict:
    from trainer.demo_world import read_record

    return read_record()


def main(argv: list[str] | None = None) -> None:
    """Print a JSON summary of a base model: `python -m trainer.base info --base demo`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.base")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="load a base model and describe it")
    info.add_argument("--base", default=os.environ.get(ENV_BASE_MODEL, DEMO))
    info.add_argument("--config", help="local diffusers folder for a single-file checkpoint")
    info.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    try:
        base = load_base(args.base, device=args.device, config=args.config)
    except BaseModelNotFound as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summarize(base), indent=2))


if __name__ == "__main__":
    main()
