"""The demo world: a tiny SD 1.x-structured model trained here on the demo pack's pictures.

`python -m trainer.demo_world train` renders demo-pack pictures at the world's resolution,
describes each one from what the generator drew ("a pastel mandala"), trains the VAE, then
the UNet and CLIP text encoder together, and writes one safetensors file: the weights in
fp16 plus, in its metadata, the config, data sizes, steps, wall time and quality figures.
`load_base("demo")` builds the pipeline from that file — no training, no network.

Both phases checkpoint every few hundred steps and `--resume` continues where a stopped run
left off; the same seed and thread count give the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image

from trainer.base import DemoConfig, build_demo_pipeline
from trainer.callbacks import Progress, no_progress
from trainer.conditioning import clip_hidden
from trainer.configs import FromDict
from trainer.demo_art import DEMO_MOODS, DEMO_STYLES, render_demo_picture
from trainer.latents import fit_image
from trainer.tensorfiles import (
    optimizer_state,
    optimizer_tensors,
    read_safetensors,
    write_atomic,
)

WEIGHTS = Path(__file__).with_name("demo_world.safetensors")
FORMAT = "tastebud.demo_world"

# The words a prompt uses for each style and mood: plain English for what the generator drew.
STYLE_WORDS = {s: s for s in DEMO_STYLES} | {"colorfield": "color field"}

MOOD_WORDS = {
    "analogous": "harmonious",
    "complementary": "complementary",
    "triadic": "triadic",
    "mono": "monochrome",
    "pastel": "pastel",
    "garish": "garish",
    "muddy": "muddy",
}
GRAINY = 0.05  # grain amplitude from which a picture is called "grainy"


class DemoWorldError(ValueError):
    """The demo world's weights are missing or not a demo-world file."""


@dataclass(frozen=True)
class WorldConfig(FromDict):
    """How the demo world is built and trained; saved in the weights' metadata."""

    image_size: int = 32  # pixels; 4×8×8 latents through a 4× VAE (3 levels)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three levels → 4× down; wider was 3× slower
    unet_channels: tuple[int, ...] = (32, 64)  # 8×8 and 4×4 latents; ≈ 1 M parameters
    unet_attention: tuple[bool, ...] = (True, True)  # text steers both levels
    text_width: int = 64  # CLIP width = the UNet's cross-attention width
    max_tokens: int = 48  # character tokens; the longest world prompt needs 36
    train_images: int = 16000  # renders the models learn from (renderer seed `data_seed`)
    heldout_images: int = 256  # renders for held-out figures (the pack's own seed 0)
    data_seed: int = 7  # a renderer seed other than the pack's, so the pack stays held out
    vae_steps: int = 5000
    vae_batch: int = 64
    vae_lr: float = 2e-3  # a tiny VAE tolerates a high rate; cosine-decayed to 5 %
    kl_weight: float = 1e-6  # per-sample KL sum, as SD's VAE: keeps the latent space smooth
    unet_steps: int = 8000
    unet_batch: int = 96
    unet_lr: float = 1e-3
    text_lr: float = 3e-4  # the text encoder learns the prompt words more gently
    min_snr_gamma: float = 5.0  # Min-SNR weighting: faster, steadier diffusion training
    uncond_fraction: float = 0.1  # empty prompts, so classifier-free guidance works
    ema_decay: float = 0.999  # samples come from the EMA weights
    checkpoint_every: int = 500
    seed: int = 0

    def demo_config(self, scaling_factor: float = 1.0) -> DemoConfig:
        """The pipeline architecture these settings describe."""
        return DemoConfig(
            latent_size=self.image_size // 2 ** (len(self.vae_channels) - 1),
            unet_channels=self.unet_channels,
            unet_attention=self.unet_attention,
            vae_channels=self.vae_channels,
            vae_groups=min(32, *self.vae_channels),
            text_width=self.text_width,
            max_tokens=self.max_tokens,
            vae_scaling_factor=scaling_factor,
        )


# ---- prompts --------------------------------------------------------------------------------


def with_article(words: str) -> str:
    """Put "a" or "an" before a phrase: "an orb", "a pastel orb"."""
    return ("an " if words[:1] in "aeiou" else "a ") + words


def describe(style: str, mood: str, grain: float = 0.0) -> str:
    """The full prompt for a picture: "a grainy pastel mandala"."""
    grainy = ["grainy"] if grain >= GRAINY else []
    return with_article(" ".join([*grainy, MOOD_WORDS[mood], STYLE_WORDS[style]]))


def training_prompt(style: str, mood: str, grain: float, rng: np.random.Generator) -> str:
    """A prompt drawn for one training example: the full description, style only or mood only."""
    draw = rng.random()
    if draw < 0.55:
        return describe(style, mood, grain)
    if draw < 0.8:
        return with_article(STYLE_WORDS[style])
    return with_article(f"{MOOD_WORDS[mood]} picture")


# ---- data -----------------------------------------------------------------------------------


def fit_picture(image: Image.Image, size: int) -> np.ndarray:
    """A picture as the site's encoder crops and resizes it; uint8 [size, size, 3]."""
    return np.asarray(fit_image(image, size))


@dataclass
class WorldData:
    """Rendered pictures (uint8 N×S×S×3) with the style, mood and grain of each."""

    pixels: np.ndarray
    styles: np.ndarray  # index into DEMO_STYLES
    moods: np.ndarray  # index into DEMO_MOODS
    grain: np.ndarray

    def prompts(self, rows: np.ndarray, rng: np.random.Generator, uncond: float) -> list[str]:
        """Training prompts for the given rows, an `uncond` share of them empty."""
        out = []
        for row in rows:
            facts = DEMO_STYLES[self.styles[row]], DEMO_MOODS[self.moods[row]], self.grain[row]
            out.append("" if rng.random() < uncond else training_prompt(*facts, rng))
        return out


def render_world_data(count: int, seed: int, size: int, progress: Progress = no_progress):
    """Render `count` demo-pack pictures of renderer seed `seed` at `size` pixels."""
    pixels = np.zeros((count, size, size, 3), np.uint8)
    styles, moods, grain = np.zeros(count, np.int64), np.zeros(count, np.int64), np.zeros(count)
    for index in range(count):
        picture = render_demo_picture(index, seed=seed)
        pixels[index] = fit_picture(picture.image, size)
        styles[index] = DEMO_STYLES.index(picture.style)
        moods[index] = DEMO_MOODS.index(picture.mood)
        grain[index] = picture.grain
        if index % 500 == 499 or index == count - 1:
            progress(index + 1, count, f"rendered {index + 1} of {count} pictures")
    return WorldData(pixels, styles, moods, grain)


def _cached_data(work: Path, name: str, count: int, seed: int, size: int, progress) -> WorldData:
    path = work / f"{name}-{count}-s{seed}-{size}px.npz"
    if path.is_file():
        saved = np.load(path)
        return WorldData(saved["pixels"], saved["styles"], saved["moods"], saved["grain"])
    data = render_world_data(count, seed, size, progress)
    temp = path.with_suffix(".tmp.npz")
    np.savez(temp, **asdict(data))
    os.replace(temp, path)
    return data


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    """uint8 [N,S,S,3] → float [N,3,S,S] in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two [-1, 1] image batches, in dB."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return 10 * math.log10(1 / max(mse, 1e-10))


# ---- checkpoints ----------------------------------------------------------------------------


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, named without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class Phase:
    """One training phase's modules, optimiser, EMA copy and random stream."""

    name: str
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    log: list[dict] = field(default_factory=list)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, named "<module>.<param>"."""
        return {
            f"{m}.{k}": v for m, mod in self.modules.items() for k, v in mod.state_dict().items()
        }

    def load_modules(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load "<module>.<param>" tensors (as `parameters` names them) into the modules."""
        for name, module in self.modules.items():
            module.load_state_dict(_part(tensors, f"{name}."))

    def update_ema(self, decay: float) -> None:
        """Move the EMA copy towards the current weights (bias-corrected early on)."""
        decay = min(decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, value in self.parameters().items():
                if name not in self.ema:
                    self.ema[name] = value.detach().clone().float()
                elif value.is_floating_point():
                    self.ema[name].lerp_(value.float(), 1 - decay)
                else:
                    self.ema[name].copy_(value)

    def take_step(self, loss, total: int, config: WorldConfig, work: Path, progress) -> None:
        """Backpropagate `loss` and step (lr schedule, clipping, EMA), then log and checkpoint."""
        _set_lr(self.optimizer, self.step, total)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.step += 1
        self.update_ema(config.ema_decay)
        value = float(loss.detach())
        if self.step % 50 == 0:
            self.log.append({"step": self.step, "loss": round(value, 5)})
        progress(self.step, total, f"{self.name} loss {value:.4f}")
        if self.step % config.checkpoint_every == 0 or self.step == total:
            self.save(work)

    def save(self, work: Path) -> None:
        """Write the phase's checkpoint: weights, EMA, optimiser state, RNG, step and log."""
        tensors = {f"model.{k}": v for k, v in self.parameters().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.items()}
        tensors |= optimizer_tensors(self.optimizer, prefix="optim.")
        tensors["rng"] = self.generator.get_state()
        meta = {"step": str(self.step), "log": json.dumps(self.log)}
        write_atomic(work / f"{self.name}-checkpoint.safetensors", tensors, meta)

    def restore(self, work: Path) -> bool:
        """Load the phase's checkpoint if there is one; return whether there was."""
        path = work / f"{self.name}-checkpoint.safetensors"
        if not path.is_file():
            return False
        tensors, meta = read_safetensors(path, DemoWorldError, what="checkpoint")
        self.load_modules(_part(tensors, "model."))
        self.ema = _part(tensors, "ema.")
        state = optimizer_state(tensors, prefix="optim.")
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.generator.set_state(tensors["rng"])
        self.step, self.log = int(meta["step"]), json.loads(meta["log"])
        return True


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _set_lr(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = _lr(step, total, group["initial_lr"])


# ---- the two phases -------------------------------------------------------------------------


def train_vae(pipe, data: WorldData, held: WorldData, config: WorldConfig, work: Path, progress):
    """Train the VAE on the pictures: L1 + MSE reconstruction, a whisper of KL."""
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.vae_lr
    phase = Phase("vae", {"vae": vae}, optimizer, torch.Generator().manual_seed(config.seed))
    phase.restore(work)
    while phase.step < config.vae_steps:
        rows = torch.randint(len(data.pixels), (config.vae_batch,), generator=phase.generator)
        x = to_pixels(data.pixels[rows.numpy()])
        flip = torch.rand(len(x), generator=phase.generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=phase.generator
        )
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = loss + config.kl_weight * posterior.kl().mean()
        phase.take_step(loss, config.vae_steps, config, work, progress)
    phase.load_modules(phase.ema)
    return vae.eval(), {"vae_psnr_heldout": vae_psnr(vae, held), "vae_steps": phase.step}


@torch.no_grad()
def vae_psnr(vae, data: WorldData) -> float:
    """Reconstruction PSNR (dB) of the posterior mean on `data`'s pictures."""
    x = to_pixels(data.pixels)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(128)])
    return round(psnr(rec, x), 2)


@torch.no_grad()
def encode_world(vae, data: WorldData) -> torch.Tensor:
    """Unscaled posterior means of the pictures and of their mirror images: [2N, 4, h, w]."""
    x = to_pixels(data.pixels)
    out = [vae.encode(c).latent_dist.mean for c in torch.cat([x, x.flip(-1)]).split(256)]
    return torch.cat(out)


def train_unet(pipe, latents, data: WorldData, config: WorldConfig, work: Path, progress):
    """Train the UNet and text encoder: ε-prediction on SD's schedule, Min-SNR weighted."""
    unet, text = pipe.unet.train(), pipe.text_encoder.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": config.unet_lr},
            {"params": list(text.parameters()), "lr": config.text_lr},
        ],
        weight_decay=0.01,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    modules = {"unet": unet, "text_encoder": text}
    phase = Phase("unet", modules, optimizer, torch.Generator().manual_seed(config.seed + 1))
    phase.restore(work)
    alphas = pipe.scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weight = snr.clamp(max=config.min_snr_gamma) / snr  # Min-SNR-γ for ε-prediction
    count = len(data.pixels)
    while phase.step < config.unet_steps:
        g = phase.generator
        rows = torch.randint(len(latents), (config.unet_batch,), generator=g)
        x0 = latents[rows]
        prompt_rng = np.random.default_rng([config.seed, phase.step])
        prompts = data.prompts((rows % count).numpy(), prompt_rng, config.uncond_fraction)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(len(alphas), (len(x0),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, encoder_hidden_states=clip_hidden(pipe, prompts)).sample
        loss = (weight[t] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        phase.take_step(loss, config.unet_steps, config, work, progress)
    phase.load_modules(phase.ema)
    unet.eval(), text.eval()
    return {"unet_steps": phase.step, "unet_loss_log": phase.log[-10:]}


# ---- saving and loading ---------------------------------------------------------------------


def save_world(pipe: StableDiffusionPipeline, config: WorldConfig, record: dict, path: Path):
    """Write the world's weights (fp16) with its config and training record as metadata."""
    tensors = {}
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.half() if value.is_floating_point() else value
    meta = {
        "format": FORMAT,
        "config": json.dumps(asdict(config)),
        "scaling_factor": repr(pipe.vae.config.scaling_factor),
        "record": json.dumps(record),
    }
    write_atomic(path, tensors, meta)


def read_record(path: str | Path = WEIGHTS) -> dict:
    """The world's config, scaling factor and training record, from the weights' metadata."""
    _, meta = read_safetensors(path, DemoWorldError, what="demo-world weights")
    return _parse_meta(meta, path)


def _parse_meta(meta: dict, path) -> dict:
    if meta.get("format") != FORMAT:
        raise DemoWorldError(f"{path} is not a demo-world weights file")
    return {
        "config": json.loads(meta["config"]),
        "scaling_factor": float(meta["scaling_factor"]),
        "record": json.loads(meta.get("record", "{}")),
    }


def load_world(path: str | Path = WEIGHTS) -> StableDiffusionPipeline:
    """Build the demo-world pipeline (fp32) from its shipped weights."""
    tensors, meta = read_safetensors(
        path, DemoWorldError, what="demo-world weights", hint=" Rebuild it: " + TRAIN_COMMAND
    )
    facts = _parse_meta(meta, path)
    config = WorldConfig.from_dict(facts["config"])
    pipe = build_demo_pipeline(config.seed, config.demo_config(facts["scaling_factor"]))
    for name in ("unet", "vae", "text_encoder"):
        weights = {k: v.float() for k, v in _part(tensors, f"{name}.").items()}
        getattr(pipe, name).load_state_dict(weights)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval().requires_grad_(False)
    return pipe


TRAIN_COMMAND = "python -m trainer.demo_world train"


def train_world(
    config: WorldConfig, work: Path, out: Path, *, progress: Progress = no_progress
) -> dict:
    """Render, train the VAE, then the UNet; write the weights to `out`; return the record."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    size = config.image_size
    data = _cached_data(work, "train", config.train_images, config.data_seed, size, progress)
    held = _cached_data(work, "heldout", config.heldout_images, 0, size, progress)
    rendered = time.monotonic()
    pipe = build_demo_pipeline(config.seed, config.demo_config())
    pipe.vae, vae_record = train_vae(pipe, data, held, config, work, progress)
    trained_vae = time.monotonic()
    latents = encode_world(pipe.vae, data)
    scale = 1.0 / float(latents.std())  # unit-variance latents, as SD's 0.18215 was chosen
    pipe.vae.register_to_config(scaling_factor=scale)
    unet_record = train_unet(pipe, latents * scale, data, config, work, progress)
    record = {
        **vae_record,
        **unet_record,
        "latent_std_before_scaling": round(1 / scale, 4),
        "data": {"train": config.train_images, "heldout": config.heldout_images},
        "parameters": {
            n: sum(p.numel() for p in getattr(pipe, n).parameters())
            for n in ("unet", "vae", "text_encoder")
        },
        "wall_seconds": {
            "render": round(rendered - started, 1),
            "vae": round(trained_vae - rendered, 1),
            "unet": round(time.monotonic() - trained_vae, 1),
        },
        "threads": torch.get_num_threads(),
        "command": TRAIN_COMMAND,
    }
    save_world(pipe, config, record, out)
    return record


def main(argv: list[str] | None = None) -> None:
    """`train` the demo world (resumable), or print the shipped weights' `info`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.demo_world")
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="render the demo pack and train the demo world")
    tr.add_argument("--work", default="instance/demo-world-work", help="checkpoints and data")
    tr.add_argument("--out", default=str(WEIGHTS), help="where the weights file goes")
    tr.add_argument("--resume", action="store_true", help="continue from --work's checkpoints")
    tr.add_argument("--config", help="JSON of WorldConfig fields to override")
    tr.add_argument("--threads", type=int, help="torch CPU threads")
    info = commands.add_parser("info", help="print the shipped weights' record")
    info.add_argument("--weights", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    if args.command == "info":
        print(json.dumps(read_record(args.weights), indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    if work.exists() and any(work.glob("*-checkpoint.safetensors")) and not args.resume:
        parser.exit(2, f"error: {work} holds checkpoints; pass --resume or remove it\n")
    config = WorldConfig.from_dict(json.loads(args.config or "{}"))

    started = time.monotonic()

    def report(step: int, total: int, message: str) -> None:
        if step % 50 == 0 or step == total:  # a line per 50 steps is enough to watch
            print(f"[{step}/{total}] {message} ({time.monotonic() - started:.0f} s)", flush=True)

    record = train_world(config, work, Path(args.out), progress=report)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
