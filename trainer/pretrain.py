"""Multi-task pretraining: one scorer trunk, several datasets and criteria, one Lion per criterion.

Every criterion (a task) has its own head, a linear layer on the trunk's pooled features, and
its own `timm.optim.Lion` over its head and the shared trunk. Each step, each task in turn draws
a batch, runs trunk and head, backpropagates its own loss and steps its own optimiser.

Why no criterion needs a loss weight: Lion moves every weight by ±lr (the sign of a momentum of
gradients), so multiplying a loss by any c > 0 changes nothing it does (the tests check that a
1024× loss trains the identical net). Each task pulls the trunk equally hard whatever its loss's
units; what balances tasks is how often each steps (once a round, all of them, whatever their
sizes) and the shared lr. The price: with K tasks the trunk moves (and decays) up to K·lr a
round, and K momentum buffers of it are kept; where tasks disagree on a weight's direction their
steps cancel, which is the compromise wanted.

Data: every task runs on a latents file (`trainer.latents`), which records each row's image by
sha256. A task's labels name images by file; the files are hashed to find their rows, so a
latents file from any export of those images fits, in any order, and images it lacks are
skipped and counted (AVA ships with a few missing ones). Hashing reads each image once per run:
minutes for all of AVA, next to the hours its encoding took.

- AVA: `AVA.txt` (`index image_id` ten vote counts for scores 1–10, two tags, challenge) and the
  folder of `{image_id}.jpg` → EMD against the vote distribution over ten bins (as in NIMA).
- Classes: a folder with one subfolder of images per class (sorted names give the indices)
  → cross-entropy.
- Regression: a CSV with `path,score` columns (paths relative to the CSV, or sha256s) → MSE on
  standardised scores: Lion moves the head's bias by at most lr a step, so it would spend
  thousands of steps just reaching a mean far from 0.

The output is a scorer file (`tastebud.scorer`, `trainer.scorer`'s format) whose star head is
untrained: it is a trunk for `python -m trainer.scorer train --init trunk.safetensors`, which
takes its arch and widths from the file, not a scorer to score with.

    python -m trainer.pretrain --ava AVA.txt images/ ava.safetensors \\
        --classes styles/ styles.safetensors --regression scores.csv x.safetensors \\
        --out trunk.safetensors [--steps N] [--seed S] [--config JSON]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import Lion
from torch import nn

from trainer import scorer as sc
from trainer.callbacks import Progress, StopCheck, never_stop, no_progress
from trainer.configs import FromDict
from trainer.device import pick_device
from trainer.latents import LatentsFileError, image_sha256, list_images, load_latents_file
from trainer.tensorfiles import write_atomic

KINDS = ("distribution", "classes", "regression")
AVA_BINS = 10
SHA256 = re.compile(r"[0-9a-f]{64}")


class PretrainDataError(ValueError):
    """A dataset for pretraining is missing, malformed, or has no image in its latents file."""


@dataclass(frozen=True)
class PretrainConfig(FromDict):
    """How the shared trunk is built and pretrained; the saved file records it."""

    arch: str = "resnet18"  # as ScorerConfig: the trunk must be the net a scorer builds
    channels: tuple[int, ...] | None = (32, 64, 128, 256)  # ScorerConfig's default widths,
    # so the default scorer finetunes from it; `--init` takes them from the file either way
    steps: int = 4000  # rounds, one batch per task each; ≈ one pass over AVA's 255k at 64
    batch_size: int = 64  # per task per round; big enough for BatchNorm
    lr: float = 2e-4  # Lion's peak rate: a tenth of the scorer's AdamW rate, as Lion's sign
    # updates move every weight by the full lr (Lion paper: 3–10× lower than AdamW)
    warmup_steps: int = 100  # linear warm-up: a fresh BatchNorm net diverges at full rate
    weight_decay: float = 1e-3  # Lion's decoupled decay scales with lr: 10× AdamW's, same pull
    flip: bool = True  # mirror half of each batch: a mirrored picture keeps its label
    seed: int = 0  # same seed, same tasks → the same trunk

    def scorer_config(self) -> sc.ScorerConfig:
        """The scorer config a trunk of this shape is saved and rebuilt with."""
        return sc.ScorerConfig(arch=self.arch, channels=self.channels)


@dataclass(frozen=True, eq=False)
class Task:
    """One criterion's data: which latents rows it uses, their targets, and its kind of loss."""

    name: str  # how progress messages and the summary refer to it
    kind: str  # "distribution" (EMD), "classes" (cross-entropy) or "regression" (MSE)
    latents: torch.Tensor  # [M,4,H,W]: the whole latents file, indexed by `rows`, never copied
    rows: torch.Tensor  # [N] long: the latents rows that have targets, in target order
    targets: torch.Tensor  # [N,B] distributions, [N] class indices or [N] standardised scores
    outputs: int  # head width: B bins, the number of classes, or 1
    flipped: torch.Tensor | None = None  # [M,4,H,W] mirrored latents; None mirrors on the fly
    info: dict = field(default_factory=dict)  # recorded in the trunk file: sources, classes, …


@dataclass
class PretrainedTrunk:
    """A pretrained trunk (inside a scorer with an untrained star head), its heads, its record."""

    model: sc.Scorer
    heads: nn.ModuleList  # one per task, in task order; not saved (the trunk is the product)
    config: PretrainConfig
    tasks: list[dict]  # per task: name, kind, rows, info, first_loss, final_loss
    steps: int  # rounds run (fewer than config.steps when stopped)
    seconds: float
    input_shape: list[int]  # [4, H, W] of the latents it was trained on


# ---- datasets -------------------------------------------------------------------------------


def read_ava(path: str | Path) -> tuple[list[str], torch.Tensor]:
    """Read AVA.txt: the image ids and their vote distributions over scores 1–10 ([N,10])."""
    path = Path(path)
    if not path.is_file():
        raise PretrainDataError(f"no AVA file at {path}")
    ids, votes = [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                values = [int(value) for value in line.split()]
            except ValueError:
                values = []
            if len(values) != 15 or min(values) < 0:
                raise PretrainDataError(
                    f"{path} line {number}: expected 15 whole numbers (index, image id, ten vote"
                    f" counts, two tags, challenge), not {line.strip()[:80]!r}"
                )
            if sum(values[2:12]) == 0:
                raise PretrainDataError(f"{path} line {number}: image {values[1]} has no votes")
            ids.append(str(values[1]))
            votes.append(values[2:12])
    if not ids:
        raise PretrainDataError(f"{path} holds no AVA lines")
    counts = torch.tensor(votes, dtype=torch.float32)
    return ids, counts / counts.sum(-1, keepdim=True)


def ava_task(
    ava_txt: str | Path, images: str | Path, latents: str | Path, name: str = "ava"
) -> Task:
    """An EMD task from AVA.txt, the folder of `{image_id}.jpg`, and those images' latents file."""
    ids, distributions = read_ava(ava_txt)
    if not Path(images).is_dir():
        raise PretrainDataError(f"no AVA image folder at {images}")
    files = [Path(images) / f"{image_id}.jpg" for image_id in ids]
    info = {"source": str(ava_txt), "images": str(images)}
    return _task(name, "distribution", files, distributions, AVA_BINS, latents, info)


def classes_task(folder: str | Path, latents: str | Path, name: str | None = None) -> Task:
    """A cross-entropy task from a folder with a subfolder of images per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainDataError(f"no class folder at {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise PretrainDataError(f"{folder} needs a subfolder per class, two or more: {classes}")
    files, labels = [], []
    for index, label in enumerate(classes):
        found = [path for path, _ in list_images([folder / label])]
        if not found:
            raise PretrainDataError(f"class {label!r} ({folder / label}) holds no images")
        files += found
        labels += [index] * len(found)
    info = {"source": str(folder), "classes": classes}
    name = name or f"classes:{folder.name}"
    task = _task(name, "classes", files, torch.tensor(labels), len(classes), latents, info)
    absent = [label for index, label in enumerate(classes) if not (task.targets == index).any()]
    if absent:
        raise PretrainDataError(f"class {absent[0]!r} of {folder} has no image in {latents}")
    return task


def regression_task(csv_path: str | Path, latents: str | Path, name: str | None = None) -> Task:
    """An MSE task from a `path,score` CSV (paths relative to it, or sha256s), standardised."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise PretrainDataError(f"no CSV at {csv_path}")
    files, scores = [], []
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or not {"path", "score"} <= set(reader.fieldnames):
            raise PretrainDataError(f"{csv_path}: needs a header with 'path' and 'score' columns")
        for line, row in enumerate(reader, start=2):
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):
                raise PretrainDataError(
                    f"{csv_path} line {line}: score {row['score']!r} is not a number"
                )
            image = (row["path"] or "").strip()
            is_sha256 = SHA256.fullmatch(image.lower())
            files.append(image.lower() if is_sha256 else csv_path.parent / image)
            scores.append(score)
    info = {"source": str(csv_path)}
    name = name or f"regression:{csv_path.stem}"
    task = _task(name, "regression", files, torch.tensor(scores), 1, latents, info)
    mean, std = task.targets.mean(), task.targets.std(correction=0)
    if not std > 0:
        raise PretrainDataError(f"{csv_path}: the scores of its encoded images are all equal")
    info = {**task.info, "mean": round(float(mean), 6), "std": round(float(std), 6)}
    return replace(task, targets=(task.targets - mean) / std, info=info)


def _task(
    name: str,
    kind: str,
    files: Sequence[Path | str],
    targets: torch.Tensor,
    outputs: int,
    latents: str | Path,
    info: dict,
) -> Task:
    """Find each labelled image (a file, or a sha256 string) in the latents file; keep those found.

    Rows are matched by sha256, the latents file's record of its images, so any export of the
    images fits, in any order. An image it lacks (or a file that is gone) is skipped and counted.
    """
    data = load_latents_file(latents)
    if data.sha256s is None:
        raise PretrainDataError(
            f"{latents} does not record its images' sha256s; export it with"
            " `python -m trainer.latents export`"
        )
    row_of = {sha: row for row, sha in enumerate(data.sha256s)}
    kept, rows = [], []
    for index, image in enumerate(files):
        if isinstance(image, Path):
            image = image_sha256(image) if image.is_file() else None
        if image in row_of:
            kept.append(index)
            rows.append(row_of[image])
    if not kept:
        raise PretrainDataError(
            f"none of the {len(files)} images of {info['source']} is in {latents}; encode them"
            " with `python -m trainer.latents export`"
        )
    return Task(
        name=name,
        kind=kind,
        latents=data.latents,
        rows=torch.tensor(rows, dtype=torch.long),
        targets=targets[kept],
        outputs=outputs,
        flipped=data.flipped,
        info={**info, "latents": str(latents), "skipped": len(files) - len(kept)},
    )


# ---- training -------------------------------------------------------------------------------


def task_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One task's loss on its head's outputs: EMD, cross-entropy or MSE, whatever its scale."""
    if kind == "distribution":
        return sc.emd_loss(outputs.softmax(-1), targets)
    if kind == "classes":
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs.squeeze(-1), targets)


def _check(tasks: Sequence[Task]) -> list[int]:
    """Refuse tasks the loop cannot train; return the latents' shared [4, H, W]."""
    if not tasks:
        raise ValueError("pretraining needs at least one task")
    shapes = {tuple(task.latents.shape[1:]) for task in tasks}
    if len(shapes) > 1:
        raise ValueError(f"the tasks' latents differ in shape {sorted(shapes)}: one VAE, one size")
    for task in tasks:
        if task.kind not in KINDS:
            raise ValueError(f"task {task.name!r}: kind {task.kind!r} is not one of {KINDS}")
        if len(task.rows) < 2 or len(task.rows) != len(task.targets):
            raise ValueError(
                f"task {task.name!r}: needs two or more rows, one target each"
                f" ({len(task.rows)} rows, {len(task.targets)} targets)"
            )
        targets, width = task.targets, task.outputs
        fits = {
            "distribution": targets.ndim == 2 and targets.shape[1] == width,
            "classes": targets.ndim == 1
            and not targets.is_floating_point()
            and bool(((targets >= 0) & (targets < width)).all()),
            "regression": targets.ndim == 1 and width == 1,
        }
        if not fits[task.kind]:
            raise ValueError(f"task {task.name!r}: its targets do not fit a head of {width}")
    return list(shapes.pop())


def _lr(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch(
    task: Task, config: PretrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch (with replacement, so tasks of any size keep step), half of it mirrored."""
    pick = torch.randint(len(task.rows), (config.batch_size,), generator=generator)
    rows = task.rows[pick]
    x = task.latents[rows]
    if config.flip:
        mirror = (torch.rand(len(rows), generator=generator) < 0.5).view(-1, 1, 1, 1)
        x = torch.where(mirror, task.flipped[rows] if task.flipped is not None else x.flip(-1), x)
    return x, task.targets[pick]


def _pooled(model: sc.Scorer, x: torch.Tensor) -> torch.Tensor:
    """The trunk's pooled features (all of the net but its star head): what every head reads."""
    return model.net.forward_head(model.net.forward_features(x), pre_logits=True)


def pretrain(
    tasks: Sequence[Task],
    config: PretrainConfig | None = None,
    *,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> PretrainedTrunk:
    """Train one trunk on several tasks, each with its own head and Lion, stepped in turn."""
    config = config or PretrainConfig()
    input_shape = _check(tasks)
    started = time.perf_counter()
    device = pick_device()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's stream
        torch.manual_seed(config.seed)
        model = sc.Scorer(config.scorer_config())
        width = model.net.num_features
        heads = nn.ModuleList(nn.Linear(width, task.outputs) for task in tasks)
    model.to(device).train()
    heads.to(device).train()
    # The star head (fc) is left out: no task uses it, and `--init` finetuning trains it anew.
    trunk = [p for name, p in model.net.named_parameters() if not name.startswith("fc.")]
    optimizers = [
        Lion([*trunk, *head.parameters()], lr=config.lr, weight_decay=config.weight_decay)
        for head in heads
    ]
    losses: list[list[float]] = [[] for _ in tasks]
    rounds = 0
    for step in range(config.steps):
        if should_stop():
            break
        lr = _lr(step, config)
        for task, head, optimizer, history in zip(tasks, heads, optimizers, losses, strict=True):
            x, target = _batch(task, config, generator)
            loss = task_loss(task.kind, head(_pooled(model, x.to(device))), target.to(device))
            # Each task's optimiser clears the trunk's gradients too: no task's gradient may
            # leak into another's step.
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            history.append(loss.item())  # a CPU–GPU sync point; cheap next to the step itself
        rounds = step + 1
        latest = ", ".join(f"{t.name} {h[-1]:.3f}" for t, h in zip(tasks, losses, strict=True))
        progress(rounds, config.steps, f"step {rounds}: {latest}")

    model.eval()
    heads.eval()
    window = max(1, rounds // 10)  # loss means over the first and last tenth of the run
    summary = [
        {
            "name": task.name,
            "kind": task.kind,
            "rows": len(task.rows),
            **task.info,
            "first_loss": round(sum(h[:window]) / window, 4) if h else None,
            "final_loss": round(sum(h[-window:]) / window, 4) if h else None,
        }
        for task, h in zip(tasks, losses, strict=True)
    ]
    return PretrainedTrunk(
        model=model.cpu(),
        heads=heads.cpu(),
        config=config,
        tasks=summary,
        steps=rounds,
        seconds=round(time.perf_counter() - started, 2),
        input_shape=input_shape,
    )


# ---- files ----------------------------------------------------------------------------------


def save_trunk(path: str | Path, trained: PretrainedTrunk) -> None:
    """Write the trunk as a scorer file (star head untrained) for `trainer.scorer --init`."""
    metadata = {
        # The keys `trainer.scorer.save_scorer` writes, so load_scorer and `--init` read it.
        "format": sc.FORMAT,
        "version": sc.FORMAT_VERSION,
        "arch": trained.config.arch,
        "input_shape": json.dumps(trained.input_shape),
        "config": json.dumps(asdict(trained.config.scorer_config())),
        "metrics": json.dumps({}),  # a trunk has no star metrics: its star head is untrained
        "ratings": "0",
        "pairs": "0",
        "init": "scratch",
        # What made it.
        "pretrain": json.dumps(asdict(trained.config)),
        "tasks": json.dumps(trained.tasks),
        "steps": str(trained.steps),
    }
    write_atomic(Path(path), sc.scorer_tensors(trained.model), metadata)


# ---- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Pretrain a trunk on AVA, class folders and scored CSVs: `python -m trainer.pretrain`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.pretrain")
    parser.add_argument(
        "--ava",
        nargs=3,
        action="append",
        default=[],
        metavar=("AVA_TXT", "IMAGES", "LATENTS"),
        help="AVA.txt, the folder of its {image_id}.jpg, and their latents file",
    )
    parser.add_argument(
        "--classes",
        nargs=2,
        action="append",
        default=[],
        metavar=("FOLDER", "LATENTS"),
        help="a folder with a subfolder of images per class, and their latents file",
    )
    parser.add_argument(
        "--regression",
        nargs=2,
        action="append",
        default=[],
        metavar=("CSV", "LATENTS"),
        help="a CSV with path,score columns, and the images' latents file",
    )
    parser.add_argument("--out", required=True, help="the trunk .safetensors to write")
    parser.add_argument(
        "--steps", type=int, default=PretrainConfig.steps, help="rounds, one batch per task each"
    )
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed, help="same seed, same net")
    parser.add_argument("--config", help="JSON object of further PretrainConfig settings")
    args = parser.parse_args(argv)
    if not (args.ava or args.classes or args.regression):
        parser.error("give at least one task: --ava, --classes or --regression")
    try:
        settings = json.loads(args.config) if args.config else {}
        settings.update(steps=args.steps, seed=args.seed)
        config = PretrainConfig.from_dict(settings)
        tasks = [ava_task(*paths) for paths in args.ava]
        tasks += [classes_task(*paths) for paths in args.classes]
        tasks += [regression_task(*paths) for paths in args.regression]
        trained = pretrain(tasks, config)
        save_trunk(args.out, trained)
    except (LatentsFileError, TypeError, ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    summary = {"out": args.out, "steps": trained.steps, "seconds": trained.seconds}
    summary["tasks"] = trained.tasks
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
