"""LoRA step bench: seconds and peak memory per taste-LoRA step, and what a default run costs.

Every step is the real loop's: `trainer.lora._prepare` sets the run up (scorer, cached prompt
embeddings, a fresh adapter, checkpointing), and a step is the body of `trainer.lora.train`
(`_train_step`, backward, clip, optimiser step) without the held-out evaluations, which are
costed separately. In one run:

(a) the demo base, default TasteLoraConfig (K = 1), gradient checkpointing on and off: one
    warm-up step, then the mean of N steps;
(b) an SD 1.5-sized UNet (SD 1.5's UNet config, 860 M parameters, random weights: the same
    compute as the real one) in the demo pipeline, with a one-layer 768-wide text encoder, at
    512 px (latents 4×64×64), K = 1, checkpointing on and off. A full step is timed on a GPU;
    on a CPU (~40 s per UNet call) the parts are timed once each and the step is computed:
    one no-grad CFG UNet call, and the gradient part (the real `_train_step` with
    sample_steps = window = 1, so it is the K = 1 step alone: the LoRA call with gradient, the
    drift's base call, the scorer, backward and the optimiser step);
(c) on the demo base, the loop (K = 1) against backpropagating through every sampling step
    (K = window = sample_steps), ratios printed side by side.

From these it costs a default run (300 steps, an evaluation every 50) on this machine, and
estimates it on a consumer GPU from the FLOPs counted (torch.utils.flop_counter) and an
assumed sustained throughput.

Memory: on CUDA, torch.cuda.max_memory_allocated over the timed steps. Elsewhere, the bytes of
the tensors the run holds (UNet, LoRA, scorer, optimiser state, cached embeddings) plus the peak
bytes of the tensors allocated while one step runs, tracked op by op; allocator slack and kernel
scratch space are not in it.

    .venv/bin/python bench/lora_step.py          # --quick, --device cuda, --skip-sd15, --json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer import lora
from trainer import scorer as sc
from trainer.base import BaseModel, build_demo_pipeline, load_base
from trainer.device import pick_device
from trainer.prompts import PROMPTS_FILE

DEFAULT = lora.TasteLoraConfig()
# The rollout default before the one-step mode (issue 15): parts (a)-(c) time its step, and (d)
# sets today's modes against it.
ROLLOUT = lora.TasteLoraConfig(mode="rollout", steps=200, eval_every=50)
SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json, the parts that set the compute
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.6 B parameters)
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) and OpenCLIP bigG (1280) side by side
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # bigG's pooled 1280 + 6 time ids × 256
}
META = torch.device("meta")
# trainer.lora._evaluate: strength 1 with the drift's base pass beside it (2 calls a step),
# then strengths 0.5 and -1 (1 each)
EVAL_PASSES = 4
GOAL_MINUTES, GOAL_GIB = 10.0, 8.0  # the issue's bar for SD 1.5 on a consumer GPU
GPU_NAME = "RTX 3060 12 GB"
# GA10x tensor cores: 1,024 dense fp16 FLOP/clock/SM with fp16 accumulate, half that with the
# fp32 accumulate PyTorch's fp16/bf16 matmuls use; the 3060 has 28 SMs at 1.78 GHz boost.
GPU_PEAK_TFLOPS = 28 * 1.777e9 * 512 / 1e12
# Ada tensor cores, dense fp16 with fp32 accumulate (GeForce halves it): 4070 and 4090.
FASTER_GPUS = {"RTX 4070 12 GB": 29.1, "RTX 4090 24 GB": 82.6}
GPU_UTILISATION = 0.4  # an assumption: UNet training/sampling rarely sustains more than ~40 %
CPU_SDPA = {  # the CPU flash-attention kernels, which FlopCounterMode has no formula for
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v)
    ),
}


# ---- measuring ------------------------------------------------------------------------------


class TensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors ops allocate while active; views and in-place ops add none."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, weakref.finalize] = {}

    def _freed(self, key: int, size: int) -> None:
        self.now -= size
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # one Python object per storage while it lives
            key = id(storage)
            if key in inputs or key in self._live:  # a view of, or written into, an input
                continue
            size = storage.nbytes()
            self._live[key] = weakref.finalize(storage, self._freed, key, size)
            self.now += size
            self.peak = max(self.peak, self.now)
        return out


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux), a cross-check on the CPU figures."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), None)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock stops when the work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Loop:
    """A prepared run and its optimiser, stepping exactly as trainer.lora.train does."""

    def __init__(self, base: BaseModel, scorer_path: Path, config: lora.TasteLoraConfig):
        config.check()
        self.base, self.run = base, lora._prepare(base, scorer_path, config)
        self.trainable = [p for p in self.run.unet.parameters() if p.requires_grad]
        self.optimizer = lora.OPTIMIZERS[config.optimizer](self.trainable, config)
        self.scaler = torch.amp.GradScaler(enabled=self.run.half == torch.float16)
        self.steps = 0

    def step(self) -> float:
        """Run one training step; return its score (read as the loop reads it: a sync point)."""
        run = self.run
        run.unet.train()
        terms = lora._train_step(run, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, run.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        return float(terms["score"])

    def held_bytes(self) -> dict:
        """Bytes of what the run holds between steps, by part (gradients are freed first)."""
        self.optimizer.zero_grad(set_to_none=True)
        run = self.run
        lora_params = set(map(id, self.trainable))
        parts = {
            "unet": [p for p in run.unet.parameters() if id(p) not in lora_params],
            "lora": self.trainable,
            "optimizer": [
                v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
            ],
            "scorer": [*run.scorer.parameters(), *run.scorer.buffers()],
            "embeddings": [run.train_embeds, run.eval_embeds, run.uncond],
            "other": [*run.unet.buffers(), run.eval_noise],
        }
        return {name: sum(t.nbytes for t in tensors) for name, tensors in parts.items()}


@contextlib.contextmanager
def prepared(base: BaseModel, scorer_path: Path, config: lora.TasteLoraConfig) -> Iterator[Loop]:
    """A Loop on `base`; afterwards the pipeline is handed back as train() leaves it."""
    try:
        yield Loop(base, scorer_path, config)
    finally:
        lora._release(base)
        gc.collect()
        if base.pipeline.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(loop: Loop) -> Iterator[dict]:
    """Fill the dict with held and peak bytes (and peak above held) of what runs inside."""
    device, figures = loop.run.device, {}
    held = sum(loop.held_bytes().values())
    if device.type == "cuda":
        sync(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield figures
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with TensorBytes() as tracker:
            yield figures
        peak = held + tracker.peak
    # By part after the step: the optimiser's state exists once it has stepped.
    figures.update(held=held, peak=peak, above=peak - held, parts=loop.held_bytes())


def counted_flops() -> FlopCounterMode:
    """A FlopCounterMode that also knows the CPU attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA)


def time_steps(loop: Loop, n: int, warmup: int, *, one_pass: bool = False) -> dict:
    """Seconds per step (mean of n after warm-up), peak memory, and the FLOPs of one step.

    one_pass: time a single step with the memory and FLOP counters on (their Python overhead
    is well under 1 % of a CPU step of the SD 1.5-sized UNet, which takes minutes).
    """
    device = loop.run.device
    for _ in range(warmup):  # kernels chosen, allocator warm, optimiser state made
        loop.step()
    if one_pass:
        with peak_memory(loop) as memory, counted_flops() as flops:
            began = time.perf_counter()
            loop.step()
            sync(device)
            seconds = time.perf_counter() - began
        return {"seconds": seconds, "steps": 1, "flops": flops.get_total_flops(), **memory}
    measure = peak_memory(loop) if device.type == "cuda" else contextlib.nullcontext({})
    with measure as memory:
        sync(device)
        began = time.perf_counter()
        for _ in range(n):
            loop.step()
        sync(device)
        seconds = (time.perf_counter() - began) / n
    if device.type != "cuda":  # the tracker costs time on small ops: a step of its own
        with peak_memory(loop) as memory:
            loop.step()
    with counted_flops() as flops:
        loop.step()
    return {"seconds": seconds, "steps": n, "flops": flops.get_total_flops(), **memory}


@torch.no_grad()
def time_call(loop: Loop, rows: int, n: int, warmup: int, *, one_pass: bool = False) -> dict:
    """Seconds, memory and FLOPs of one no-grad CFG UNet call on `rows` prompts (the rollout's)."""
    run = loop.run
    g = torch.Generator().manual_seed(0)
    x = torch.randn((rows, *run.eval_noise.shape[1:]), generator=g).to(run.device)
    x = x * run.scheduler.init_noise_sigma
    embeds = run.eval_embeds if rows == len(run.eval_embeds) else run.train_embeds[:rows]
    t = run.scheduler.timesteps[0]
    run.unet.train()  # as in the training rollout (the SD UNet has no dropout: same compute)

    def call():
        lora._eps(run, x, t, embeds)
        sync(run.device)

    for _ in range(warmup):
        call()
    if one_pass:
        with peak_memory(loop) as memory, counted_flops() as flops:
            began = time.perf_counter()
            call()
            seconds = time.perf_counter() - began
    else:
        began = time.perf_counter()
        for _ in range(n):
            call()
        seconds = (time.perf_counter() - began) / n
        with peak_memory(loop) as memory:
            call()
        with counted_flops() as flops:
            call()
    return {"seconds": seconds, "rows": rows, "flops": flops.get_total_flops(), **memory}


# ---- the models -----------------------------------------------------------------------------


def save_random_scorer(path: Path, shape: list[int]) -> Path:
    """An untrained scorer of the product's default size for latents of `shape`."""
    config = sc.ScorerConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = sc.Scorer(config).eval()
    sc.save_scorer(path, sc.TrainedScorer(model, config, {}, list(shape), 0, 0, "scratch"))
    return path


def sd15_base(device: torch.device) -> BaseModel:
    """The demo pipeline with an SD 1.5-sized UNet and a 768-wide text encoder, as load_base."""
    demo = build_demo_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(  # one layer: only its width matters, the loop embeds prompts once
                vocab_size=len(demo.tokenizer),
                hidden_size=768,
                intermediate_size=768,
                num_hidden_layers=1,
                num_attention_heads=12,
                max_position_embeddings=demo.tokenizer.model_max_length,
                bos_token_id=demo.tokenizer.bos_token_id,
                eos_token_id=demo.tokenizer.eos_token_id,
                pad_token_id=demo.tokenizer.pad_token_id,
            )
        ).eval()
    pipeline = StableDiffusionPipeline(
        vae=demo.vae,  # the demo's: the loop never decodes
        text_encoder=text_encoder,
        tokenizer=demo.tokenizer,
        unet=unet,
        scheduler=demo.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if device.type == "cuda":  # load_base's dtype: half on GPUs
        pipeline = pipeline.to(dtype=torch.float16)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return BaseModel(
        pipeline,
        "SD 1.5-sized (random)",
        is_demo=False,
        resolution=resolution,
        prompts_file=PROMPTS_FILE,
    )


def text_encoder(tokenizer, width: int, projection: int = 0) -> torch.nn.Module:
    """A one-layer CLIP text encoder `width` wide: only its width matters to the UNet, and the
    loop embeds its prompts once."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def meta_base(family: str) -> BaseModel:
    """A base whose UNet has SD 1.5's or SDXL's real sizes, on the meta device (shapes and no
    data: every op runs as its shapes say, so FLOPs count and nothing computes), beside
    one-layer text encoders of the real widths on the CPU."""
    demo = build_demo_pipeline()
    tokenizer = demo.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoders = {"text_encoder": text_encoder(tokenizer, 768)}
        if family == "sdxl":
            encoders["text_encoder_2"] = text_encoder(tokenizer, 1280, projection=1280)
    with torch.device(META):
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
    parts = {"vae": demo.vae, "tokenizer": tokenizer, "unet": unet, "scheduler": demo.scheduler}
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline(**parts, **encoders, tokenizer_2=tokenizer)
    else:
        pipeline = StableDiffusionPipeline(
            **parts, **encoders, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    resolution = unet.config.sample_size * pipeline.vae_scale_factor
    name = "SDXL-sized" if family == "sdxl" else "SD 1.5-sized"
    return BaseModel(pipeline, name, False, resolution, PROMPTS_FILE, family=family)


def latent_shape(base: BaseModel) -> list[int]:
    """[4, h, w] of the base's latents, as _prepare computes it."""
    side = base.resolution // base.pipeline.vae_scale_factor
    return [base.pipeline.unet.config.in_channels, side, side]


# ---- the parts ------------------------------------------------------------------------------


def demo_part(device: torch.device, folder: Path, n: int) -> dict:
    """(a) and (c): K = 1 and K = every step on the demo base, checkpointing on and off."""
    base = load_base("demo", device=device)
    scorer = save_random_scorer(folder / "demo-scorer.safetensors", latent_shape(base))
    every = ROLLOUT.sample_steps
    rows = []
    for k in (1, every):
        for checkpointing in (True, False):
            config = replace(ROLLOUT, gradient_checkpointing=checkpointing)
            if k > 1:
                config = replace(config, grad_steps=k, window=k)
            with prepared(base, scorer, config) as loop:
                row = time_steps(loop, n, warmup=1)
            rows.append({"k": k, "checkpointing": checkpointing, **row})
    return {"rows": rows, "every": every}


def sd15_part(device: torch.device, folder: Path, n: int, batch: int, full_steps: bool) -> dict:
    """(b): the SD 1.5-sized UNet: a no-grad call, the K = 1 gradient part, full steps on GPUs."""
    began = time.perf_counter()
    base = sd15_base(device)
    built = time.perf_counter() - began
    scorer = save_random_scorer(folder / "sd15-scorer.safetensors", latent_shape(base))
    parts_once = not full_steps  # each part timed once, with the counters on
    grad_only = replace(ROLLOUT, batch_size=batch, sample_steps=1, window=1, grad_steps=1)
    result = {"batch": batch, "build_s": built, "grad": {}, "full": {}}
    result["params"] = sum(p.numel() for p in base.pipeline.unet.parameters())
    result["resolution"] = base.resolution
    for checkpointing in (True, False):
        config = replace(grad_only, gradient_checkpointing=checkpointing)
        with prepared(base, scorer, config) as loop:
            if checkpointing:  # the first UNet calls of the process also warm its kernels
                if parts_once:
                    result["call"] = time_call(loop, batch, 1, warmup=0, one_pass=True)
                else:
                    result["call"] = time_call(loop, batch, n, warmup=1)
                    rows = len(loop.run.eval_embeds)
                    result["eval_call"] = time_call(loop, rows, n, warmup=1)
            result["grad"][checkpointing] = time_steps(
                loop, n, warmup=0 if parts_once else 1, one_pass=parts_once
            )
        if full_steps:  # the real default step, to check the sum of the parts against
            config = replace(ROLLOUT, batch_size=batch, gradient_checkpointing=checkpointing)
            with prepared(base, scorer, config) as loop:
                result["full"][checkpointing] = time_steps(loop, n, warmup=1)
    return result


@contextlib.contextmanager
def on_meta(base: BaseModel, scorer_path: Path, config: lora.TasteLoraConfig) -> Iterator:
    """A prepared run on a meta_base, stepping as the real loop does (real-shaped pool latents)."""
    side = base.resolution // base.pipeline.vae_scale_factor
    pool = torch.zeros(8, 4, side, side)
    no_autocast = mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    try:
        with no_autocast:  # which meta tensors can't take; off the GPU it is off anyway
            run = lora._prepare(base, scorer_path, config, pool if config.uses_images else None)
            run.scheduler.set_timesteps(config.sample_steps, device="cpu")  # CPU tables
            yield run
    finally:
        lora._release(base)


def flops_of(work, *, backward: bool = False) -> float:
    """FLOPs `work()` runs, and with `backward` those of backpropagating the loss it returns."""
    with counted_flops() as flops:
        out = work()
        if backward:
            out.backward()
    return flops.get_total_flops()


def mode_flops(family: str, folder: Path, config: lora.TasteLoraConfig) -> dict:
    """FLOPs of the parts each kind of step is made of, counted on the meta device at the real
    model's size: a no-grad guided call on the batch, the rollout's gradient part (K = 1), a
    whole one-step step, and a no-grad guided call on the evaluation's rows."""
    base = meta_base(family)
    scorer = save_random_scorer(folder / f"{family}-scorer.safetensors", latent_shape(base))
    grad_only = replace(config, mode="rollout", sample_steps=1, window=1, grad_steps=1)
    out = {"params": sum(p.numel() for p in base.pipeline.unet.parameters()), "family": family}
    out["resolution"] = base.resolution
    with on_meta(base, scorer, grad_only) as run:
        x = torch.zeros((config.batch_size, *run.eval_noise.shape[1:]), device=META)
        t = run.scheduler.timesteps[0]
        with torch.no_grad():
            out["call"] = flops_of(
                lambda: lora._eps(run, x, t, run.train_embeds[:1].expand(len(x)))
            )
            eval_x = run.eval_noise * 1.0
            out["eval_call"] = flops_of(lambda: lora._eps(run, eval_x, t, run.eval_embeds))
        out["grad"] = flops_of(lambda: lora._train_step(run, 0)["loss"], backward=True)
    with on_meta(base, scorer, replace(config, mode="one_step")) as run:
        out["one_step"] = flops_of(lambda: lora._train_step(run, 0)["loss"], backward=True)
    out["eval_rows"] = len(run.eval_embeds)
    return out


def step_flops(parts: dict, config: lora.TasteLoraConfig, kind: str | None = None) -> float:
    """FLOPs of a mean training step of `kind` (default: of config.mode) from the parts."""
    if kind is None:
        share = {"rollout": 0.0, "one_step": 1.0, "mixed": config.one_step_share}[config.mode]
        return share * step_flops(parts, config, "one_step") + (1 - share) * step_flops(
            parts, config, "rollout"
        )
    if kind == "one_step":
        return parts["one_step"]
    return rollout_calls(config) * parts["call"] + config.grad_steps * parts["grad"]


def run_flops(parts: dict, config: lora.TasteLoraConfig) -> dict:
    """FLOPs of a run that goes all its steps: training and the held-out evaluations."""
    return {
        "training": config.steps * step_flops(parts, config),
        "evaluations": eval_calls(config) * parts["eval_call"],
    }


def modes_part(folder: Path) -> dict:
    """(d) FLOPs per step and per default run, by mode, for SD 1.5 and SDXL at full size."""
    today = ROLLOUT
    return {
        family: {"parts": mode_flops(family, folder, DEFAULT), "today": today}
        for family in ("sd1", "sdxl")
    }


def minutes(flops: float, tflops: float, utilisation: float) -> float:
    """Minutes of `flops` at `utilisation` of a `tflops` peak."""
    return flops / (tflops * 1e12 * utilisation) / 60


def report_modes(r: dict) -> None:
    """Print (d): FLOPs per step by mode, and a default run's cost on consumer cards."""
    gpus = {GPU_NAME: r["gpu_tflops"], **FASTER_GPUS}
    print(
        "\n(d) FLOPs by training mode, counted on the meta device at the real sizes (fp32"
        " shapes; the count is the same in half precision), default config except the mode"
    )
    for d in r["modes"].values():
        parts = d["parts"]
        print(
            f"{parts['family']} UNet ({parts['params'] / 1e9:.2f} B params), {parts['resolution']}"
            f" px, batch {DEFAULT.batch_size} (x2 for CFG): no-grad call"
            f" {parts['call'] / 1e12:.2f} TFLOP, eval call ({parts['eval_rows']} rows)"
            f" {parts['eval_call'] / 1e12:.2f}"
        )
        print(
            f"  {'mode':28}{'TFLOP/step':>11}{'x one-step':>11}{'run PFLOP':>10}"
            f"{'(train+eval)':>14}" + "".join(f"{name[:8]:>10}" for name in gpus)
        )
        rows = [("rollout (today)", d["today"])]
        others = [replace(DEFAULT, mode=m) for m in lora.MODES if m != DEFAULT.mode]
        rows += [(c.mode, c) for c in others if c != d["today"]]
        rows.insert(1, (f"{DEFAULT.mode} (the default)", DEFAULT))
        one = step_flops(parts, DEFAULT, "one_step")
        for label, config in rows:
            per_step = step_flops(parts, config)
            run = run_flops(parts, config)
            total = sum(run.values())
            split = f"{run['training'] / 1e15:.1f}+{run['evaluations'] / 1e15:.1f}"
            print(
                f"  {label:28}{per_step / 1e12:>11.2f}{per_step / one:>11.2f}{total / 1e15:>10.1f}"
                f"{split:>14}"
                + "".join(f"{minutes(total, tf, r['gpu_util']):>9.1f}m" for tf in gpus.values())
            )
    print(
        f"  minutes: a run of {DEFAULT.steps} steps with its {evaluations(DEFAULT)} held-out"
        f" evaluations (eval_every {DEFAULT.eval_every}), FLOPs / (peak x {r['gpu_util']:.0%}"
        " assumed sustained); an ESTIMATE"
    )


# ---- what a default run costs ---------------------------------------------------------------


def rollout_calls(config: lora.TasteLoraConfig) -> float:
    """Mean no-grad UNet calls before the gradient steps (_train_step's random start)."""
    return config.sample_steps - config.window + (config.window - config.grad_steps) / 2


def eval_calls(config: lora.TasteLoraConfig) -> int:
    """UNet calls on the held-out batch in a run that goes all its steps."""
    per_evaluation = EVAL_PASSES * config.sample_steps
    return config.sample_steps + evaluations(config) * per_evaluation  # + the base's rollout


def evaluations(config: lora.TasteLoraConfig) -> int:
    """Held-out evaluations in a run that goes all its steps: at step 0, every eval_every, last."""
    return 1 + config.steps // config.eval_every + bool(config.steps % config.eval_every)


def default_run(sd: dict, config: lora.TasteLoraConfig) -> dict:
    """Seconds on this machine, FLOPs, and memory parts of a default run, from the parts."""
    scale = config.batch_size / sd["batch"]  # UNet compute and activations grow with the batch
    eval_rows = config.eval_prompts * len(config.eval_seeds)
    call, n_roll, n_eval = sd["call"], rollout_calls(config), eval_calls(config)
    eval_call = sd.get("eval_call") or {
        "seconds": call["seconds"] * eval_rows / sd["batch"],
        "flops": call["flops"] * eval_rows / sd["batch"],
        "above": call["above"] * eval_rows / sd["batch"],
    }
    out = {"rollout_calls": n_roll, "eval_calls": n_eval, "eval_rows": eval_rows, "by": {}}
    for checkpointing, grad in sd["grad"].items():
        full = sd["full"].get(checkpointing, {})  # the default step as measured, on GPUs
        step_s = scale * (full.get("seconds") or n_roll * call["seconds"] + grad["seconds"])
        flops = {
            "rollouts": config.steps * n_roll * call["flops"] * scale,
            "gradient parts": config.steps * grad["flops"] * scale,
            "evaluations": n_eval * eval_call["flops"],
        }
        out["by"][checkpointing] = {
            "step_s": step_s,
            "run_s": config.steps * step_s + n_eval * eval_call["seconds"],
            "flops": flops,
            "train_above": scale * max(grad["above"], full.get("above", 0)),
            "eval_above": eval_call["above"],
            "parts": grad["parts"],
        }
    return out


def gpu_estimate(cost: dict, tflops: float, utilisation: float, half_weights: bool) -> dict:
    """Minutes and GiB of a default run on the consumer GPU, from FLOPs and measured bytes."""
    out = {}
    for checkpointing, by in cost["by"].items():
        parts = by["parts"]
        weights = parts["unet"] / (1 if half_weights else 2)  # fp16 UNet, as load_base on CUDA
        held = (
            weights
            + 2 * parts["lora"]  # fp32 LoRA params and their fp32 gradients
            + parts["optimizer"]
            + parts["scorer"]
            + parts["embeddings"] / (1 if half_weights else 2)
            + parts["other"]
        )
        # Measured in fp32 here; under autocast the matmuls and convs save fp16 tensors and the
        # norms fp32 ones, so activations fall between half the fp32 figure and all of it.
        activations = max(by["train_above"], by["eval_above"])
        low, high = (held + activations / 2, held + activations)
        if half_weights:  # measured under autocast already
            low = high
        seconds = sum(by["flops"].values()) / (tflops * 1e12 * utilisation)
        out[checkpointing] = {
            "peak_in": "evaluation" if by["eval_above"] > by["train_above"] else "training step",
            "minutes": seconds / 60,
            "minutes_by": {
                k: v / (tflops * 1e12 * utilisation) / 60 for k, v in by["flops"].items()
            },
            "gib": (low / 2**30, high / 2**30),
            "held_gib": held / 2**30,
        }
    return out


# ---- report ---------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def report(r: dict) -> None:
    """Print the tables, the ratios, the costs and the verdict."""
    print(
        f"device {r['device']}; torch threads: demo {r['threads']['demo']},"
        f" SD 1.5-sized {r['threads']['sd15']}; load average {r['load'][0]:.1f} at start,"
        f" {r['load'][1]:.1f} at end (other work on this machine slows every figure)"
    )
    memory_note = (
        "torch.cuda.max_memory_allocated"
        if r["device"].startswith("cuda")
        else "held tensors + peak of tensors allocated in one step (op by op)"
    )
    print(f"memory: {memory_note}")
    if r["peak_rss"]:
        print(f"process peak resident memory (VmHWM), whole run: {r['peak_rss'] / 2**30:.2f} GiB")
    if "demo" in r:
        d, every = r["demo"], r["demo"]["every"]
        print(f"\n(a)+(c) demo base, default config, {d['steps']} timed steps after one warm-up")
        print(
            f"{'K (steps with grad)':<22}{'checkpointing':>14}{'s/step':>10}{'peak MiB':>11}"
            f"{'above held':>12}{'GFLOP/step':>12}"
        )
        by = {(row["k"], row["checkpointing"]): row for row in d["rows"]}
        for (k, ckpt), row in by.items():
            print(
                f"{k:<22}{'on' if ckpt else 'off':>14}{row['seconds']:>10.3f}"
                f"{mib(row['peak']):>11}{mib(row['above']):>12}{row['flops'] / 1e9:>12.1f}"
            )
        for ckpt in (True, False):
            one, full = by[(1, ckpt)], by[(every, ckpt)]
            print(
                f"backprop through all {every} steps / the loop (K=1), checkpointing"
                f" {'on' if ckpt else 'off'}: time {full['seconds'] / one['seconds']:.1f}x,"
                f" peak memory {full['peak'] / one['peak']:.2f}x"
                f" (above held {full['above'] / one['above']:.1f}x)"
            )
    if "sd15" not in r:
        return
    s, cost = r["sd15"], r["cost"]
    batch, config_batch = s["batch"], ROLLOUT.batch_size
    print(
        f"\n(b) SD 1.5-sized UNet ({s['params'] / 1e6:.0f} M params, random weights),"
        f" {s['resolution']} px,"
        f" batch {batch} prompt(s) (x2 for CFG); built in {s['build_s']:.0f} s"
    )
    what = "each once, no warm-up" if not s["full"] else f"mean of {s['steps']} after a warm-up"
    print(f"{'part':<44}{'s':>9}{'peak MiB':>11}{'above held':>12}{'TFLOP':>8}   ({what})")
    rows = [(f"no-grad CFG UNet call ({batch} prompt(s))", s["call"])]
    if "eval_call" in s:
        rows.append((f"no-grad CFG UNet call ({s['eval_call']['rows']} eval rows)", s["eval_call"]))
    for ckpt, row in s["grad"].items():
        rows.append((f"gradient part K=1, checkpointing {'on' if ckpt else 'off'}", row))
    for ckpt, row in s["full"].items():
        rows.append((f"full default step, checkpointing {'on' if ckpt else 'off'}", row))
    for label, row in rows:
        print(
            f"{label:<44}{row['seconds']:>9.2f}{mib(row['peak']):>11}{mib(row['above']):>12}"
            f"{row['flops'] / 1e12:>8.2f}"
        )
    g = s["grad"]
    print(
        f"checkpointing on / off, gradient part:"
        f" time {g[True]['seconds'] / g[False]['seconds']:.2f}x,"
        f" peak {g[True]['peak'] / g[False]['peak']:.2f}x,"
        f" above held {g[True]['above'] / g[False]['above']:.2f}x"
    )
    n_roll, scale = cost["rollout_calls"], config_batch / batch
    print(
        f"\ndefault run: {ROLLOUT.steps} steps of batch {config_batch}; a step ="
        f" {n_roll:g} no-grad calls on average (sample_steps - window + (window - K)/2)"
        f" + the gradient part; {cost['eval_calls']} held-out calls on {cost['eval_rows']} rows"
        f" (the base's rollout, then {evaluations(ROLLOUT)} evaluations x {EVAL_PASSES}"
        f" passes (strength 1 + its drift's base pass, 0.5, -1) x {ROLLOUT.sample_steps} steps)"
    )
    print(
        f"  step seconds = {scale:g} x ({n_roll:g} x call + gradient part)"
        f"  [x{scale:g}: batch {batch} measured; UNet compute grows linearly with the batch]"
    )
    for ckpt, by in cost["by"].items():
        summed = scale * (n_roll * s["call"]["seconds"] + s["grad"][ckpt]["seconds"])
        measured = f", measured {by['step_s']:.2f}" if ckpt in s["full"] else ""
        print(
            f"  this machine, checkpointing {'on' if ckpt else 'off'}: parts sum to"
            f" {summed:.2f}{measured} s/step; a run {by['run_s'] / 60:,.0f} min"
            f" ({by['run_s'] / 3600:.1f} h) with the evaluations"
        )
    gpu = r["gpu"]
    print(
        f"\n{GPU_NAME} ESTIMATE: FLOPs counted here / ({r['gpu_tflops']:.1f} TFLOP/s dense"
        f" fp16/bf16 tensor peak x {r['gpu_util']:.0%} assumed sustained)"
    )
    for ckpt, est in gpu.items():
        by = ", ".join(f"{k} {v:.1f}" for k, v in est["minutes_by"].items())
        flops = sum(cost["by"][ckpt]["flops"].values())
        low, high = est["gib"]
        print(
            f"  checkpointing {'on' if ckpt else 'off'}: {flops / 1e15:.1f} PFLOP ->"
            f" {est['minutes']:.0f} min ({by});"
            f" memory {low:.1f}-{high:.1f} GiB ({est['held_gib']:.2f} held + activations;"
            f" the peak is in the {est['peak_in']})"
        )
    on = gpu[True]
    for name, tflops in FASTER_GPUS.items():
        print(
            f"  the same at the {name}'s {tflops:g} TFLOP/s peak (same utilisation), checkpointing"
            f" on: {on['minutes'] * r['gpu_tflops'] / tflops:.0f} min"
        )
    fast, small = on["minutes"] <= GOAL_MINUTES, on["gib"][1] <= GOAL_GIB
    print(
        f"verdict vs the goal (<= {GOAL_MINUTES:g} min, <= {GOAL_GIB:g} GiB), ESTIMATE:"
        f" time {on['minutes']:.0f} min -> {'meets' if fast else 'misses'};"
        f" memory <= {on['gib'][1]:.1f} GiB with checkpointing ->"
        f" {'meets' if small else 'misses'}"
    )


def main() -> None:
    """Time and size taste-LoRA steps on the demo and an SD 1.5-sized UNet; cost a default run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 10")
    parser.add_argument("--skip-sd15", action="store_true", help="the demo parts only")
    parser.add_argument(
        "--sd15-batch",
        type=int,
        help="prompts per step for (b); default 1 on CPU (fp32 activations of 2 without"
        " checkpointing need ~12 GB of RAM), else the config's batch_size",
    )
    parser.add_argument(
        "--sd15-full-steps",
        action="store_true",
        help="time whole default steps for (b) also on a CPU (the default elsewhere; on a"
        " 2-core CPU one step takes over ten minutes)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for (b) on CPU")
    parser.add_argument("--gpu-tflops", type=float, default=GPU_PEAK_TFLOPS)
    parser.add_argument("--gpu-util", type=float, default=GPU_UTILISATION)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument(
        "--modes-only",
        action="store_true",
        help="only (d), the FLOPs by training mode at SD 1.5's and SDXL's sizes (seconds)",
    )
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the demo tokenizer on SD prompts: truncations
    device = torch.device(args.device) if args.device else pick_device()
    n = 3 if args.quick else 10
    result = {"device": str(device), "gpu_tflops": args.gpu_tflops, "gpu_util": args.gpu_util}
    result["threads"] = {"demo": 1, "sd15": args.threads} if device.type == "cpu" else {}
    result["threads"] = result["threads"] or {"demo": "-", "sd15": "-"}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="tastebud-lora-bench-") as folder:
        if device.type == "cpu":
            torch.set_num_threads(1)  # the demo UNet is tiny: more threads only contend
        result["modes"] = modes_part(Path(folder))
        if not args.modes_only:
            result["demo"] = demo_part(device, Path(folder), n)
            result["demo"]["steps"] = n
        if not args.skip_sd15 and not args.modes_only:
            if device.type == "cpu":
                torch.set_num_threads(args.threads)
            batch = args.sd15_batch or (1 if device.type == "cpu" else ROLLOUT.batch_size)
            full_steps = args.sd15_full_steps or device.type != "cpu"
            result["sd15"] = sd15_part(device, Path(folder), n, batch, full_steps)
            result["sd15"]["steps"] = n
            result["cost"] = default_run(result["sd15"], ROLLOUT)
            half = device.type == "cuda"
            result["gpu"] = gpu_estimate(result["cost"], args.gpu_tflops, args.gpu_util, half)
    load.append(os.getloadavg()[0])
    result["load"] = load
    result["peak_rss"] = peak_rss()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    report(result)
    report_modes(result)


if __name__ == "__main__":
    main()
