"""Learning-curve bench: held-out SRCC after N ratings, from scratch vs from a crowd trunk.

Synthetic throughout, and labelled so wherever it is reported. Each simulated image has
FEATURES hidden qualities drawn N(0, 1), each painted into its latents as a pattern that
survives the scorer's mirroring and shifts (a channel's overall level, a top-to-bottom ramp,
a bright centre) over a smooth random background. Each rater's hidden taste is a unit vector
over those qualities: a share `shared` of it (in variance) is the crowd's common taste, the
rest their own direction, orthogonal to it. They give 1–5 stars: their taste plus noise, times
their own spread, around their own mean (harsh to lenient), rounded.

The crowd trunk is trained with `trainer.crowd.train_crowd` on the ratings of other raters
(z-scored), on images none of the measured raters rate or are tested on. Each measured rater
then rates the first N images of their pool, a scorer is trained from scratch and from the
trunk (the product's default ScorerConfig), and both are scored on held-out images against
the rater's hidden taste (noise-free) and against their noisy stars on those images.

    .venv/bin/python bench/scorer_learning_curve.py            # --quick, --side 64, --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import scorer as sc
from trainer.crowd import train_crowd
from trainer.latents import LatentsFile

FEATURES = 8  # hidden qualities per image that a taste can weigh
SIZES = (10, 25, 50, 100, 200, 500, 1000)
# What the issue quotes from published personal-aesthetics work (real photos, real people).
PUBLISHED = {10: 0.67, 100: 0.75}


@dataclass(frozen=True)
class WorldConfig:
    """The simulated images and raters; every figure the bench prints depends on these."""

    side: int = 32  # latent side: 32 = 256 px images; 64 (SD 1.x at 512 px) is 4× the compute
    amplitude: float = 0.5  # how strongly each hidden quality shows, against a background of 1
    shared: float = 0.5  # share of each rater's taste (in variance) that is the crowd's
    noise: float = 0.5  # rating noise, in units of the taste's spread: taste → stars is noisy
    crowd_raters: int = 24  # the other raters the crowd trunk learns from
    crowd_images: int = 2000  # images only the crowd rates
    crowd_ratings_each: int = 250  # ratings per crowd rater: about 3 per crowd image
    seed: int = 0


@dataclass(frozen=True)
class Rater:
    """A simulated person: what they like, and how they use the stars."""

    taste: torch.Tensor  # [FEATURES], unit length
    offset: float  # their mean star: harsh (2.6) to lenient (3.6)
    spread: float  # stars per unit of taste


def feature_patterns(side: int) -> torch.Tensor:
    """[FEATURES,4,S,S] patterns, unit RMS: four channel levels, two vertical ramps, two blobs.

    All survive mirroring left–right and shifts of a few pixels, so the scorer's augmentation
    keeps them, and a ResNet with global pooling can read every one.
    """
    y = torch.linspace(-1, 1, side).view(side, 1).expand(side, side)
    blob = torch.exp(-(y.square() + y.T.square()) / 0.3)
    shapes = [torch.ones(side, side)] * 4 + [y, y, blob - blob.mean(), blob - blob.mean()]
    channels = [0, 1, 2, 3, 0, 1, 2, 3]
    patterns = torch.zeros(FEATURES, 4, side, side)
    for k, (shape, channel) in enumerate(zip(shapes, channels, strict=True)):
        patterns[k, channel] = shape / shape.square().mean().sqrt()
    return patterns


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


class World:
    """Simulated images and raters, all drawn from one seeded generator."""

    def __init__(self, config: WorldConfig):
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.patterns = feature_patterns(config.side)
        self.crowd_taste = _unit(torch.randn(FEATURES, generator=self.generator))

    def images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return latents [n,4,S,S] and their hidden qualities [n,FEATURES]."""
        g, side = self.generator, self.config.side
        qualities = torch.randn(n, FEATURES, generator=g)
        # Background: structure at 8×8 (as coarse as a latent's objects) plus fine grain.
        coarse = torch.randn(n, 4, 8, 8, generator=g)
        background = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        grain = torch.randn(n, 4, side, side, generator=g)
        background = background / background.std() + 0.5 * grain
        painted = torch.einsum("nk,kchw->nchw", qualities, self.patterns)
        return background + self.config.amplitude * painted, qualities

    def rater(self) -> Rater:
        """Draw a rater: the crowd's taste plus a personal direction orthogonal to it."""
        g, shared = self.generator, self.config.shared
        own = torch.randn(FEATURES, generator=g)
        own = _unit(own - (own @ self.crowd_taste) * self.crowd_taste)
        taste = _unit(shared**0.5 * self.crowd_taste + (1 - shared) ** 0.5 * own)
        offset, spread = torch.rand(2, generator=g).tolist()
        return Rater(taste, offset=2.6 + offset, spread=0.7 + 0.6 * spread)

    def taste(self, rater: Rater, qualities: torch.Tensor) -> torch.Tensor:
        """The rater's hidden, noise-free liking of each image (unit variance)."""
        return qualities @ rater.taste

    def stars(self, rater: Rater, qualities: torch.Tensor) -> torch.Tensor:
        """The 1–5 stars the rater gives: liking plus noise, on their own offset and spread."""
        noise = self.config.noise
        liking = self.taste(rater, qualities)
        liking = liking + noise * torch.randn(len(liking), generator=self.generator)
        stars = rater.offset + rater.spread * liking / (1 + noise**2) ** 0.5
        return stars.round().clamp(1, 5)

    def crowd_ratings(self, qualities: torch.Tensor) -> tuple[list[int], list[int], list[float]]:
        """Other raters each rate a random subset of the crowd images: ids, rows, stars."""
        ids, rows, stars = [], [], []
        each = min(self.config.crowd_ratings_each, len(qualities))
        for k in range(self.config.crowd_raters):
            rater = self.rater()
            seen = torch.randperm(len(qualities), generator=self.generator)[:each]
            ids += [k] * each
            rows += seen.tolist()
            stars += self.stars(rater, qualities[seen]).tolist()
        return ids, rows, stars


def latents_file(latents: torch.Tensor, stars: torch.Tensor) -> LatentsFile:
    """Wrap tensors as trainer.latents would load them (no flips: the scorer mirrors itself)."""
    return LatentsFile(latents=latents, scores=stars, flipped=None, sha256s=None, metadata={})


def train_trunk(world: World, config: sc.ScorerConfig, path: Path) -> dict:
    """Train the crowd model on the crowd's own images and save it; return its summary."""
    latents, qualities = world.images(world.config.crowd_images)
    ids, rows, stars = world.crowd_ratings(qualities)
    began = time.perf_counter()
    unscored = latents_file(latents, torch.zeros(len(latents)))  # train_crowd sets the scores
    trained = train_crowd(unscored, ids, rows, stars, config)
    sc.save_scorer(path, trained)
    return {
        **trained.metrics["crowd"],
        "val_srcc": trained.metrics["srcc"],
        "seconds": round(time.perf_counter() - began, 1),
    }


def held_out(model: sc.Scorer, latents: torch.Tensor, taste: torch.Tensor, stars: torch.Tensor):
    """SRCC of a model's scores against hidden taste and against the rater's noisy stars."""
    pred = sc.predict(model, latents)
    return sc.metrics(pred, taste)["srcc"], sc.metrics(pred, stars)["srcc"]


def run(world: World, args: argparse.Namespace, config: sc.ScorerConfig) -> dict:
    """Train the trunk, then each measured rater's scorers at each N; return every figure."""
    sizes = [n for n in args.sizes if n <= args.pool]
    results = {"settings": {**asdict(world.config), **vars(args)}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="tastebud-curve-") as folder:
        trunk = Path(folder) / "crowd.safetensors"
        results["trunk"] = train_trunk(world, config, trunk)
        crowd_model, _ = sc.load_scorer(trunk)
        pool, pool_qualities = world.images(args.pool)
        test, test_qualities = world.images(args.test)
        for r in range(args.raters):
            rater = world.rater()
            stars = world.stars(rater, pool_qualities)
            taste = world.taste(rater, test_qualities)
            test_stars = world.stars(rater, test_qualities)
            crowd_only = held_out(crowd_model, test, taste, test_stars)
            results["rows"].append({"rater": r, "n": 0, "trunk": crowd_only})
            for n in sizes:
                data = latents_file(pool[:n], stars[:n])
                row = {"rater": r, "n": n}
                for mode, init in (("scratch", None), ("trunk", trunk)):
                    began = time.perf_counter()
                    trained = sc.train(data, config, init=init)
                    row[f"{mode}_s"] = time.perf_counter() - began
                    row[mode] = held_out(trained.model, test, taste, test_stars)
                results["rows"].append(row)
                print(
                    f"  rater {r} N={n}: SRCC vs taste scratch {row['scratch'][0]:.3f}"
                    f" ({row['scratch_s']:.0f} s), from trunk {row['trunk'][0]:.3f}"
                    f" ({row['trunk_s']:.0f} s)",
                    flush=True,
                )
    return results


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over raters, per N: SRCC vs taste and vs stars, and seconds."""
    table = []
    for n in sorted({row["n"] for row in rows}):
        group = [row for row in rows if row["n"] == n]
        line = {"n": n, "raters": len(group)}
        for mode in ("scratch", "trunk"):
            if mode not in group[0]:
                continue
            for k, target in enumerate(("taste", "stars")):
                values = [row[mode][k] for row in group]
                line[f"{mode}_{target}"] = statistics.fmean(values)
                line[f"{mode}_{target}_sd"] = statistics.pstdev(values)
            if f"{mode}_s" in group[0]:
                line[f"{mode}_s"] = statistics.fmean(row[f"{mode}_s"] for row in group)
        table.append(line)
    return table


def _cell(line: dict, key: str) -> str:
    if key not in line:
        return "—"
    spread = f"±{line[key + '_sd']:.2f}" if line["raters"] > 1 else ""
    return f"{line[key]:.2f}{spread}"


def report(results: dict) -> None:
    """Print the settings, the table, and the markdown snippet for the README."""
    settings, trunk = results["settings"], results["trunk"]
    print(
        f"SYNTHETIC raters and latents, 4×{settings['side']}×{settings['side']};"
        f" {settings['raters']} measured rater(s), {settings['test']} held-out images;"
        f" taste shared with the crowd {settings['shared']:.0%}, rating noise {settings['noise']};"
        f" ScorerConfig {settings['config'] or 'defaults'}"
    )
    print(
        f"crowd trunk: {trunk['ratings']} ratings from {trunk['raters']} other raters on"
        f" {trunk['images']} other images, trained in {trunk['seconds']} s"
        f" (held-out SRCC vs crowd targets {trunk['val_srcc']})"
    )
    table = summarise(results["rows"])
    keys = ("scratch_taste", "trunk_taste", "scratch_stars", "trunk_stars")
    print(f"{'':8}{'SRCC vs hidden taste':>26}{'SRCC vs held-out stars':>28}{'seconds':>16}")
    print(f"{'ratings':<8}" + "".join(f"{h:>13}" for h in ("scratch", "from crowd") * 2), end="")
    print(f"{'scratch':>10}{'crowd':>7}")
    for line in table:
        label = "crowd*" if line["n"] == 0 else str(line["n"])
        seconds = [f"{line[k]:.1f}" if k in line else "—" for k in ("scratch_s", "trunk_s")]
        print(f"{label:<8}" + "".join(f"{_cell(line, k):>13}" for k in keys), end="")
        print(f"{seconds[0]:>10}{seconds[1]:>7}")
    print("* the crowd model alone, before any personal rating")
    print()
    print("Markdown (synthetic; SRCC on held-out images, mean ± sd over simulated raters):")
    print()
    print(
        "| ratings | vs taste: scratch | vs taste: crowd trunk | vs stars: scratch"
        " | vs stars: crowd trunk | published, real photos (vs the person's ratings) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for line in table:
        label = "0 (crowd model alone)" if line["n"] == 0 else f"{line['n']:,}"
        published = f"≈ {PUBLISHED[line['n']]:.2f}" if line["n"] in PUBLISHED else ""
        cells = " | ".join(_cell(line, k) for k in keys)
        print(f"| {label} | {cells} | {published} |")


def main() -> None:
    """Simulate a crowd and some raters, train at each N, print the learning curves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=WorldConfig.side, help="latent side")
    parser.add_argument("--raters", type=int, help="measured raters to average (3; quick: 1)")
    parser.add_argument("--pool", type=int, default=max(SIZES), help="images a rater rates")
    parser.add_argument("--test", type=int, help="held-out images (500; quick: 300)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seed", type=int, default=WorldConfig.seed)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="1 rater, a smaller crowd (800)")
    parser.add_argument("--config", help="JSON object of ScorerConfig settings to change")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args()
    world_config = WorldConfig(side=args.side, seed=args.seed)
    if args.quick:
        world_config = replace(world_config, crowd_raters=12, crowd_images=800)
    args.raters = args.raters or (1 if args.quick else 3)
    args.test = args.test or (300 if args.quick else 500)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = sc.ScorerConfig.from_dict(json.loads(args.config) if args.config else {})
    began = time.perf_counter()
    results = run(World(world_config), args, config)
    results["table"] = summarise(results["rows"])
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        report(results)
        print(f"\nwhole bench: {results['seconds']} s on {results['threads']} torch thread(s)")


if __name__ == "__main__":
    main()
