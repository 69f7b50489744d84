"""GPU memory of "Train my taste" on an SD 1.5-sized base at 512 px, counted on any machine.

No GPU needed. The SD 1.5-sized UNet of bench/lora_step.py (SD 1.5's UNet config, 860 M
parameters) is built on torch's meta device (shapes, no data) in half precision, as a CUDA run
loads it (fp16 or bf16: the same bytes), and the real `trainer.lora._prepare` and
`_train_step` run on it. A dispatch hook (lora_step.TensorBytes) counts the bytes of every
tensor an op makes, while it lives. Attention goes through the memory-efficient kernel's op,
which PyTorch's SDPA picks on CUDA for half precision (the math path would hold
16 × 8 × 4096² attention scores per layer). The encode phase is counted the same way on an SD
1.5-sized VAE encoder.

Held: UNet weights, the LoRA and its Adam state, the scorer, cached prompt embeddings, the pool
latents one-step steps draw from (1,000: 300 rated and 200 unrated pictures, mirrored); training
moves the text encoder and the VAE to the CPU. Peaks above that: one training step with its
backward (gradient checkpointing on and off), one evaluation call (E prompts × seeds, doubled
by CFG: the largest no-gradient batch), one VAE encode. Not counted: the CUDA context
(≈ 0.3–0.5 GiB), cuBLAS/cuDNN workspaces, allocator fragmentation; and autocast, which can't
run on the meta device: the UNet's inputs are cast to its dtype instead, so group-norm outputs
are counted in half precision where autocast keeps them fp32.

    .venv/bin/python bench/gpu_memory.py            # --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lora_step, beside this file
import lora_step  # noqa: E402

from trainer import lora  # noqa: E402

META = torch.device("meta")
HALF = torch.float16
DEFAULT = lora.TasteLoraConfig()
GIB = 2**30
POOL = 1000  # latents the one-step steps draw from: 300 rated + 200 unrated, and their mirrors
SD15_VAE = {  # stable-diffusion-v1-5 vae/config.json
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
}


SDPA = F.scaled_dot_product_attention


def efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """SDPA as CUDA runs it for half precision: the memory-efficient kernel (its meta op).
    The text encoder's causal, masked attention (once, on cached prompts) goes the usual way."""
    if attn_mask is not None or dropout_p or is_causal:
        return SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    op = torch.ops.aten._scaled_dot_product_efficient_attention
    return op(q, k, v, None, torch.is_grad_enabled(), 0.0, False, scale=scale)[0]


def to_dtype_of(module: torch.nn.Module):
    """A forward pre-hook casting floating inputs to the module's dtype (autocast's stand-in)."""
    dtype = next(module.parameters()).dtype

    def cast(_module, args, kwargs):
        def half(value):
            return (
                value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            )

        return tuple(map(half, args)), {k: half(v) for k, v in kwargs.items()}

    return cast


@contextlib.contextmanager
def on_meta():
    """Attention as on CUDA, and autocast (which meta tensors can't take) as a no-op."""
    with (
        mock.patch.object(F, "scaled_dot_product_attention", efficient_attention),
        mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()),
    ):
        yield


def prepared(family: str, scorer: Path, config: lora.TasteLoraConfig):
    """`trainer.lora._prepare` on the SD 1.5- or SDXL-sized base, on the meta device in fp16."""
    base = lora_step.sd15_base(META) if family == "sd1" else lora_step.meta_base(family)
    base.pipeline.unet.to(HALF)
    base.pipeline.unet.register_forward_pre_hook(to_dtype_of(base.pipeline.unet), with_kwargs=True)
    side = base.resolution // base.pipeline.vae_scale_factor
    pool = torch.zeros(POOL, 4, side, side, device=META) if config.uses_images else None
    with mock.patch.object(lora, "_half", lambda *a: HALF):  # passes its fp16 check
        run = lora._prepare(base, scorer, config, pool)
    run.half = None
    run.scheduler.set_timesteps(config.sample_steps, device="cpu")  # indexes CPU tables
    return run


def held_bytes(run) -> dict:
    """What the run holds between steps, by part; Adam keeps two fp32 moments per parameter."""
    trainable = [p for p in run.unet.parameters() if p.requires_grad]
    ids = set(map(id, trainable))
    return {
        "unet": sum(p.nbytes for p in run.unet.parameters() if id(p) not in ids),
        "lora": sum(p.nbytes for p in trainable),
        "adam": 2 * sum(p.numel() * 4 for p in trainable),
        "scorer": sum(t.nbytes for t in [*run.scorer.parameters(), *run.scorer.buffers()]),
        "embeddings": sum(t.nbytes for t in (run.train_embeds, run.eval_embeds, run.uncond)),
        "pool": run.images.nbytes if run.images is not None else 0,
    }


def step_peak(run) -> int:
    """Peak bytes above what is held, over one training step and its backward."""
    with lora_step.TensorBytes() as counted:
        terms = lora._train_step(run, 0)
        terms["loss"].backward()
        grads = [p.grad for p in run.unet.parameters() if p.grad is not None]
        del terms, grads
    for p in run.unet.parameters():
        p.grad = None
    return counted.peak


@torch.no_grad()
def eval_peak(run) -> int:
    """Peak bytes above what is held, over one evaluation step: the LoRA's ε and the base's."""
    t = run.scheduler.timesteps[0]
    with lora_step.TensorBytes() as counted:
        eps = lora._eps(run, run.eval_noise * 1.0, t, run.eval_embeds)
        with lora._adapter_off(run.unet):
            base_eps = lora._eps(run, run.eval_noise * 1.0, t, run.eval_embeds)
        del eps, base_eps
    return counted.peak


def meta_vae(dtype: torch.dtype) -> AutoencoderKL:
    """SD 1.5's VAE (SDXL's has the same structure) on the meta device."""
    with torch.device(META):
        return AutoencoderKL(**SD15_VAE).to(dtype)


@torch.no_grad()
def encode_peak(images: int, side: int) -> int:
    """Peak bytes of one VAE encoder call on `images` pictures `side` px square (SD 1.5's VAE,
    which SDXL's shares in structure; fp16): trainer.latents.encode_pixels makes one call per
    image on CUDA."""
    vae = meta_vae(HALF)
    with lora_step.TensorBytes() as counted:
        vae.encode(torch.zeros(images, 3, side, side, device=META, dtype=HALF))
    return counted.peak


@torch.no_grad()
def decode_peak(side: int, dtype: torch.dtype) -> int:
    """Peak bytes of one VAE decoder call on one picture `side` px square, as
    trainer.latents.decode_latents makes on CUDA (SDXL's VAE decodes in fp32: it overflows in
    fp16)."""
    vae = meta_vae(dtype)
    latents = torch.zeros(1, 4, side // 8, side // 8, device=META, dtype=dtype)
    with lora_step.TensorBytes() as counted:
        vae.decode(latents)
    return counted.peak


def text_encoder_bytes(family: str) -> int:
    """The fp16 bytes of the family's real text encoders (CLIP ViT-L; SDXL adds OpenCLIP bigG),
    built on the meta device from their configs: on the GPU while the results render."""
    clip_l = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    big_g = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32}
    configs = [clip_l] if family == "sd1" else [clip_l, big_g]
    with torch.device(META):
        models = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(**c, num_attention_heads=c["hidden_size"] // 64, projection_dim=768)
            )
            for c in configs
        ]
    return sum(p.numel() * 2 for m in models for p in m.parameters())


def results_bytes(family: str, figures: dict) -> dict:
    """The results phase (grid and blind check): the whole pipeline on the GPU, the LoRA loaded,
    rendering TASTE_GRID_SEEDS (2) pictures with CFG (4 UNet rows); then, with only the VAE on
    the GPU (trainer.sample.decode_all), decoding them one at a time. The render's peak is read
    off the 8-row evaluation's (half its rows)."""
    vae_dtype = torch.float32 if family == "sdxl" else HALF
    row = figures["rows"][0]
    held = {
        "unet": row["held"]["unet"],
        "text encoders": text_encoder_bytes(family),
        "vae": sum(p.nbytes for p in meta_vae(vae_dtype).parameters()),
    }
    render = row["eval_peak"] * 4 // row["eval_rows"] // 2  # eval rows are doubled by CFG
    decode = decode_peak(figures["side"], vae_dtype)
    return {"held": held, "render_peak": render, "decode_peak": decode}


# (batch, eval prompts) counted per family: the default, the out-of-memory retry's halves
# (rating.taste_jobs.smaller), and for SDXL one evaluation prompt as well.
SETTINGS = {
    "sd1": [(DEFAULT.batch_size, DEFAULT.eval_prompts), (1, DEFAULT.eval_prompts // 2)],
    "sdxl": [(DEFAULT.batch_size, DEFAULT.eval_prompts), (1, DEFAULT.eval_prompts // 2), (1, 1)],
}
PIXELS = {"sd1": 512, "sdxl": 1024}  # each family's native resolution; latents are 1/8 of it
TITLES = {
    "sd1": "SD 1.5-sized UNet (860 M), 512 px (latents 4×64×64)",
    "sdxl": "SDXL-sized UNet (2.6 B), 1024 px (latents 4×128×128)",
}


def measure(family: str, scorer: Path) -> dict:
    """Every figure for one family: each batch and evaluation size, checkpointing on and off."""
    rows = []
    for batch, eval_prompts in SETTINGS[family]:
        for checkpointing in (True, False):
            config = replace(
                DEFAULT,
                batch_size=batch,
                eval_prompts=eval_prompts,
                gradient_checkpointing=checkpointing,
            )
            with on_meta():
                run = prepared(family, scorer, config)
                held = held_bytes(run)
                rows.append(
                    {
                        "batch": batch,
                        "eval_rows": len(run.eval_embeds),
                        "checkpointing": checkpointing,
                        "held": held,
                        "step_peak": step_peak(run),
                        "eval_peak": eval_peak(run),
                    }
                )
    side = PIXELS[family]
    with on_meta():
        encode = {n: encode_peak(n, side) for n in (1, 16)}
    figures = {"rows": rows, "encode": encode, "side": side}
    with on_meta():
        figures["results"] = results_bytes(family, figures)
    return figures


def total(row: dict) -> int:
    """Bytes at the peak: what is held, plus the larger of a step's and an evaluation's peak."""
    return sum(row["held"].values()) + max(row["step_peak"], row["eval_peak"])


def report(family: str, figures: dict) -> None:
    """Print one family's figures as a table, in GiB, with what is left on 8 and 12 GiB cards."""
    print(f"{TITLES[family]}, fp16 weights, counted on meta")
    print(
        f"{'batch':>5} {'eval rows':>9} {'ckpt':>5} {'held':>6} {'step':>6} {'eval':>6}"
        f" {'peak total':>10}  {'8 GiB card':>10}  {'12 GiB card':>11}"
    )
    for r in figures["rows"]:
        held, peak = sum(r["held"].values()), total(r)
        print(
            f"{r['batch']:>5} {r['eval_rows']:>9} {'on' if r['checkpointing'] else 'off':>5}"
            f" {held / GIB:>6.2f} {r['step_peak'] / GIB:>6.2f} {r['eval_peak'] / GIB:>6.2f}"
            f" {peak / GIB:>10.2f}  {(8 * GIB - peak) / GIB:>+9.2f}"
            f"   {(12 * GIB - peak) / GIB:>+9.2f}"
        )
    parts = figures["rows"][0]["held"]
    print("held, by part (GiB): " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in parts.items()))
    print(
        f"encode, one VAE encoder call at {figures['side']} px in fp16, peak above its weights"
        f" (GiB): one image (as encode runs on CUDA) {figures['encode'][1] / GIB:.2f}; 16"
        f" {figures['encode'][16] / GIB:.2f}"
    )
    results = figures["results"]
    render = sum(results["held"].values()) + results["render_peak"]
    decode = results["held"]["vae"] + results["decode_peak"]
    print(
        "results phase (grid, blind check), GiB: held "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in results["held"].items())
        + f"; rendering {render / GIB:.2f} in all (its peak {results['render_peak'] / GIB:.2f});"
        f" decoding one picture with only the VAE on the GPU {decode / GIB:.2f}"
        f" (its peak {results['decode_peak'] / GIB:.2f});"
        f" peak total {max(render, decode) / GIB:.2f}"
    )
    print()


def main() -> None:
    """Count and print (or --json) the memory figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--family", choices=("sd1", "sdxl"), nargs="+", default=["sd1", "sdxl"])
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # "truncated" notes for long prompts, dtype notes
    transformers_logging.set_verbosity_error()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in args.family:
            side = PIXELS[family] // 8
            scorer = Path(folder) / f"scorer-{family}.safetensors"
            lora_step.save_random_scorer(scorer, [4, side, side])
            figures[family] = measure(family, scorer)
    if args.json:
        print(json.dumps(figures))
        return
    for family, figured in figures.items():
        report(family, figured)
    print("not counted: the CUDA context (≈0.3–0.5 GiB), kernel workspaces, fragmentation")


if __name__ == "__main__":
    main()
