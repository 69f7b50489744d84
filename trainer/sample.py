"""Show what a taste does: samples, before/after grids over LoRA strengths, refinement.

`images` renders prompts × seeds, one PNG each, with or without a taste LoRA — a checkpoint
folder, or the kohya/diffusers .safetensors from the download bundle, loaded the way a
user's tool loads it. A grid renders the same at several strengths (0 is the base model,
−1 the anti-taste), from the same noise in every column, and scores every picture with the
user's scorer on the latents the pipeline produced. Refinement raises one image's score by
gradient ascent on its latents, within a bound on how far they may move.

    python -m trainer.sample images --base demo --prompt "an orb" --seeds 0-7 --out DIR
    python -m trainer.sample refine --base demo --scorer s.safetensors --image in.png --out out.png
    python -m trainer.sample grid --base demo --scorer s.safetensors --lora CHECKPOINT --out g.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont

from trainer.base import (
    DEMO,
    ENV_BASE_MODEL,
    BaseModel,
    BaseModelNotFound,
    load_base,
    only_vae_on_gpu,
)
from trainer.callbacks import Progress, StopCheck, never_stop, no_progress
from trainer.configs import FromDict
from trainer.formats import STRENGTHS
from trainer.latents import decode_latents, encode_pixels, image_pixels
from trainer.lora import ADAPTER, LoraFileError, apply_lora, read_state
from trainer.prompts import read_prompts
from trainer.scorer import Scorer, ScorerFileError, load_scorer, predict

MIN_CELL = 128  # smaller pictures (the demo world's 32 px) are enlarged to at least this
LABEL_HEIGHT = 16  # pixels of each text band in a grid: column labels, row captions


# ---- pictures -------------------------------------------------------------------------


@torch.no_grad()
def decode(pipeline: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Decode scaled latents [N,4,h,w] (as trainer.latents makes them) to PIL images."""
    pixels = decode_latents(latents, pipeline.vae)
    return pipeline.image_processor.postprocess(pixels, output_type="pil")


def decode_all(pipeline: StableDiffusionPipeline, batches: Sequence[torch.Tensor]) -> list:
    """Decode batches of rendered latents, once all are rendered, with only the VAE on the GPU:
    SDXL's decoder needs 3 GiB at 1024 px in fp32, which beside the UNet and both text
    encoders would not fit an 8 GB card."""
    with only_vae_on_gpu(pipeline):
        return [decode(pipeline, latents) for latents in batches]


# ---- refinement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineConfig(FromDict):
    """How far and how fast refinement may move an image's latents x away from x0."""

    steps: int = 20  # gradient steps at most; each is one scorer forward and backward pass
    step_size: float = 0.02  # length of each step as a share of ‖x0‖: normalised steps move
    # the same distance whatever the scale of the scorer's gradient, which varies a lot
    max_change: float = 0.15  # bound on ‖x − x0‖ / ‖x0‖ (L2, relative). Not per-element L∞:
    # that lets all 16k SD 1.x latents move at once (√N times the distance), which buys score with
    # noise spread everywhere; relative L2 is one budget for the whole picture and means the
    # same for any VAE scale. 0.15 is a visible edit that keeps the picture's layout.


@dataclass(frozen=True)
class Refined:
    """An image before and after refinement, both as the VAE decodes them, with their scores."""

    before: Image.Image  # the input as the VAE reconstructs it at the model's resolution (the
    # fair comparison: the round trip alone changes a picture), not the input file itself
    after: Image.Image  # the best latents found, decoded
    before_score: float  # the scorer on the input's latents
    after_score: float  # the scorer on the latents decoded into `after`; ≥ before_score
    steps: int  # gradient steps taken (fewer than configured when stopped)
    change: float  # ‖x − x0‖ / ‖x0‖ of the latents kept; ≤ max_change
    reencoded_score: float  # the scorer on `after` encoded again: what the saved file scores,
    # usually a little below after_score because the VAE round trip loses part of the edit


def _score_and_gradient(scorer: Scorer, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    # Callers (and encode_pixels) may run in no_grad or inference mode; this pass needs the
    # gradient, and clone() outside inference mode makes a tensor autograd accepts.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        score = scorer(x).sum()
        (gradient,) = torch.autograd.grad(score, x)
    return float(score.detach()), gradient  # float(): a CPU–GPU sync point, once per step


def refine(
    base: BaseModel,
    scorer: Scorer,
    image: Image.Image,
    *,
    config: RefineConfig | None = None,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> Refined:
    """Raise an image's score by gradient ascent on its latents, within a bound on the change.

    Each step moves x by step_size·‖x0‖ along the scorer's gradient, then projects back onto
    the ball ‖x − x0‖ ≤ max_change·‖x0‖. The best latents seen (x0 included) are kept, so the
    score never drops. The scorer runs where it is; the VAE where the pipeline is.
    """
    config = config or RefineConfig()
    pipeline = base.pipeline
    scorer.eval()  # BatchNorm must use its running statistics, not this one picture's
    device = next(scorer.parameters()).device
    x0 = encode_pixels(image_pixels(image, base.resolution)[None], pipeline.vae).to(device)
    radius = float(x0.norm())
    limit = config.max_change * radius
    before_score, gradient = _score_and_gradient(scorer, x0)
    x, best, best_score, steps = x0, x0, before_score, 0
    while steps < config.steps and not should_stop():
        norm = float(gradient.norm())
        if norm == 0:  # a saturated scorer: no direction to climb
            break
        moved = x + config.step_size * radius * gradient / norm - x0
        if float(moved.norm()) > limit:  # project back onto the allowed ball around x0
            moved = moved * (limit / float(moved.norm()))
        x, steps = x0 + moved, steps + 1
        score, gradient = _score_and_gradient(scorer, x)
        if score > best_score:
            best, best_score = x, score
        progress(steps, config.steps, f"step {steps}: score {score:.3f}")
    after = decode(pipeline, best)[0]
    reencoded = encode_pixels(image_pixels(after, base.resolution)[None], pipeline.vae)
    return Refined(
        before=decode(pipeline, x0)[0],
        after=after,
        before_score=before_score,
        after_score=best_score,
        steps=steps,
        change=float((best - x0).norm()) / radius if radius else 0.0,
        reencoded_score=float(predict(scorer, reencoded)[0]),
    )


# ---- samples --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated picture, the latents it was decoded from, and its score if asked for."""

    prompt: str
    seed: int
    image: Image.Image
    latents: torch.Tensor  # [4,h,w] scaled, on the CPU
    score: float | None


def images(
    base: BaseModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    lora: str | Path | None = None,
    strength: float = 1.0,
    scorer: Scorer | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    progress: Progress = no_progress,
) -> list[Sample]:
    """Render every (prompt, seed), with the taste LoRA at `strength` when one is given.

    A seed gives the same starting noise whatever the LoRA, so samples with and without it
    differ only by the LoRA. The pipeline is left with no taste adapter loaded.
    """
    groups = [(prompt, seeds) for prompt in prompts]
    return drawn(
        base,
        groups,
        lora=lora,
        strength=strength,
        scorer=scorer,
        steps=steps,
        guidance=guidance,
        progress=progress,
    )


def drawn(
    base: BaseModel,
    groups: Sequence[tuple[str, Sequence[int]]],
    *,
    lora: str | Path | None = None,
    strength: float = 1.0,
    scorer: Scorer | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> list[Sample]:
    """Render each prompt with its own seeds (one batch per prompt), the taste LoRA loaded
    once; stop early, with the samples made so far, when `should_stop` says so."""
    pipeline = base.pipeline
    rendered, latents_made = [], []  # (prompt, seeds, scores) and the latents, per prompt
    try:
        use_taste(pipeline, lora, strength)
        for done, (prompt, seeds) in enumerate(groups, start=1):
            if should_stop():
                break
            latents = render(pipeline, prompt, seeds, base.resolution, steps, guidance)
            scores = predict(scorer, latents.float()).tolist() if scorer else [None] * len(seeds)
            rendered.append((prompt, seeds, scores))
            latents_made.append(latents)
            progress(done, len(groups), f"prompt {done} of {len(groups)}")
    finally:
        _remove_taste(pipeline)
    pictures = decode_all(pipeline, latents_made)
    return [
        Sample(prompt, seed, image, x.float().cpu(), score)
        for (prompt, seeds, scores), latents, images in zip(
            rendered, latents_made, pictures, strict=True
        )
        for seed, image, x, score in zip(seeds, images, latents, scores, strict=True)
    ]


def write_images(samples: Sequence[Sample], out_dir: str | Path, facts: dict) -> dict:
    """Save one PNG per sample and an index.json listing them with `facts`; return the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = list(dict.fromkeys(sample.prompt for sample in samples))
    entries = []
    for sample in samples:
        name = f"p{prompts.index(sample.prompt):02d}-s{sample.seed:04d}.png"
        sample.image.save(out_dir / name)
        score = None if sample.score is None else round(sample.score, 4)
        entries.append({"file": name, "prompt": sample.prompt, "seed": sample.seed, "score": score})
    index = {**facts, "images": entries}
    (out_dir / "index.json").write_text(json.dumps(index, indent=2))
    return index


# ---- grids ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One picture of a grid: a prompt and seed at one LoRA strength, with its score."""

    prompt: str
    seed: int
    strength: float  # LoRA weight: 0 = the base model, 1 = the taste, −1 = the anti-taste
    image: Image.Image  # at the model's resolution, as the pipeline made it
    score: float  # the scorer on the latents this image was decoded from


@dataclass(frozen=True)
class Grid:
    """A before/after grid: its cells, the composite picture, and the mean score per column."""

    cells: list[Cell]  # row by row (prompt, then seed), each row in column (strength) order
    image: Image.Image  # rows = prompt × seed, columns = strengths, every cell labelled
    scores_by_strength: dict[float, float]  # mean cell score per strength
    stopped: bool  # should_stop() ended it early: some cells are missing (left blank)


def column_label(strength: float) -> str:
    """Name a grid column: "base", "taste 0.5", "anti-taste −1"."""
    if strength == 0:
        return "base"
    name = "taste" if strength > 0 else "anti-taste"
    return f"{name} {strength:g}".replace(" -", " −")  # a minus sign, not a hyphen


def use_taste(pipeline: StableDiffusionPipeline, lora: str | Path | None, strength: float) -> None:
    """Load a taste LoRA at `strength`: a checkpoint folder, or a LoRA .safetensors file.

    A file goes through diffusers' own `load_lora_weights`, which reads kohya (A1111, ComfyUI)
    and diffusers key names alike: the file is checked the way a user's tool would use it.
    Strength 0 or no LoRA is the base model itself, not an adapter weighted by zero.
    """
    _remove_taste(pipeline)
    if lora is None or strength == 0:
        return
    if Path(lora).is_dir():
        apply_lora(pipeline, lora, strength)
        return
    if not Path(lora).is_file():
        raise LoraFileError(f"no LoRA file or checkpoint folder at {lora}")
    try:
        pipeline.load_lora_weights(str(lora), adapter_name=ADAPTER)
    except (ValueError, KeyError, OSError) as error:
        raise LoraFileError(f"{lora} is not a LoRA this base model can load: {error}") from None
    pipeline.set_adapters([ADAPTER], adapter_weights=[strength])


def _remove_taste(pipeline: StableDiffusionPipeline) -> None:
    if ADAPTER in getattr(pipeline.unet, "peft_config", {}):
        pipeline.delete_adapters(ADAPTER)


def render(
    pipeline: StableDiffusionPipeline,
    prompt: str,
    seeds: Sequence[int],
    resolution: int,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Scaled latents [len(seeds),4,h,w] for one prompt, one image per seed."""
    # CPU generators: a seed gives the same starting noise on any device, in every column.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipeline(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=resolution,
        width=resolution,
        output_type="latent",  # the scaled latents: what the scorer reads; decoded below
    ).images


def grid(
    base: BaseModel,
    scorer: Scorer,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    lora_folder: str | Path | None,
    strengths: Sequence[float] = STRENGTHS,
    steps: int = 25,  # DDIM steps: SD 1.x's usual count; the demo needs only 2
    guidance: float = 7.5,  # classifier-free guidance, SD 1.x's usual scale
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> Grid:
    """Render prompts × seeds at each LoRA strength, score every picture, and compose a grid.

    Every column starts from the same noise per seed, so columns differ only by the LoRA.
    The pipeline is left with no taste adapter loaded, whatever it had before.
    """
    if lora_folder is not None:
        read_state(lora_folder)  # a bad folder fails now, not after the base column
    elif any(strength != 0 for strength in strengths):
        raise ValueError("strengths other than 0 need a LoRA folder")
    pipeline = base.pipeline
    jobs = [(c, s, r, p) for c, s in enumerate(strengths) for r, p in enumerate(prompts)]
    rendered, latents_made = [], []  # (column, strength, prompt index, prompt, scores); latents
    column_in_use = None
    try:
        for column, strength, p, prompt in jobs:
            if should_stop():
                break
            progress(
                len(rendered),
                len(jobs),
                f"{column_label(strength)}: prompt {p + 1} of {len(prompts)}",
            )
            if column != column_in_use:
                use_taste(pipeline, lora_folder, strength)
                column_in_use = column
            latents = render(pipeline, prompt, seeds, base.resolution, steps, guidance)
            rendered.append((column, strength, p, prompt, predict(scorer, latents.float())))
            latents_made.append(latents)
    finally:
        _remove_taste(pipeline)
    found: dict[tuple[int, int], Cell] = {}  # (row, column) → cell
    pictures = decode_all(pipeline, latents_made)
    for (column, strength, p, prompt, scores), images in zip(rendered, pictures, strict=True):
        for k, (seed, image) in enumerate(zip(seeds, images, strict=True)):
            found[p * len(seeds) + k, column] = Cell(
                prompt, seed, strength, image, float(scores[k])
            )
    done = len(rendered)
    progress(done, len(jobs), "grid done" if done == len(jobs) else "grid stopped")
    cells = [found[key] for key in sorted(found)]
    by_strength: dict[float, list[float]] = {}
    for cell in cells:
        by_strength.setdefault(cell.strength, []).append(cell.score)
    return Grid(
        cells=cells,
        image=_compose(found, prompts, seeds, strengths, base.resolution, base.is_demo),
        scores_by_strength={s: sum(v) / len(v) for s, v in by_strength.items()},
        stopped=done < len(jobs),
    )


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Cut `text` to fit `width` pixels, marking the cut with "..."."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _compose(
    found: dict[tuple[int, int], Cell],
    prompts: Sequence[str],
    seeds: Sequence[int],
    strengths: Sequence[float],
    resolution: int,
    demo: bool,
) -> Image.Image:
    """Lay cells out under column labels, each row under a caption, each cell with its score."""
    scale = math.ceil(MIN_CELL / resolution)
    side = resolution * scale
    rows = len(prompts) * len(seeds)
    height = LABEL_HEIGHT + rows * (LABEL_HEIGHT + side)
    composite = Image.new("RGB", (side * len(strengths), height))
    draw = ImageDraw.Draw(composite)
    font = ImageFont.load_default(size=12)

    def text(xy: tuple[int, int], words: str, width: int) -> None:
        # The bundled font has no "−" (U+2212) glyph; a hyphen reads the same.
        draw.text(xy, _fit(draw, words.replace("−", "-"), font, width), font=font, fill="white")

    for column, strength in enumerate(strengths):
        label = column_label(strength)
        if demo and strength == 0:
            label += " (demo)"  # the demo model is labelled as such wherever it appears
        text((column * side + 4, 2), label, side - 8)
    for row in range(rows):
        top = LABEL_HEIGHT + row * (LABEL_HEIGHT + side)
        prompt, seed = prompts[row // len(seeds)], seeds[row % len(seeds)]
        text((4, top + 2), f"seed {seed} · {prompt}", composite.width - 8)
        for column in range(len(strengths)):
            cell = found.get((row, column))
            if cell is None:  # stopped before this one was rendered
                continue
            x, y = column * side, top + LABEL_HEIGHT
            # NEAREST: the demo's 64 px noise stays crisp instead of turning to blur.
            composite.paste(cell.image.resize((side, side), Image.Resampling.NEAREST), (x, y))
            draw.rectangle((x, y + side - LABEL_HEIGHT, x + 40, y + side), fill="black")
            text((x + 3, y + side - LABEL_HEIGHT + 2), f"{cell.score:.2f}", 36)
    return composite


# ---- command line ---------------------------------------------------------------------------


def _numbers(kind: type, text: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None


def _seed_list(text: str) -> list[int]:
    """Parse "0-7" or "0,3,5" (or a mix: "0-3,9") into seeds."""
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a seed list like 0-7 or 0,3: {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers: {text!r}")
    return seeds


def _images_command(args) -> dict:
    base = load_base(args.base, device=args.device)
    scorer = None
    if args.scorer:
        scorer, _ = load_scorer(args.scorer)
        scorer.to(base.pipeline.device)
    made = images(
        base,
        args.prompt,
        args.seeds,
        lora=args.lora,
        strength=args.strength,
        scorer=scorer,
        steps=args.steps,
        guidance=args.guidance,
    )
    facts = {
        "base": base.name,
        "lora": args.lora,
        "strength": args.strength if args.lora else 0.0,
        "steps": args.steps,
        "guidance": args.guidance,
        "resolution": base.resolution,
    }
    index = write_images(made, args.out, facts)
    scores = [e["score"] for e in index["images"] if e["score"] is not None]
    summary = {k: v for k, v in index.items() if k != "images"} | {"count": len(made)}
    if scores:
        summary["mean_score"] = round(sum(scores) / len(scores), 4)
    return summary | {"out": args.out}


def main(argv: list[str] | None = None) -> None:
    """Sample images, refine one, or draw a grid: `python -m trainer.sample images|refine|grid`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.sample")
    commands = parser.add_subparsers(dest="command", required=True)
    im = commands.add_parser("images", help="one PNG per prompt and seed, and index.json")
    im.add_argument("--base", default=os.environ.get(ENV_BASE_MODEL, DEMO))
    im.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    im.add_argument("--seeds", type=_seed_list, default=[0], help="e.g. 0-7 or 0,3,5")
    im.add_argument("--lora", help="kohya or diffusers .safetensors, or a checkpoint folder")
    im.add_argument("--strength", type=float, default=1.0, help="LoRA weight; -1 = anti-taste")
    im.add_argument("--scorer", help="also score every image with this scorer")
    im.add_argument("--steps", type=int, default=25)
    im.add_argument("--guidance", type=float, default=7.5)
    im.add_argument("--out", required=True, help="folder for the PNGs and index.json")
    im.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", default=os.environ.get(ENV_BASE_MODEL, DEMO))
    common.add_argument("--scorer", required=True, help="scorer .safetensors (trainer.scorer)")
    common.add_argument("--out", required=True, help="the PNG to write")
    common.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    rf = commands.add_parser("refine", parents=[common], help="raise one image's score")
    rf.add_argument("--image", required=True)
    rf.add_argument("--steps", type=int, default=RefineConfig.steps)
    rf.add_argument("--step-size", type=float, default=RefineConfig.step_size)
    rf.add_argument("--max-change", type=float, default=RefineConfig.max_change)
    rf.add_argument("--before", help="also write the VAE's reconstruction of the input here")
    gr = commands.add_parser("grid", parents=[common], help="before/after grid over strengths")
    gr.add_argument("--lora", required=True, help="a taste LoRA checkpoint folder")
    gr.add_argument("--prompts", type=int, default=4, help="how many held-out [eval] prompts")
    gr.add_argument("--prompt-file", help="[eval] prompt file (default: the base's)")
    gr.add_argument("--seeds", type=lambda s: _numbers(int, s), default=[0, 1], help="e.g. 0,1")
    gr.add_argument("--strengths", type=lambda s: _numbers(float, s), default=list(STRENGTHS))
    gr.add_argument("--steps", type=int, default=25)
    gr.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args(argv)
    if args.command == "images":
        try:
            summary = _images_command(args)
        except (BaseModelNotFound, ScorerFileError, LoraFileError, ValueError, OSError) as error:
            parser.exit(2, f"error: {error}\n")
        json.dump(summary, sys.stdout)
        print()
        return
    try:
        scorer, _ = load_scorer(args.scorer)
        if args.command == "grid":
            read_state(args.lora)  # fail in a second, before loading the base model
        base = load_base(args.base, device=args.device)
        scorer.to(base.pipeline.device)
        if args.command == "refine":
            with Image.open(args.image) as image:
                config = RefineConfig(
                    steps=args.steps, step_size=args.step_size, max_change=args.max_change
                )
                result = refine(base, scorer, image, config=config)
            result.after.save(args.out)
            if args.before:
                result.before.save(args.before)
            summary = {
                "before_score": round(result.before_score, 4),
                "after_score": round(result.after_score, 4),
                "reencoded_score": round(result.reencoded_score, 4),
                "steps": result.steps,
                "change": round(result.change, 4),
                "out": args.out,
            }
        else:
            prompt_file = args.prompt_file or base.prompts_file
            prompts = read_prompts("eval", prompt_file)[: args.prompts]  # never trained on
            made = grid(
                base,
                scorer,
                prompts,
                args.seeds,
                lora_folder=args.lora,
                strengths=args.strengths,
                steps=args.steps,
                guidance=args.guidance,
            )
            made.image.save(args.out)
            summary = {
                "scores_by_strength": {
                    f"{s:g}": round(v, 4) for s, v in made.scores_by_strength.items()
                },
                "columns": [column_label(s) for s in args.strengths],
                "cells": len(made.cells),
                "prompts": prompts,
                "seeds": args.seeds,
                "out": args.out,
            }
    except (BaseModelNotFound, ScorerFileError, LoraFileError, ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
