"""The taste LoRA: a peft LoRA on the base UNet, trained to please the user's scorer.

A checkpoint is a folder:
    pytorch_lora_weights.safetensors   diffusers format (`pipe.load_lora_weights(folder)`),
                                       with peft's LoraConfig (rank, alpha) in its metadata
    state.json                         step, rank, alpha, the TasteLoraConfig, the evaluation
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from trainer.base import (
    DEMO,
    ENV_BASE_MODEL,
    BaseModel,
    BaseModelNotFound,
    ddim_scheduler,
    load_base,
)
from trainer.callbacks import Progress, StopCheck, never_stop, no_progress
from trainer.conditioning import Conditioning, embed, is_xl, text_encoders
from trainer.configs import FromDict
from trainer.device import half_dtype
from trainer.formats import (
    STATE_NAME,
    WEIGHTS_NAME,
    checkpoint_folders,
    checkpoint_name,
)
from trainer.latents import LatentsFileError, load_latents_file
from trainer.prompts import read_prompts
from trainer.scorer import ScorerFileError, check_family, load_scorer
from trainer.tensorfiles import (
    folder_written_whole,
    optimizer_state,
    optimizer_tensors,
    read_safetensors,
    write_atomic,
)

ADAPTER = "taste"  # the adapter's name on the UNet, and in every pipeline that loads it
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


class LoraFileError(ValueError):
    """A LoRA checkpoint folder is missing, incomplete, or not one this code wrote."""


def lora_config(rank: int, alpha: float, *, dora: bool = False, extra: tuple = ()) -> LoraConfig:
    """The peft config for the UNet's attention projections (plus `extra` module names)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",  # A random, B zero: the adapter starts as the identity
        target_modules=[*ATTENTION, *extra],
        use_dora=dora,
    )


def save_checkpoint(unet: torch.nn.Module, folder: Path, state: dict) -> Path:
    """Write the adapter's weights and `state` (with rank and alpha) to `folder`, atomically."""
    config = unet.peft_config[ADAPTER]
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    state = {**state, "rank": config.r, "alpha": config.lora_alpha}
    folder = Path(folder)
    with folder_written_whole(folder) as temp:
        StableDiffusionPipeline.save_lora_weights(
            temp,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=config.to_dict(),
            weight_name=WEIGHTS_NAME,
        )
        (temp / STATE_NAME).write_text(json.dumps(state, indent=2))
    return folder


def read_state(folder: str | Path) -> dict:
    """Return a checkpoint's state.json, raising LoraFileError when the folder isn't one."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / STATE_NAME).is_file():
        raise LoraFileError(f"{folder} is not a taste LoRA checkpoint (no {WEIGHTS_NAME})")
    try:
        return json.loads((folder / STATE_NAME).read_text())
    except ValueError as error:
        raise LoraFileError(f"{folder / STATE_NAME} is not valid JSON: {error}") from None


def apply_lora(pipeline: StableDiffusionPipeline, folder: str | Path, scale: float = 1.0) -> None:
    """Load a checkpoint into `pipeline` as the "taste" adapter at `scale` (−1 = anti-taste)."""
    read_state(folder)
    if ADAPTER in getattr(pipeline.unet, "peft_config", {}):
        pipeline.unet.delete_adapters(ADAPTER)
    # Into the UNet only: the file has no text-encoder part, so nothing else need look for one.
    pipeline.unet.load_lora_adapter(
        str(folder), weight_name=WEIGHTS_NAME, prefix="unet", adapter_name=ADAPTER
    )
    pipeline.unet.set_adapters([ADAPTER], weights=[scale])


# ---- training -------------------------------------------------------------------------------


class TasteLoraError(ValueError):
    """The inputs to a taste-LoRA run don't fit: a bad scorer, a wrong shape, a bad setting."""


MODES = ("rollout", "one_step", "mixed")  # how a step finds the x_t it takes its gradient at

TARGETS = {  # which UNet modules get an adapter, beyond the attention projections
    "attention": (),
    "attention+ff": ("ff.net.0.proj", "ff.net.2"),
    "attention+ff+conv": ("ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
}


@dataclass(frozen=True)
class TasteLoraConfig(FromDict):
    """How a taste LoRA trains; defaults are for SD 1.x, the web layer fills this from config."""

    rank: int = 8  # enough for a "look"; the file stays a few MB for SD 1.x
    alpha: float = 8.0  # = rank: LoRA scale 1, so the learning rate means the same at any rank
    targets: str = "attention"  # a key of TARGETS; attention is the usual style-LoRA choice
    use_dora: bool = False  # DoRA: magnitude/direction split, a bit slower, sometimes steadier
    mode: str = "one_step"  # one_step: real pool latents noised to a random t, one prediction
    # (a quarter of a rollout step's UNet work; at equal or less compute it matched or beat
    # rollout on the demo world's raters: bench/lora_modes.py); rollout: x_t on the model's
    # own sampling path (DRaFT-K); mixed: both, one_step_share of the steps one-step ones
    one_step_share: float = 0.5  # mixed mode: the share of steps that are one-step steps
    noise_range: tuple[float, float] = (0.0, 0.3)  # one-step: t drawn from this share of the
    # training schedule, as low as rollout's gradient steps: higher, the LoRA learns to push
    # every composition one way and the seeds' variety collapses (bench/lora_modes.py)
    steps: int = 200  # gradient steps; with the evaluations, one-step SD 1.5 is ~9 min of an
    # RTX 4070 and ~3 of a 4090 by FLOP estimate (bench/lora_step.py, README)
    lr: float = 3e-4  # brisk: reward-tuning LoRAs move slowly at the usual 1e-4
    optimizer: str = "adamw"  # adamw | lion | prodigy (prodigy sets its own rate: use lr=1)
    weight_decay: float = 1e-2  # mild pull of the adapter toward zero, i.e. toward the base
    batch_size: int = 2  # prompts per step; the CFG pass doubles it inside the UNet
    sample_steps: int = 15  # DDIM steps of the evaluation's (and rollout mode's) sampling;
    # 15 DDIM steps already give SD 1.5 its composition
    guidance: float = 7.5  # classifier-free guidance, as people will sample with the LoRA
    window: int = 4  # gradient steps start among the last `window` steps: the scorer
    # learnt clean latents, so its judgement of x̂0 is only valid close to t = 0
    grad_steps: int = 1  # K steps with gradient; 1 is far cheaper and as effective (DRaFT-1)
    drift_weight: float = 1.0  # λ·‖ε_LoRA − ε_base‖²: holds the model near the base so it
    # can't game the scorer by collapsing to one look
    prior_weight: float = 0.0  # optional denoising loss on the base model's own images
    prior_images: int = 8  # how many base images that prior loss cycles through
    prior_snr_gamma: float = 5.0  # Min-SNR-γ weighting of that loss (Hang et al. 2023): the
    # nearly clean timesteps, whose loss is tiny but whose weight would swamp the rest, count
    # as if their SNR were γ; 0 = unweighted
    eval_every: int = 50  # steps between held-out evaluations (and checkpoints)
    eval_prompts: int = 4  # held-out prompts per evaluation, from the [eval] section; with
    # one-step training the evaluations cost more than the training itself
    eval_seeds: tuple[int, ...] = (0, 1)  # fixed noise per prompt: the same pictures each time
    keep_checkpoints: int = 3  # the last few checkpoints are kept, plus the best
    patience: int = 3  # evaluations without a better held-out score before stopping
    max_drift: float = 0.3  # relative RMS of ε_LoRA − ε_base; past it the LoRA is "another
    # model", and training stops
    min_diversity: float = 0.5  # a checkpoint whose samples spread less than half as much as
    # the base's has collapsed to one look and is never chosen
    gradient_checkpointing: bool = True  # recompute UNet activations in backward: less memory
    mixed_precision: str = "auto"  # auto: bf16/fp16 autocast on CUDA, fp16 on MPS over fp16
    # weights, fp32 elsewhere; "no": plain fp32 throughout (load the base in float32)
    max_grad_norm: float = 1.0  # clip: one odd batch can't throw the adapter far
    seed: int = 0  # same seed, same prompts and noise → the same LoRA
    prompts_file: str = ""  # a prompt file ([train] and [eval]); "" = the base's own set

    def check(self) -> None:
        """Raise TasteLoraError for settings that can't work together."""
        if self.targets not in TARGETS:
            raise TasteLoraError(f"targets must be one of {sorted(TARGETS)}, not {self.targets!r}")
        if self.mixed_precision not in ("auto", "no"):
            raise TasteLoraError("mixed_precision must be 'auto' or 'no'")
        if self.optimizer not in OPTIMIZERS:
            raise TasteLoraError(f"optimizer must be one of {sorted(OPTIMIZERS)}")
        if not 1 <= self.grad_steps <= self.window <= self.sample_steps:
            raise TasteLoraError("need 1 <= grad_steps <= window <= sample_steps")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise TasteLoraError("steps, eval_every and batch_size must be at least 1")
        if self.mode not in MODES:
            raise TasteLoraError(f"mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.mode == "mixed" and not 0 < self.one_step_share < 1:
            raise TasteLoraError("mixed mode needs 0 < one_step_share < 1")
        low, high = self.noise_range
        if not 0 <= low < high <= 1:
            raise TasteLoraError("noise_range must be (low, high) with 0 <= low < high <= 1")
        if self.prior_snr_gamma < 0:
            raise TasteLoraError("prior_snr_gamma must be 0 (off) or positive")

    @property
    def uses_images(self) -> bool:
        """Whether some steps start from latents of real images (one-step and mixed modes)."""
        return self.mode != "rollout"

    @classmethod
    def from_saved(cls, values: dict) -> TasteLoraConfig:
        """The config a checkpoint's state.json recorded; those older than `mode` were rollout."""
        return cls.from_dict({"mode": "rollout", **values})


def step_kind(config: TasteLoraConfig, step: int) -> str:
    """Which kind of step `step` is: "rollout" or "one_step" (mixed mode interleaves them
    evenly, from the step number alone, so a resumed run takes the same steps)."""
    if config.mode != "mixed":
        return config.mode
    share = config.one_step_share
    return "one_step" if math.floor((step + 1) * share) > math.floor(step * share) else "rollout"


def unet_passes(config: TasteLoraConfig, kind: str | None = None) -> float:
    """UNet forward-equivalents of one training step of `kind` (default: the mean over the
    mode's steps), counting a guided call on the batch as 1, its backward as 2 more and the
    checkpointed recompute as 1 more. The unit of "equal compute" in bench/lora_modes.py."""
    if kind is None:
        shares = {"rollout": 0.0, "one_step": 1.0, "mixed": config.one_step_share}
        share = shares[config.mode]
        return share * unet_passes(config, "one_step") + (1 - share) * unet_passes(
            config, "rollout"
        )
    with_grad = 3 + config.gradient_checkpointing + bool(config.drift_weight)  # + the base's
    prior = (3 + config.gradient_checkpointing) / (2 * config.batch_size)  # 1 row, no CFG
    prior = prior if config.prior_weight else 0.0
    if kind == "one_step":
        return with_grad + prior
    no_grad = config.sample_steps - config.window + (config.window - config.grad_steps) / 2
    return no_grad + config.grad_steps * with_grad + prior


# Measured on the demo world with bench/taste_transfer.py (five synthetic raters, see the
# README): the SD 1.x defaults barely move a 1 M-parameter UNet in 120 CPU steps, so the rate,
# the prompts per step and the gradient steps go up. The drift rein was measured at 0.1 and
# 0.3: at 0.1 the LoRA games a weak scorer (a style-loving rater's true stars fell as the
# scorer's rose) and colour tastes cut variety below 0.8 of the base; 0.3 keeps every rater's
# strengths in order. min_diversity 0.8 never ships a checkpoint that narrowed the seeds'
# variety by more than a fifth.
# One-step steps (the default mode) take the SD 1.x count, 200: 0.38 of the UNet work of the
# 120 rollout steps this preset took before, for as much true gain (bench/lora_modes.py).
# Rollout on the demo world: {"mode": "rollout", "steps": 120, "eval_every": 30}. It is
# evaluated every 25 steps, where evaluations are cheap: a scorer that is easy to please can
# take the seeds' variety past 0.8 of the base's within 50 (a pastel taste with the fitted
# statistics head: 0.88 at step 20, 0.79 at 40, 0.72 at 50), and then nothing would ship.
DEMO_PRESET = {
    "lr": 1e-3,
    "batch_size": 4,
    "grad_steps": 2,
    "drift_weight": 0.3,
    "max_drift": 0.5,
    "min_diversity": 0.8,
    "eval_prompts": 4,
    "eval_every": 25,
}


# An SDXL-family run at the defaults peaks at 7.7 GiB (bench/gpu_memory.py): past an 8 GB card
# once the CUDA context is counted. At batch 1 and 2 evaluation prompts it needs 6.5 GiB.
SMALL_CARD_GIB = 10
SMALL_CARD_PRESET = {"batch_size": 1, "eval_prompts": 2}


def preset_for(base: BaseModel) -> dict:
    """The settings a base needs beyond the SD 1.x defaults; the site and the CLI share them:
    the demo world's, and on a card under SMALL_CARD_GIB an SDXL-family base's smaller batch
    (rather than a first attempt that runs out of memory and a retry)."""
    if base.is_demo:
        return dict(DEMO_PRESET)
    device = base.pipeline.unet.device
    if is_xl(base.pipeline) and device.type == "cuda":
        card = torch.cuda.get_device_properties(device).total_memory / 2**30
        if card < SMALL_CARD_GIB:
            return dict(SMALL_CARD_PRESET)
    return {}


def _adamw(params, config: TasteLoraConfig):
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lion(params, config: TasteLoraConfig):
    from timm.optim import Lion

    return Lion(params, lr=config.lr, weight_decay=config.weight_decay)


def _prodigy(params, config: TasteLoraConfig):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise TasteLoraError("optimizer 'prodigy' needs the prodigyopt package") from None
    return Prodigy(params, lr=config.lr, weight_decay=config.weight_decay)


OPTIMIZERS = {"adamw": _adamw, "lion": _lion, "prodigy": _prodigy}


@dataclass
class _Run:
    """What every step and evaluation needs: the models, the prompts, the fixed eval noise."""

    unet: torch.nn.Module
    scheduler: DDIMScheduler
    scorer: torch.nn.Module
    config: TasteLoraConfig
    train_embeds: Conditioning  # one row per training prompt
    eval_embeds: Conditioning  # one row per (eval prompt, seed)
    uncond: Conditioning  # one row: the empty prompt
    eval_noise: torch.Tensor  # [E, 4, h, w]
    eval_groups: int  # eval prompts; rows are grouped prompt-major, len(eval_seeds) each
    device: torch.device
    half: torch.dtype | None  # autocast dtype on CUDA; None = plain fp32
    images: torch.Tensor | None = None  # [N, 4, h, w] real latents the one-step steps noise
    prior: torch.Tensor | None = None  # base-model clean latents for the prior loss
    prior_embeds: Conditioning | None = None


def _eps(run: _Run, x: torch.Tensor, t: torch.Tensor, embeds: Conditioning) -> torch.Tensor:
    """Classifier-free-guided prediction (noise, or velocity) for a batch of latents at t (one
    timestep, or one per row)."""
    both_embeds = run.uncond.expand(len(x)).cat(embeds)
    t = t.repeat(2) if t.ndim else t
    with torch.autocast(run.device.type, dtype=run.half, enabled=run.half is not None):
        both = run.unet(torch.cat([x, x]), t, **both_embeds.unet_kwargs())
    uncond_eps, cond_eps = both.sample.float().chunk(2)
    return uncond_eps + run.config.guidance * (cond_eps - uncond_eps)


def _eps_and_drift(run: _Run, x: torch.Tensor, t: torch.Tensor, embeds: Conditioning):
    """The LoRA's guided prediction with gradient, ‖ε_LoRA − ε_base‖² and ‖ε_base‖²."""
    eps = _eps(run, x, t, embeds)
    if not run.config.drift_weight:
        zero = torch.zeros((), device=run.device)
        return eps, zero, zero
    with torch.no_grad(), _adapter_off(run.unet):
        base_eps = _eps(run, x, t, embeds)
    return eps, (eps - base_eps).pow(2).mean(), base_eps.pow(2).mean()


@torch.no_grad()
def _rollout(run: _Run, x: torch.Tensor, embeds: Conditioning, steps) -> torch.Tensor:
    """Denoise x through the given schedule steps without gradient."""
    for t in steps:
        x = run.scheduler.step(_eps(run, x, t, embeds), t, x).prev_sample
    return x


def _score(run: _Run, latents: torch.Tensor) -> torch.Tensor:
    return run.scorer(latents.float())


def _train_step(run: _Run, step: int) -> dict:
    """One step of the kind `step_kind` names; return the loss and its terms."""
    g = torch.Generator().manual_seed(run.config.seed * 1_000_003 + step)  # resumable: no RNG state
    prompts = torch.randint(len(run.train_embeds), (run.config.batch_size,), generator=g)
    embeds = run.train_embeds[prompts]
    if step_kind(run.config, step) == "one_step":
        x0, drift, base_norm, count = _one_step(run, embeds, g)
    else:
        x0, drift, base_norm, count = _rollout_step(run, embeds, g)
    score = _score(run, x0).mean()
    loss = -score + run.config.drift_weight * drift / count
    prior = _prior_loss(run, g) if run.prior is not None else torch.zeros(())
    loss = loss + run.config.prior_weight * prior
    # reported as the evaluation measures it: the RMS of the change relative to the base's own
    relative = (drift.detach() / base_norm.clamp_min(1e-12)).sqrt()
    return {"loss": loss, "score": score.detach(), "drift": relative, "prior": prior.detach()}


def _rollout_step(run: _Run, embeds: Conditioning, g: torch.Generator):
    """Roll out from noise without gradient, then K steps with it (DRaFT-K): return x̂0 of
    the last, the summed drift terms and K."""
    config, timesteps = run.config, run.scheduler.timesteps
    x = torch.randn((config.batch_size, *run.eval_noise.shape[1:]), generator=g).to(run.device)
    x = x * run.scheduler.init_noise_sigma
    n = len(timesteps)
    start = (
        n
        - config.window
        + int(torch.randint(config.window - config.grad_steps + 1, (1,), generator=g))
    )
    x = _rollout(run, x, embeds, timesteps[:start])
    drift = base_norm = torch.zeros((), device=run.device)
    for t in timesteps[start : start + config.grad_steps]:
        eps, step_drift, step_norm = _eps_and_drift(run, x, t, embeds)
        drift, base_norm = drift + step_drift, base_norm + step_norm
        out = run.scheduler.step(eps, t, x)
        x, x0 = out.prev_sample, out.pred_original_sample
    return x0, drift, base_norm, config.grad_steps


def _one_step(run: _Run, embeds: Conditioning, g: torch.Generator):
    """Noise real latents to a random t in noise_range, predict once with gradient: return
    x̂0 rebuilt from that prediction, the drift terms and 1. The LoRA learns to denoise the
    pool's pictures toward what the scorer likes; prompts are the training set's, at random
    (pool pictures have no captions), under the same guidance as sampling."""
    config = run.config
    rows = torch.randint(len(run.images), (config.batch_size,), generator=g)
    x0 = run.images[rows]
    t = _one_step_timesteps(run.scheduler, config.noise_range, config.batch_size, g)
    noise = torch.randn(x0.shape, generator=g)
    t, noise = t.to(run.device), noise.to(run.device)
    x = run.scheduler.add_noise(x0, noise, t)
    eps, drift, base_norm = _eps_and_drift(run, x, t, embeds)
    return predicted_x0(run.scheduler, x, eps, t), drift, base_norm, 1


def _one_step_timesteps(scheduler, noise_range, rows: int, g: torch.Generator) -> torch.Tensor:
    """One training timestep per row, uniform over `noise_range` of the schedule (at least 1)."""
    total = scheduler.config.num_train_timesteps
    low = max(1, round(noise_range[0] * total))
    high = max(low + 1, round(noise_range[1] * total))
    return torch.randint(low, high, (rows,), generator=g)


def predicted_x0(scheduler, x: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor):
    """x̂0 rebuilt from the UNet's prediction at x_t, as the scheduler's config says the model
    predicts: noise (SD 1.x, SDXL), velocity (SD 2.x 768, v-prediction finetunes) or x0."""
    alpha = scheduler.alphas_cumprod.to(x.device)[t].view(-1, *[1] * (x.ndim - 1))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * prediction
    if kind == "sample":
        return prediction
    raise TasteLoraError(f"no x̂0 for prediction type {kind!r}")


def _prior_loss(run: _Run, g: torch.Generator) -> torch.Tensor:
    """Denoising loss on an image the base model made, Min-SNR weighted: keeps what the base
    could do."""
    k = int(torch.randint(len(run.prior), (1,), generator=g))
    x0, embeds = run.prior[k : k + 1], run.prior_embeds[k : k + 1]
    t = torch.randint(run.scheduler.config.num_train_timesteps, (1,), generator=g).to(run.device)
    noise = torch.randn(x0.shape, generator=g).to(run.device)
    with torch.autocast(run.device.type, dtype=run.half, enabled=run.half is not None):
        pred = run.unet(run.scheduler.add_noise(x0, noise, t), t, **embeds.unet_kwargs())
    target = denoising_target(run.scheduler, x0, noise, t)
    per_row = (pred.sample.float() - target).pow(2).flatten(1).mean(1)
    return (min_snr_weights(run.scheduler, t, run.config.prior_snr_gamma) * per_row).mean()


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights per timestep (Hang et al. 2023): min(SNR, γ)/SNR for a noise
    prediction, min(SNR, γ)/(SNR + 1) for a velocity one, min(SNR, γ) for an x0 one; ones
    when γ is 0 (off)."""
    if not gamma:
        return torch.ones(t.shape, device=t.device)
    snr = compute_snr(scheduler, t).to(t.device)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "sample":
        return clipped
    return clipped / snr


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """What the UNet is trained to predict for x0 noised with `noise` at t: the noise itself,
    or the velocity for a v-prediction model (SD 2.x 768, v-prediction SDXL finetunes)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


@contextlib.contextmanager
def _adapter_off(unet: torch.nn.Module):
    """Run the UNet as the base model: the same weights with the adapter disabled."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def _strength(unet: torch.nn.Module, scale: float):
    """Run the UNet with the adapter at `scale` (0.5 = half, −1 = anti-taste)."""
    unet.set_adapters([ADAPTER], weights=[scale])
    try:
        yield
    finally:
        unet.set_adapters([ADAPTER], weights=[1.0])


def _spread(latents: torch.Tensor, groups: int) -> float:
    """Mean pairwise distance between the samples of each prompt: how varied the seeds stay."""
    per_prompt = latents.flatten(1).view(groups, -1, latents[0].numel())
    return float(torch.cdist(per_prompt, per_prompt).mean())


@torch.no_grad()
def _sample_eval(run: _Run) -> torch.Tensor:
    x = run.eval_noise * run.scheduler.init_noise_sigma
    return _rollout(run, x, run.eval_embeds, run.scheduler.timesteps)


@torch.no_grad()
def _sample_with_drift(run: _Run) -> tuple[torch.Tensor, float]:
    """The LoRA's eval samples, and the relative RMS of ε_LoRA − ε_base along their rollout."""
    x = run.eval_noise * run.scheduler.init_noise_sigma
    diff, norm = 0.0, 0.0
    for t in run.scheduler.timesteps:
        eps = _eps(run, x, t, run.eval_embeds)
        with _adapter_off(run.unet):
            base_eps = _eps(run, x, t, run.eval_embeds)
        diff += float((eps - base_eps).pow(2).mean())
        norm += float(base_eps.pow(2).mean())
        x = run.scheduler.step(eps, t, x).prev_sample
    return x, math.sqrt(diff / max(norm, 1e-12))


@torch.no_grad()
def _base_figures(run: _Run) -> dict:
    with _adapter_off(run.unet):
        latents = _sample_eval(run)
    return {
        "score": float(_score(run, latents).mean()),
        "spread": _spread(latents, run.eval_groups),
    }


@torch.no_grad()
def _evaluate(run: _Run, step: int, base: dict) -> dict:
    """Held-out prompts × fixed seeds: mean score at strengths 1, 0.5 and −1, drift, diversity."""
    run.unet.eval()
    latents, drift = _sample_with_drift(run)  # strength 1: the drift pass draws its samples too
    scores = {"1": round(float(_score(run, latents).mean()), 4)}
    diversity = _spread(latents, run.eval_groups) / max(base["spread"], 1e-12)
    for scale in (0.5, -1.0):
        with _strength(run.unet, scale):
            scores[f"{scale:g}"] = round(float(_score(run, _sample_eval(run)).mean()), 4)
    run.unet.train()
    return {
        "step": step,
        "score": scores["1"],
        "scores_by_strength": scores,
        "gain": round(scores["1"] - base["score"], 4),
        "drift": round(drift, 4),
        "diversity": round(diversity, 4),
        "recommended_strength": recommended_strength(scores, base["score"]),
    }


SCORE_RESOLUTION = 1e-3  # held-out scores are kept to 4 decimals; closer than this is a tie


def recommended_strength(scores: dict[str, float], base_score: float) -> float | None:
    """The strength to use this LoRA at, read from its held-out scores at 0 (the base), 0.5
    and 1. A curve still rising from 0.5 to 1 says 1 (the evaluation never looks beyond it):
    a scorer's scores bend as they near the top of the star scale, so a parabola through a
    rising curve would put its top below 1 where the taste itself still grows. A curve that
    stops rising, or falls, past 0.5 says the top of the parabola through the three points,
    between 0.25 and 1, to the nearest 0.05: past it a stronger LoRA only scores lower
    (overdone). None when no strength beats the base."""
    half, full = scores["0.5"], scores["1"]
    if max(half, full) - base_score < SCORE_RESOLUTION:  # an untrained adapter ties the base
        return None
    if full - half >= SCORE_RESOLUTION:
        return 1.0
    curvature = 2 * (full - 2 * half + base_score)  # f(s) = base + slope·s + curvature·s²
    slope = full - base_score - curvature
    top = -slope / (2 * curvature) if curvature < 0 else 1.0
    return round(round(min(max(top, 0.25), 1.0) * 20) / 20, 2)


def _choose(history: list[dict], config: TasteLoraConfig) -> tuple[dict, str]:
    """Pick the checkpoint to ship: the best held-out score that hasn't drifted or collapsed."""
    sound = [
        e
        for e in history
        if e["drift"] <= config.max_drift and e["diversity"] >= config.min_diversity
    ]
    if not sound:
        least = min(history, key=lambda e: e["drift"])
        return least, "every checkpoint drifted or collapsed; chose the least drifted"
    best = max(sound, key=lambda e: (e["score"], -e["step"]))
    if best["gain"] <= 0:
        return best, "no checkpoint beat the base model on held-out prompts"
    return best, (
        f"highest held-out score ({best['score']:.3f}, +{best['gain']:.3f} over the base) with"
        f" drift {best['drift']:.3f} <= {config.max_drift} and diversity"
        f" {best['diversity']:.2f} >= {config.min_diversity}"
    )


def _stop_reason(history: list[dict], config: TasteLoraConfig) -> str | None:
    """Why training should stop now, or None: drift past the cap, or no progress for a while."""
    last = history[-1]
    if last["drift"] > config.max_drift:
        return f"drift {last['drift']:.3f} passed the cap {config.max_drift}"
    best_at = max(range(len(history)), key=lambda i: (history[i]["score"], -i))
    if len(history) - 1 - best_at >= config.patience:
        return f"held-out score has not risen for {config.patience} evaluations"
    return None


# ---- checkpoints with optimiser state -------------------------------------------------------

OPTIMIZER_NAME = "optimizer.safetensors"


def _save(run: _Run, optimizer, out_dir: Path, step: int, history: list[dict]) -> Path:
    """Write checkpoint-<step> (weights, state, optimiser) and prune all but the last and best."""
    tensors = optimizer_tensors(optimizer)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    folder = out_dir / checkpoint_name(step)
    extra = {
        "step": step,
        "config": asdict(run.config),
        "history": history,
        "evaluation": history[-1] if history and history[-1]["step"] == step else None,
        "optimizer_groups": groups,
    }
    save_checkpoint(run.unet, folder, extra)
    write_atomic(folder / OPTIMIZER_NAME, tensors, {"format": "tastebud.optimizer"})
    _prune(out_dir, run.config, history)
    return folder


def _prune(out_dir: Path, config: TasteLoraConfig, history: list[dict]) -> None:
    folders = checkpoint_folders(out_dir)
    keep = set(folders[-config.keep_checkpoints :])
    if history:
        best, _ = _choose(history, config)
        keep.add(out_dir / checkpoint_name(best["step"]))
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def _restore(run: _Run, optimizer, folder: Path) -> dict:
    """Load a checkpoint's adapter weights and optimiser state; return its state.json."""
    state = read_state(folder)
    weights = load_file(str(folder / WEIGHTS_NAME))
    weights = {k.removeprefix("unet."): v for k, v in weights.items()}
    set_peft_model_state_dict(
        run.unet, convert_unet_state_dict_to_peft(weights), adapter_name=ADAPTER
    )
    saved, _ = read_safetensors(folder / OPTIMIZER_NAME, LoraFileError, what="optimizer state")
    if saved:
        current = optimizer.state_dict()
        # load_state_dict moves each tensor to its parameter's device, and leaves Adam's step
        # counters on the CPU where they belong (on CUDA, each would sync every step)
        by_index = optimizer_state(saved)
        groups = [
            {**g, "params": c["params"]}
            for g, c in zip(state["optimizer_groups"], current["param_groups"], strict=True)
        ]
        optimizer.load_state_dict({"state": by_index, "param_groups": groups})
    return state


# ---- the loop -------------------------------------------------------------------------------


def train(
    base: BaseModel,
    scorer_path: str | Path,
    out_dir: str | Path,
    config: TasteLoraConfig | None = None,
    *,
    images: torch.Tensor | None = None,
    resume: bool = False,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> dict:
    """Train the taste LoRA on `base` to raise `scorer`'s score; return a JSON-ready summary.

    `images`: latents of real pictures [N, 4, h, w], scaled as the UNet sees them (the pool's,
    rated or not), which the one-step and mixed modes noise and denoise; rollout needs none.
    Checkpoints go to out_dir/checkpoint-<step>/ at every evaluation and on a stop; with
    `resume`, training continues from the newest one. The summary names the checkpoint chosen
    (best held-out score among those that neither drifted past the cap nor collapsed) and why.
    """
    config = config or TasteLoraConfig()
    config.check()
    started, out_dir = time.perf_counter(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    first = 0
    if base.pipeline.device.type == "cuda":  # this run's peak, not the worker's lifetime's
        torch.cuda.reset_peak_memory_stats(base.pipeline.device)
    try:
        run = _prepare(base, scorer_path, config, images)
        trainable = [p for p in run.unet.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS[config.optimizer](trainable, config)
        # fp16 gradients underflow without loss scaling (CUDA and MPS alike)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.half == torch.float16)
        if resume and checkpoint_folders(out_dir):
            state = _restore(run, optimizer, checkpoint_folders(out_dir)[-1])
            _check_same_mode(state, config)
            first, history = state["step"], state["history"]
            progress(first, config.steps, f"resumed from step {first}")
        progress(first, config.steps, "sampling the base model on held-out prompts")
        base_figures = _base_figures(run)
        if not history:
            history.append(_evaluate(run, 0, base_figures))
            _save(run, optimizer, out_dir, 0, history)
        # the counting starts here: a job's pace (its ETA) leaves the setup above out
        progress(first, config.steps, f"training: step {first + 1} of {config.steps}")
        step, stopped, reason = first, False, None
        while step < config.steps and reason is None:
            if should_stop():
                stopped = True
                break
            run.unet.train()
            terms = _train_step(run, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            # float(): a CPU–GPU sync point, once per step, next to a whole rollout
            progress(
                step,
                config.steps,
                f"step {step}: score {float(terms['score']):.3f},"
                f" drift {float(terms['drift']):.3f}",
            )
            if step % config.eval_every == 0 or step == config.steps:
                progress(step, config.steps, f"step {step}: evaluating on held-out prompts")
                history.append(_evaluate(run, step, base_figures))
                _save(run, optimizer, out_dir, step, history)
                reason = _stop_reason(history, config)
        if stopped and history[-1]["step"] != step:
            _save(run, optimizer, out_dir, step, history)  # a stop loses no finished step
    finally:
        _release(base)
    chosen, why = _choose(history, config)
    summary = {
        "base_score": round(base_figures["score"], 4),
        "lora_score": chosen["score"],
        "score_gain": chosen["gain"],
        "scores_by_strength": chosen["scores_by_strength"],
        "recommended_strength": chosen.get("recommended_strength"),
        "mode": config.mode,
        "unet_passes": round(step * unet_passes(config), 1),
        "drift": chosen["drift"],
        "diversity": chosen["diversity"],
        "steps": step,
        "chosen_step": chosen["step"],
        "chosen_checkpoint": str(out_dir / checkpoint_name(chosen["step"])),
        "reason": why,
        "stopped_because": "asked to stop"
        if stopped
        else reason or f"ran all {config.steps} steps",
        "stopped": stopped,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_memory_mb": _peak_memory_mb(run.device),
        "device": str(run.device),
        "history": history,
        "config": asdict(config),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_same_mode(state: dict, config: TasteLoraConfig) -> None:
    """Refuse to resume a run in another mode than it trained in (its steps would not repeat)."""
    saved = TasteLoraConfig.from_saved(state.get("config") or {})
    if saved.mode != config.mode:
        raise TasteLoraError(
            f"the checkpoint trained in mode {saved.mode!r}; resume it with mode {saved.mode!r}"
            f" (not {config.mode!r}), or train afresh"
        )


def _real_latents(images: torch.Tensor | None, config: TasteLoraConfig, shape: list[int]):
    """The real latents the one-step steps need, checked against the base's latent shape."""
    if not config.uses_images:
        return None
    if images is None or len(images) == 0:
        raise TasteLoraError(
            f"mode {config.mode!r} needs latents of real pictures (the pool's): pass images=,"
            " or --latents FILE on the command line"
        )
    if list(images.shape[1:]) != shape:
        raise TasteLoraError(
            f"the real latents have shape {list(images.shape[1:])}, but the base makes {shape};"
            " encode the pictures with this base model's VAE"
        )
    return images.float()


def _prepare(
    base: BaseModel,
    scorer_path: str | Path,
    config: TasteLoraConfig,
    images: torch.Tensor | None = None,
) -> _Run:
    """Load the scorer, cache prompt embeddings, fix the eval noise, add a fresh adapter."""
    pipe, device = base.pipeline, base.pipeline.unet.device
    side = base.resolution // pipe.vae_scale_factor
    shape = [pipe.unet.config.in_channels, side, side]
    images = _real_latents(images, config, shape)
    scorer, metadata = load_scorer(scorer_path)
    try:
        check_family(metadata, base.family, f"the scorer {scorer_path}")
    except ScorerFileError as error:
        raise TasteLoraError(str(error)) from None
    if json.loads(metadata.get("input_shape", "null")) != shape:
        raise TasteLoraError(
            f"the scorer was trained on latents of shape {metadata.get('input_shape')}, but"
            f" {base.name} makes {shape}; train a scorer on this base model's latents"
        )
    half = _half(device, config, pipe.unet.dtype)  # before the LoRA's fp32 parameters join
    if half is None and pipe.unet.dtype != torch.float32:
        raise TasteLoraError(  # without autocast, fp32 latents can't meet half-precision weights
            f"without autocast (mixed_precision {config.mixed_precision!r} on {device.type})"
            f" training runs in fp32, but the base model is {pipe.unet.dtype}; load it with"
            " dtype=torch.float32"
        )
    scorer.to(device).requires_grad_(False)
    prompts_file = config.prompts_file or base.prompts_file
    train_prompts = read_prompts("train", prompts_file)
    eval_prompts = read_prompts("eval", prompts_file)[: config.eval_prompts]
    seeds = config.eval_seeds
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )

    unet = pipe.unet
    unet.requires_grad_(False)
    if ADAPTER in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER)
    with torch.random.fork_rng(devices=[]):  # same seed, same initial adapter
        torch.manual_seed(config.seed)
        unet.add_adapter(
            lora_config(
                config.rank, config.alpha, dora=config.use_dora, extra=TARGETS[config.targets]
            ),
            adapter_name=ADAPTER,
        )
    if unet.dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # fp16 weights can't take small updates
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scheduler = ddim_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(config.sample_steps, device=device)
    run = _Run(
        unet=unet,
        scheduler=scheduler,
        scorer=scorer,
        config=config,
        train_embeds=embed(pipe, train_prompts, base.resolution),
        eval_embeds=embed(pipe, eval_prompts, base.resolution).repeat_interleave(len(seeds)),
        uncond=embed(pipe, [""], base.resolution),
        eval_noise=noise.repeat(len(eval_prompts), 1, 1, 1).to(device),
        eval_groups=len(eval_prompts),
        device=device,
        half=half,
        images=images.to(device) if images is not None else None,
    )
    if device.type == "cuda":  # text encoders and VAE aren't needed while training
        for module in (*text_encoders(pipe), pipe.vae):
            module.to("cpu")
    if config.prior_weight:
        _add_prior(run, train_prompts)
    return run


@torch.no_grad()
def _add_prior(run: _Run, prompts: list[str]) -> None:
    g = torch.Generator().manual_seed(run.config.seed + 7)
    rows = torch.randperm(len(prompts), generator=g)[: run.config.prior_images]
    embeds = run.train_embeds[rows]
    x = torch.randn((len(rows), *run.eval_noise.shape[1:]), generator=g).to(run.device)
    with _adapter_off(run.unet):
        run.prior = _rollout(
            run, x * run.scheduler.init_noise_sigma, embeds, run.scheduler.timesteps
        )
    run.prior_embeds = embeds


def _half(
    device: torch.device, config: TasteLoraConfig, weights: torch.dtype
) -> torch.dtype | None:
    """The autocast dtype: on CUDA the UNet's own when its weights are half precision (else
    every conv and linear would recast them, uncached and less precise), bf16 where the card
    computes it natively, else fp16; on Apple MPS fp16 when the base was loaded in fp16
    (precision "half"). None (fp32) on CPU, on MPS in fp32, or with mixed_precision "no"."""
    if config.mixed_precision == "no":
        return None
    if device.type == "cuda":
        return weights if weights in (torch.float16, torch.bfloat16) else half_dtype(device)
    if device.type == "mps" and weights == torch.float16:
        return torch.float16
    return None


def _release(base: BaseModel) -> None:
    """Hand the pipeline back as it came: no adapter, no checkpointing, all on one device."""
    unet = base.pipeline.unet
    if unet.is_gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    if ADAPTER in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER)
    for module in (*text_encoders(base.pipeline), base.pipeline.vae):
        module.to(unet.device)
    unet.eval()


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# ---- command line ---------------------------------------------------------------------------


def real_latents(paths: list[str | Path]) -> torch.Tensor | None:
    """The latents of every picture in the given latents files, with their mirrored copies."""
    parts = []
    for path in paths:
        found = load_latents_file(path)
        parts += [found.latents] if found.flipped is None else [found.latents, found.flipped]
    return torch.cat(parts) if parts else None


def main(argv: list[str] | None = None) -> None:
    """Train a taste LoRA: `python -m trainer.lora train --base demo --scorer S --out DIR`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.lora")
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="train a taste LoRA against a scorer")
    tr.add_argument("--base", default=os.environ.get(ENV_BASE_MODEL, DEMO))
    tr.add_argument("--scorer", required=True, help="a scorer .safetensors (trainer.scorer)")
    tr.add_argument("--out", required=True, help="folder for checkpoints and summary.json")
    tr.add_argument("--steps", type=int, help="gradient steps (default: the base's preset)")
    tr.add_argument("--rank", type=int, default=TasteLoraConfig.rank)
    tr.add_argument("--prompts", help="prompt file with [train] and [eval] (default: the base's)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    tr.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    tr.add_argument("--config", help="JSON object of further TasteLoraConfig settings")
    tr.add_argument(
        "--latents",
        action="append",
        default=[],
        help="a latents file (trainer.latents export) of real pictures for the one-step and"
        " mixed modes, mirrored rows included; repeat for more",
    )
    args = parser.parse_args(argv)
    try:
        settings = json.loads(args.config) if args.config else {}
        flags = {"steps": args.steps, "rank": args.rank, "prompts_file": args.prompts}
        settings.update({k: v for k, v in flags.items() if v is not None})
        settings.setdefault("alpha", float(args.rank))
        TasteLoraConfig.from_dict(settings).check()  # a bad setting fails before the load
        base = load_base(args.base, device=args.device)
        config = TasteLoraConfig.from_dict({**preset_for(base), **settings})
        images = real_latents(args.latents) if config.uses_images else None
        summary = train(base, args.scorer, args.out, config, images=images, resume=args.resume)
    except (
        BaseModelNotFound,
        LatentsFileError,
        ScorerFileError,
        TasteLoraError,
        LoraFileError,
        TypeError,
        ValueError,
    ) as error:
        parser.exit(2, f"error: {error}\n")
    summary.pop("history")
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
