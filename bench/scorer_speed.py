"""Scorer speed bench: time and peak memory to train a personal scorer, scratch vs from a trunk.

One simulated rater's 1,000 ratings of 4×64×64 latents (SYNTHETIC: the world of
bench/scorer_learning_curve.py, a hidden taste over image-level qualities painted into the
latents) train a scorer twice with the product's default ScorerConfig: from scratch, and from
a crowd trunk that `trainer.crowd.train_crowd` trained first, untimed, on other simulated
raters' ratings of other images. Each run is a fresh subprocess, so its peak resident memory
(ru_maxrss) is its own; on CUDA the peak allocated GPU memory is shown too. Held-out figures
are on 500 images the rater also rated: SRCC and pairwise accuracy against their stars, and
SRCC against their hidden, noise-free taste.

Target: a personal scorer from 1,000 ratings at 4×64×64 in at most 60 s wall on a 2-core CPU.

    .venv/bin/python bench/scorer_speed.py                # --quick, --n 1000, --side 64, --json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scorer_learning_curve import (  # bench/ is on sys.path
    World,
    WorldConfig,
    latents_file,
    train_trunk,
)

from trainer import scorer as sc
from trainer.device import pick_device
from trainer.tensorfiles import read_safetensors, write_atomic

TARGET_S = 60.0  # the bar for 1,000 ratings at 4×64×64 on a 2-core CPU
MODES = {"scratch": "from scratch", "trunk": "from trunk"}


def _status_mib(field: str) -> float | None:
    """A memory figure (VmRSS, VmHWM) from /proc/self/status in MiB; None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    found = [line.split()[1] for line in lines if line.startswith(f"{field}:")]
    return int(found[0]) / 1024 if found else None


def reset_peak_rss() -> tuple[float, bool]:
    """Return resident memory now (MiB) and whether the peak could be reset to it."""
    # Linux keeps ru_maxrss across fork and exec, so a child would report the parent's peak
    # (the parent trained the trunk); VmHWM is this process image's own peak, and writing 5 to
    # clear_refs resets it to now, so the peak read after training is training's own.
    now = _status_mib("VmRSS")
    if now is None:  # not Linux: ru_maxrss is the best there is (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak / 2**20 if sys.platform == "darwin" else peak / 2**10), False
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return now, False
    return now, True


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last reset, in MiB."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def child(mode: str, folder: Path, config: sc.ScorerConfig) -> dict:
    """Train one scorer from the prepared files and measure it (runs in its own process)."""
    tensors, _ = read_safetensors(folder / "rater.safetensors", ValueError)
    test, _ = read_safetensors(folder / "test.safetensors", ValueError)
    data = latents_file(tensors["latents"], tensors["stars"])
    init = folder / "trunk.safetensors" if mode == "trunk" else None
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = peak_rss_mib()  # torch, timm and the data, before any training
    before, reset = reset_peak_rss()
    began, cpu = time.perf_counter(), time.process_time()
    trained = sc.train(data, config, init=init)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    during = peak_rss_mib()
    peak = max(loaded, during) if reset else during
    pred = sc.predict(trained.model, test["latents"])
    vs_stars = sc.metrics(pred, test["stars"])
    return {
        "mode": mode,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),  # all threads: on a busy machine, less noisy than wall
        "epochs": trained.metrics["epochs"],
        "peak_rss_mib": round(peak, 1),
        "training_rss_mib": round(during - before, 1) if reset else None,
        "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if device.type == "cuda"
        else None,
        "srcc": vs_stars["srcc"],
        "pairwise_accuracy": vs_stars["pairwise_accuracy"],
        "srcc_taste": sc.metrics(pred, test["taste"])["srcc"],
        "val_srcc": trained.metrics["srcc"],
        "device": device.type,
        "threads": torch.get_num_threads(),
    }


def prepare(args: argparse.Namespace, folder: Path) -> dict:
    """Simulate the crowd and the rater, train the trunk (untimed), write the files."""
    world = World(
        WorldConfig(
            side=args.side,
            seed=args.seed,
            crowd_raters=args.crowd_raters,
            crowd_images=args.crowd_images,
        )
    )
    trunk = train_trunk(world, sc.ScorerConfig(), folder / "trunk.safetensors")
    latents, qualities = world.images(args.n)
    test, test_qualities = world.images(args.test)
    rater = world.rater()
    write_atomic(
        folder / "rater.safetensors",
        {"latents": latents, "stars": world.stars(rater, qualities)},
        {},
    )
    test_tensors = {
        "latents": test,
        "stars": world.stars(rater, test_qualities),
        "taste": world.taste(rater, test_qualities),
    }
    write_atomic(folder / "test.safetensors", test_tensors, {})
    return trunk


def measure(mode: str, folder: Path, args: argparse.Namespace) -> dict:
    """Run one mode in a fresh interpreter and return its JSON line."""
    command = [sys.executable, __file__, "--child", mode, "--folder", str(folder)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} run failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def report(result: dict) -> None:
    """Print the table, the ratio and the verdict."""
    runs, trunk, args = result["runs"], result["trunk"], result["args"]
    side = args["side"]
    print(
        f"SYNTHETIC: {args['n']:,} ratings of 4×{side}×{side} latents by one simulated rater;"
        f" held out: {args['test']} images; device {runs[0]['device']},"
        f" {runs[0]['threads']} torch thread(s)"
    )
    print(
        f"trunk (untimed): crowd model from {trunk['ratings']:,} ratings by {trunk['raters']}"
        f" other raters of {trunk['images']:,} other images, {trunk['seconds']} s"
    )
    gpu = runs[0]["gpu_peak_mib"] is not None
    print(
        f"{'mode':<14}{'seconds':>9}{'CPU s':>8}{'epochs':>8}{'peak RSS':>10}{'training':>10}"
        + (f"{'GPU peak':>10}" if gpu else "")
        + f"{'SRCC':>8}{'pairwise':>10}{'SRCC vs taste':>15}"
    )
    mib = lambda value: f"{value:>6.0f} MiB" if value is not None else f"{'?':>10}"  # noqa: E731
    for run in runs:
        line = f"{MODES[run['mode']]:<14}{run['seconds']:>9.1f}{run['cpu_seconds']:>8.1f}"
        line += f"{run['epochs']:>8}"
        line += mib(run["peak_rss_mib"]) + mib(run["training_rss_mib"])
        line += mib(run["gpu_peak_mib"]) if gpu else ""
        line += f"{run['srcc']:>8.3f}{run['pairwise_accuracy']:>10.3f}{run['srcc_taste']:>15.3f}"
        print(line)
    print(
        "(seconds: wall; CPU s: all threads. peak RSS: the whole process, torch included;"
        " training: what training added to it. SRCC and pairwise accuracy against the rater's"
        " held-out stars.)"
    )
    scratch, tuned = runs
    print(f"from trunk / from scratch: {tuned['seconds'] / scratch['seconds']:.2f}× the time")
    verdicts = [
        f"{MODES[run['mode']]} {'PASS' if run['seconds'] <= TARGET_S else 'FAIL'}"
        f" ({run['seconds']:.1f} s)"
        for run in runs
    ]
    print(f"target ≤ {TARGET_S:.0f} s for {args['n']:,} ratings: " + ", ".join(verdicts))
    if (args["n"], side) != (1000, 64):
        print("(the target is set for 1,000 ratings at 4×64×64; these settings differ)")


def main() -> None:
    """Prepare the data and trunk, time both modes in subprocesses, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="the rater's ratings")
    parser.add_argument("--side", type=int, default=64, help="latent side (64 = SD 1.x 512 px)")
    parser.add_argument("--test", type=int, help="held-out images (500; quick: 300)")
    parser.add_argument("--crowd-raters", type=int, help="raters behind the trunk (16; quick: 10)")
    parser.add_argument("--crowd-images", type=int, help="images they rate (1000; quick: 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="a smaller crowd for the trunk")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.folder, sc.ScorerConfig())))
        return
    args.crowd_raters = args.crowd_raters or (10 if args.quick else 16)
    args.crowd_images = args.crowd_images or (500 if args.quick else 1000)
    args.test = args.test or (300 if args.quick else 500)
    with tempfile.TemporaryDirectory(prefix="tastebud-speed-") as folder:
        trunk = prepare(args, Path(folder))
        runs = [measure(mode, Path(folder), args) for mode in MODES]
    result = {"args": vars(args) | {"folder": None}, "trunk": trunk, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
