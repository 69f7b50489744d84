"""A tiny SDXL-structured pipeline built from config (random weights, no download), as
diffusers' own SDXL pipeline tests build theirs: two CLIP text encoders (the second with a
projection, whose pooled output is the added text embedding), a UNet with "text_time" added
conditioning, and a VAE with SDXL's latent scale."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EDMDPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.base import build_demo_tokenizer

WIDTH = 32  # each text encoder's width; the UNet's cross-attention takes both side by side
TIME_WIDTH = 8  # each of the six micro-conditioning numbers is embedded this wide


def build_tiny_sdxl(seed: int = 0, latent_size: int = 8) -> StableDiffusionXLPipeline:
    """An SDXL-family pipeline small enough to train on a CPU in seconds."""
    tokenizer = build_demo_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_WIDTH,
            projection_class_embeddings_input_dim=6 * TIME_WIDTH + WIDTH,
            cross_attention_dim=2 * WIDTH,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=latent_size * 8,
            scaling_factor=0.13025,  # SDXL's
        )
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=4 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=build_demo_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def build_tiny_playground(seed: int = 0, latent_size: int = 8) -> StableDiffusionXLPipeline:
    """A Playground v2.5-structured pipeline: the tiny SDXL with Playground's EDM scheduler
    config and a VAE with per-channel latents mean and std (its values)."""
    pipe = build_tiny_sdxl(seed, latent_size)
    pipe.vae.register_to_config(
        scaling_factor=0.5,
        latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
        latents_std=[8.4927, 5.9022, 6.5498, 5.2299],
    )
    pipe.scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002,
        sigma_max=80.0,
        sigma_data=0.5,
        sigma_schedule="exponential",
        prediction_type="epsilon",
        final_sigmas_type="zero",
    )
    return pipe
