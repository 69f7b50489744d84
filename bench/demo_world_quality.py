"""How good is the shipped demo world? Prompt control, mood control, VAE reconstruction.

- VAE: reconstruction PSNR on demo-pack pictures (the pack's own seed; the world trained on
  another renderer seed, so these are held out).
- Prompt control: a style classifier trained on real renders (bench/raters.py) names the
  style of samples prompted "a <style>"; the share it gets right (12 styles; chance 8 %).
- Mood control: saturation, brightness and hue spread of samples prompted with each mood
  word, beside the same measures on real renders of that mood.
- A picture: per style, real renders beside samples (writes --grid).

    .venv/bin/python bench/demo_world_quality.py     # --seeds 16 --guidance 7.5 --grid out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.raters import SIDE, style_probabilities, train_style_classifier  # noqa: E402
from trainer.base import DEMO, load_base  # noqa: E402
from trainer.demo_art import DEMO_MOODS, DEMO_STYLES  # noqa: E402
from trainer.demo_world import (  # noqa: E402
    MOOD_WORDS,
    STYLE_WORDS,
    render_world_data,
    vae_psnr,
    with_article,
)
from trainer.sample import images  # noqa: E402

MOODS_SHOWN = ("pastel", "garish", "muddy", "mono", "analogous")


def hsv_measures(pictures: np.ndarray) -> dict:
    """Mean saturation, brightness and per-picture hue spread of uint8 RGB pictures."""
    hsv = np.stack(
        [np.asarray(Image.fromarray(p).convert("HSV"), np.float32) / 255 for p in pictures]
    )
    hue = hsv[..., 0] * 2 * np.pi  # circular spread: 1 − |mean unit vector|
    spread = 1 - np.abs(np.exp(1j * hue).mean(axis=(1, 2)))
    return {
        "saturation": round(float(hsv[..., 1].mean()), 3),
        "brightness": round(float(hsv[..., 2].mean()), 3),
        "hue_spread": round(float(spread.mean()), 3),
    }


def sample_pixels(base, prompt: str, seeds: int, args) -> np.ndarray:
    """Samples of one prompt as uint8 RGB [seeds, 32, 32, 3]."""
    made = images(base, [prompt], range(seeds), steps=args.steps, guidance=args.guidance)
    return np.stack([np.asarray(s.image.convert("RGB")) for s in made])


def main() -> None:
    """Measure the shipped weights and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default=str(ROOT / "instance" / "demo_world_grid.png"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(DEMO, device="cpu")
    cache = ROOT / "instance" / "bench-cache" / "style_classifier.safetensors"
    classifier, accuracy = train_style_classifier(cache=cache)
    real = render_world_data(600, 0, SIDE)  # the pack's own pictures (seed 0)
    figures = {
        "vae_psnr_db": vae_psnr(base.pipeline.vae, real),
        "classifier_accuracy_on_real": round(accuracy, 3),
    }
    per_style, samples = {}, {}
    for k, style in enumerate(DEMO_STYLES):
        samples[style] = sample_pixels(base, with_article(STYLE_WORDS[style]), args.seeds, args)
        probs = style_probabilities(classifier, list(samples[style].astype(np.float32) / 255))
        per_style[style] = round(float((probs.argmax(1) == k).mean()), 3)
    figures["prompt_control"] = round(float(np.mean(list(per_style.values()))), 3)
    figures["prompt_control_by_style"] = per_style
    moods = {}
    for mood in MOODS_SHOWN:
        real_rows = real.pixels[real.moods == DEMO_MOODS.index(mood)]
        prompted = np.concatenate(
            [
                sample_pixels(base, with_article(f"{MOOD_WORDS[mood]} {STYLE_WORDS[s]}"), 4, args)
                for s in DEMO_STYLES
            ]
        )
        moods[MOOD_WORDS[mood]] = {
            "samples": hsv_measures(prompted),
            "real": hsv_measures(real_rows),
        }
    figures["moods"] = moods
    _write_grid(real, samples, Path(args.grid))
    figures["grid"] = args.grid
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"VAE reconstruction PSNR on 600 held-out pack pictures: {figures['vae_psnr_db']} dB")
    print(f"style classifier accuracy on real renders: {accuracy:.1%} (chance 8.3 %)")
    print(f"prompt control: {figures['prompt_control']:.1%} of samples show the prompted style")
    print("  " + ", ".join(f"{s} {v:.0%}" for s, v in per_style.items()))
    print(f"{'mood word':14} {'saturation':>17} {'brightness':>17} {'hue spread':>17}")
    print(f"{'':14} {'samples / real':>17} {'samples / real':>17} {'samples / real':>17}")
    for word, m in moods.items():
        cells = [f"{m['samples'][k]:.2f} / {m['real'][k]:.2f}" for k in m["samples"]]
        print(f"{word:14} " + " ".join(f"{c:>17}" for c in cells))
    print(f"grid: {args.grid}")


def _write_grid(real, samples: dict, path: Path, per_side: int = 6, zoom: int = 3) -> None:
    """Per style a row: real renders on the left, samples on the right, enlarged crisply."""
    cell = SIDE * zoom
    gap = cell // 2
    sheet = Image.new("RGB", (2 * per_side * cell + gap, len(DEMO_STYLES) * cell), "white")
    for row, style in enumerate(DEMO_STYLES):
        reals = real.pixels[real.styles == row][:per_side]
        for col, pixels in enumerate([*reals, *samples[style][:per_side]]):
            x = col * cell + (gap if col >= per_side else 0)
            tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


if __name__ == "__main__":
    main()
