"""Taste transfer, end to end: synthetic raters → the trainer's own CLIs → the true gain.

For each synthetic rater (bench/raters.py): rate demo-pack pictures with rater noise, then run
the trainer's command lines exactly as a script would —

    latents export → scorer train → lora train → export (kohya bundle)
    → sample images without a LoRA, and with the bundle's kohya file at −1, 0.5 and 1

— on the demo world's held-out prompts and on seeds no phase has seen. The rater's noiseless
judgement of those samples is the true gain. Prints per rater: scorer SRCC; true stars at
strengths −1 / 0 / 0.5 / 1; diversity against the base; wall time per phase; the targets.

    .venv/bin/python bench/taste_transfer.py          # --raters warm,pastel --ratings 300 --json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.raters import (  # noqa: E402
    Rater,
    as_array,
    diversity,
    standard_raters,
    train_style_classifier,
)
from trainer.demo_art import render_demo_image  # noqa: E402
from trainer.prompts import DEMO_PROMPTS_FILE, read_prompts  # noqa: E402

STRENGTHS = (-1.0, 0.0, 0.5, 1.0)
TARGET_GAIN, TARGET_DIVERSITY, TARGET_SECONDS = 0.5, 0.8, 180


def cli(module: str, *args: str, threads: int) -> tuple[dict, float]:
    """Run `python -m module args`, return its JSON summary and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TASTEBUD_BASE_MODEL": "demo"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), seconds


def render_pack(folder: Path, count: int) -> list[Path]:
    """Write the first `count` demo-pack pictures as PNGs, as the site stores them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"demo-{index:04d}.png"
        if not path.is_file():
            render_demo_image(index).save(path, compress_level=1)
        paths.append(path)
    return paths


def run_rater(rater: Rater, pack: list[Path], work: Path, args) -> dict:
    """Rate, train and sample for one rater; return its figures."""
    rng = np.random.default_rng(zlib.crc32(rater.name.encode()))
    pictures = [as_array(Image.open(p)) for p in pack]
    rater.calibrate(pictures)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "scores.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "score"])
        for path, picture in zip(pack, pictures, strict=True):
            writer.writerow([path.name, rater.rate(picture, rng)])
    t, times = args.threads, {}
    _, times["encode"] = cli(
        "trainer.latents", "export", "--images", str(pack[0].parent), "--scores",
        str(work / "scores.csv"), "--out", str(work / "latents.safetensors"), threads=t,
    )  # fmt: skip
    scorer, times["scorer"] = cli(
        "trainer.scorer", "train", "--data", str(work / "latents.safetensors"),
        "--out", str(work / "scorer.safetensors"), threads=t,
    )  # fmt: skip
    lora_args = ["--steps", str(args.lora_steps)] if args.lora_steps else []
    lora_args += ["--config", args.lora_config] if getattr(args, "lora_config", None) else []
    lora, times["lora"] = cli(
        "trainer.lora", "train", "--scorer", str(work / "scorer.safetensors"),
        "--latents", str(work / "latents.safetensors"), "--out", str(work / "lora"),
        *lora_args, threads=t,
    )  # fmt: skip
    bundle, times["export"] = cli(
        "trainer.export", "--checkpoint", lora["chosen_checkpoint"], "--out",
        str(work / "bundle"), "--name", f"taste-{rater.name}", threads=t,
    )  # fmt: skip
    prompts = [arg for p in args.prompts for arg in ("--prompt", p)]
    samples, times["samples"] = {}, 0.0
    for strength in STRENGTHS:
        lora_file = ["--lora", bundle["kohya"], "--strength", str(strength)] if strength else []
        out = work / f"samples-{strength:g}"
        index, seconds = cli(
            "trainer.sample", "images", *prompts, "--seeds", args.seeds, "--steps",
            str(args.sample_steps), *lora_file, "--out", str(out), threads=t,
        )  # fmt: skip
        times["samples"] += seconds
        listed = json.loads((out / "index.json").read_text())["images"]
        samples[strength] = [(e["prompt"], as_array(Image.open(out / e["file"]))) for e in listed]
    stars = {s: float(np.mean([rater.true_stars(p) for _, p in v])) for s, v in samples.items()}
    spread = {
        s: diversity([p for _, p in v], [prompt for prompt, _ in v]) for s, v in samples.items()
    }
    return {
        "rater": rater.name,
        "ratings": len(pack),
        "scorer_srcc": scorer.get("srcc"),
        "true_stars": {f"{s:g}": round(v, 3) for s, v in stars.items()},
        "true_gain": round(stars[1.0] - stars[0.0], 3),
        "ordered": stars[-1.0] < stars[0.0] < stars[0.5] < stars[1.0],
        "diversity": round(spread[1.0] / max(spread[0.0], 1e-9), 3),
        "lora_chosen_step": lora["chosen_step"],
        "lora_score_gain": lora["score_gain"],
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(sum(times.values()), 1),
    }


def main() -> None:
    """Run every chosen rater and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", default="", help="comma-separated names (default: all)")
    parser.add_argument("--ratings", type=int, default=300)
    parser.add_argument("--seeds", default="100-107", help="sample seeds, unseen in training")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--lora-steps", type=int, help="override the demo preset's steps")
    parser.add_argument("--lora-config", help="JSON of TasteLoraConfig settings over the preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", help="keep files here (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.prompts = read_prompts("eval", DEMO_PROMPTS_FILE)
    cache = ROOT / "instance" / "bench-cache" / "style_classifier.safetensors"
    classifier, accuracy = train_style_classifier(cache=cache)
    raters = standard_raters(classifier)
    if args.raters:
        wanted = args.raters.split(",")
        raters = [r for r in raters if r.name in wanted]
    with tempfile.TemporaryDirectory() as temp:
        work = Path(args.work or temp)
        pack = render_pack(work / "pack", args.ratings)
        results = [run_rater(r, pack, work / r.name, args) for r in raters]
    if args.json:
        print(json.dumps({"style_classifier_accuracy": accuracy, "raters": results}, indent=2))
        return
    print(f"{len(args.prompts)} held-out prompts × seeds {args.seeds}; {args.ratings} ratings each")
    head = f"{'rater':9} {'SRCC':>5} {'−1':>5} {'0':>5} {'0.5':>5} {'1':>5} {'gain':>6}"
    print(head + f" {'order':>5} {'div':>5} {'secs':>5}  encode/scorer/lora/export/samples")
    for r in results:
        s = r["true_stars"]
        print(
            f"{r['rater']:9} {r['scorer_srcc']:5.2f} {s['-1']:5.2f} {s['0']:5.2f} {s['0.5']:5.2f}"
            f" {s['1']:5.2f} {r['true_gain']:+6.2f} {'yes' if r['ordered'] else 'NO':>5}"
            f" {r['diversity']:5.2f} {r['total_seconds']:5.0f}  "
            + "/".join(f"{v:.0f}" for v in r["seconds"].values())
        )
    met = [
        r["true_gain"] >= TARGET_GAIN
        and r["ordered"]
        and r["diversity"] >= TARGET_DIVERSITY
        and r["total_seconds"] <= TARGET_SECONDS
        for r in results
    ]
    print(
        f"targets (gain ≥ +{TARGET_GAIN}, −1<0<0.5<1, diversity ≥ {TARGET_DIVERSITY},"
        f" ≤ {TARGET_SECONDS} s): met by {sum(met)} of {len(met)} raters"
    )


if __name__ == "__main__":
    main()
