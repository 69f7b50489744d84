"""LoRA training modes at equal compute: rollout, one-step, mixed, judged by synthetic raters.

On the demo world, for each synthetic rater (bench/raters.py) and each seed: the rater rates
300 demo-pack pictures with noise (the seed draws the noise), a scorer trains on them
(trainer.scorer, in this process), and then one taste LoRA per mode trains against that scorer
(trainer.lora.train, the demo preset), the one-step steps drawing from the latents of the 300
rated and 200 further unrated pack pictures, mirrored copies included, as the site passes its
pool. Every variant gets a budget of UNet forward-equivalents (`trainer.lora.unet_passes`: a
guided call 1, its backward 2, the checkpointed recompute 1, the drift's base call 1): the
rollout preset's, or a share of it ("one_step@0.4"); the number of held-out evaluations is
the rollout's in every variant, so evaluation costs the same too. Then the chosen checkpoint
samples the held-out prompts on seeds no phase has seen, and the rater's own noiseless eye
judges them:

- true gain: the rater's true stars at strength 1 minus the base's (and at the recommended
  strength the evaluation read off its curve);
- diversity: mean pairwise pixel distance between a prompt's seeds, over the base's;
- wall seconds of lora.train, and the UNet passes it used.

Ratios are against the rollout run of the same rater and seed, in this process.

    .venv/bin/python bench/lora_modes.py        # --raters warm,pastel --seeds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
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
from bench.taste_transfer import render_pack  # noqa: E402
from trainer import lora  # noqa: E402
from trainer import scorer as sc  # noqa: E402
from trainer.base import DEMO, load_base  # noqa: E402
from trainer.latents import encode_images, load_latents_file, save_latents_file  # noqa: E402
from trainer.prompts import DEMO_PROMPTS_FILE, read_prompts  # noqa: E402
from trainer.sample import images  # noqa: E402

VARIANTS = ("rollout", "one_step", "mixed", "one_step@0.4", "one_step@0.4:0-0.6")
# The demo preset's rollout before the one-step mode: the baseline every variant is costed from.
ROLLOUT_PRESET = {"mode": "rollout", "steps": 120, "eval_every": 30}
SAMPLE_SEEDS = range(100, 108)  # unseen by the scorer, the LoRA's training and its evaluation
SAMPLE_STEPS = 20


def variant_config(variant: str, rollout: lora.TasteLoraConfig) -> lora.TasteLoraConfig:
    """The config of `variant`: "mode", then optionally "@share" of the rollout's compute and
    ":low-high", the one-step noise range ("one_step@0.4:0-0.3"); "preset" is the demo preset
    as shipped (its own mode and steps)."""
    if variant == "preset":
        return lora.TasteLoraConfig.from_dict(lora.DEMO_PRESET)
    spec, _, noise = variant.partition(":")
    mode, _, share = spec.partition("@")
    config = replace(rollout, mode=mode)
    if noise:
        low, high = noise.split("-")
        config = replace(config, noise_range=(float(low), float(high)))
    budget = rollout.steps * lora.unet_passes(rollout) * float(share or 1)
    steps = max(1, round(budget / lora.unet_passes(config)))
    evaluations = rollout.steps // rollout.eval_every
    return replace(config, steps=steps, eval_every=max(1, -(-steps // evaluations)))


def train_scorer(
    rater: Rater, seed: int, encoded, rated: int, pictures, work: Path
) -> tuple[Path, dict]:
    """Rate the first `rated` pictures with noise drawn from `seed`; train and save a scorer."""
    rng = np.random.default_rng(zlib.crc32(f"{rater.name}-{seed}".encode()))
    stars = [rater.rate(p, rng) for p in pictures[:rated]]
    data_path = work / "latents.safetensors"
    save_latents_file(
        data_path,
        encoded.latents[:rated],
        stars,
        encoded.sha256s[:rated],
        flipped=encoded.flipped[:rated] if encoded.flipped is not None else None,
        metadata={"base_model": DEMO, "family": "sd1"},
    )
    trained = sc.train(load_latents_file(data_path), sc.ScorerConfig(seed=seed))
    sc.save_scorer(work / "scorer.safetensors", trained)
    return work / "scorer.safetensors", trained.metrics


def true_figures(base, rater: Rater, prompts, checkpoint: Path | None, strength: float) -> dict:
    """The rater's mean true stars and the diversity of held-out samples at `strength`."""
    made = images(
        base,
        prompts,
        SAMPLE_SEEDS,
        lora=checkpoint,
        strength=strength,
        steps=SAMPLE_STEPS,
    )
    pictures = [as_array(m.image) for m in made]
    return {
        "stars": float(np.mean([rater.true_stars(p) for p in pictures])),
        "spread": diversity(pictures, [m.prompt for m in made]),
    }


def run_variant(base, rater, prompts, scorer, real, config, work: Path, baseline: dict) -> dict:
    """Train one LoRA, sample it, judge it; return its figures."""
    torch.manual_seed(0)
    started = time.perf_counter()
    summary = lora.train(base, scorer, work, config, images=real)
    seconds = time.perf_counter() - started
    chosen = Path(summary["chosen_checkpoint"])
    at_one = true_figures(base, rater, prompts, chosen, 1.0)
    recommended = summary["recommended_strength"]
    at_rec = at_one
    if recommended is not None and recommended != 1.0:
        at_rec = true_figures(base, rater, prompts, chosen, recommended)
    return {
        "steps": summary["steps"],
        "passes": summary["unet_passes"],
        "seconds": round(seconds, 1),
        "chosen_step": summary["chosen_step"],
        "score_gain": summary["score_gain"],
        "true_gain": round(at_one["stars"] - baseline["stars"], 3),
        "recommended": recommended,
        "true_gain_recommended": round(at_rec["stars"] - baseline["stars"], 3),
        "diversity": round(at_one["spread"] / max(baseline["spread"], 1e-9), 3),
        "drift": summary["drift"],
        "reason": summary["reason"],
    }


def run(args) -> dict:
    """Every rater × seed × variant; return the raw rows."""
    torch.set_num_threads(args.threads)
    base = load_base(DEMO, device="cpu")
    prompts = read_prompts("eval", DEMO_PROMPTS_FILE)
    cache = ROOT / "instance" / "bench-cache" / "style_classifier.safetensors"
    classifier, _ = train_style_classifier(cache=cache)
    raters = standard_raters(classifier)
    if args.raters:
        raters = [r for r in raters if r.name in args.raters.split(",")]
    rollout = lora.TasteLoraConfig.from_dict({**lora.DEMO_PRESET, **ROLLOUT_PRESET})
    if args.rollout_steps:  # a quick look: fewer steps, the same number of evaluations
        rollout = replace(rollout, steps=args.rollout_steps, eval_every=args.rollout_steps // 4)
    configs = {v: variant_config(v, rollout) for v in args.variants.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tastebud-lora-modes-") as temp:
        work = Path(temp)
        pack = render_pack(ROOT / "instance" / "bench-cache" / "pack", args.rated + args.unrated)
        pictures = [as_array(Image.open(p)) for p in pack]
        encoded = encode_images(pack, base.pipeline.vae, resolution=base.resolution)
        real = torch.cat([encoded.latents, encoded.flipped])  # rated and unrated, mirrored too
        baseline = {}
        for rater in raters:
            rater.calibrate(pictures[: args.rated])
            baseline[rater.name] = true_figures(base, rater, prompts, None, 0.0)
            for seed in range(args.seeds):
                folder = work / f"{rater.name}-{seed}"
                folder.mkdir()
                scorer, metrics = train_scorer(rater, seed, encoded, args.rated, pictures, folder)
                for variant, config in configs.items():
                    config = replace(config, seed=seed)
                    out = folder / variant.replace("@", "-")
                    row = run_variant(
                        base, rater, prompts, scorer, real, config, out, baseline[rater.name]
                    )
                    row |= {"rater": rater.name, "seed": seed, "variant": variant}
                    row["scorer_srcc"] = metrics.get("srcc")
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return {"configs": {v: asdict(c) for v, c in configs.items()}, "rows": rows}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f}"


def report(result: dict) -> None:
    """Print per-variant means, ratios against rollout, and a per-rater table."""
    rows = result["rows"]
    variants = list(result["configs"])
    raters = list(dict.fromkeys(r["rater"] for r in rows))
    runs = len(rows) // max(len(variants), 1)
    key = {(r["rater"], r["seed"], r["variant"]): r for r in rows}
    print(f"demo world, {len(raters)} raters × {runs // max(len(raters), 1)} seeds per variant")
    print(
        f"{'variant':20}{'steps':>6}{'passes':>8}{'true gain (±sd)':>17}{'at rec.':>9}"
        f"{'diversity':>10}{'wall s':>8}{'gain/rollout':>13}{'time/rollout':>13}"
    )
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        pairs = [(r, key[(r["rater"], r["seed"], "rollout")]) for r in mine]
        gain_ratio = sum(r["true_gain"] for r, _ in pairs) / sum(b["true_gain"] for _, b in pairs)
        time_ratio = statistics.mean(r["seconds"] / b["seconds"] for r, b in pairs)
        print(
            f"{v:20}{mine[0]['steps']:>6}{statistics.mean(r['passes'] for r in mine):>8.0f}"
            f"{mean_sd([r['true_gain'] for r in mine]):>17}"
            f"{statistics.mean(r['true_gain_recommended'] for r in mine):>+9.2f}"
            f"{statistics.mean(r['diversity'] for r in mine):>10.2f}"
            f"{statistics.mean(r['seconds'] for r in mine):>8.1f}"
            f"{gain_ratio:>13.2f}{time_ratio:>13.2f}"
        )
    wins = {
        v: sum(
            r["true_gain"] >= key[(r["rater"], r["seed"], "rollout")]["true_gain"]
            for r in rows
            if r["variant"] == v
        )
        for v in variants
    }
    print("runs at least as good as rollout's (same rater, seed): " + ", ".join(
        f"{v} {wins[v]}/{runs}" for v in variants if v != "rollout"
    ))  # fmt: skip
    print("\ntrue gain at strength 1 by rater (mean over seeds); diversity in brackets")
    print(f"{'rater':10}" + "".join(f"{v:>22}" for v in variants))
    for name in raters:
        cells = []
        for v in variants:
            mine = [r for r in rows if r["rater"] == name and r["variant"] == v]
            gain = statistics.mean(r["true_gain"] for r in mine)
            spread = statistics.mean(r["diversity"] for r in mine)
            cells.append(f"{gain:+.2f} ({spread:.2f})")
        print(f"{name:10}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    """Run the comparison and print the tables (or write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", default="", help="comma-separated names (default: all)")
    parser.add_argument("--seeds", type=int, default=2, help="rating-noise and training seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rated", type=int, default=300)
    parser.add_argument("--unrated", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rollout-steps", type=int, help="the baseline's steps (default: preset)")
    parser.add_argument("--json", help="also write the raw rows to this file")
    parser.add_argument("--report", help="print the tables of a --json file, running nothing")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    report(result)


if __name__ == "__main__":
    main()
