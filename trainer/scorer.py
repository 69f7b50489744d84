"""The personal scorer: a timm ResNet on 4×H×W VAE latents that predicts a 1–5 star score.

The network's head gives five logits, a distribution over the star bins; the score is that
distribution's mean, so it lies in [1, 5] by construction and one model serves all three
losses: MSE on the score, earth mover's distance on the distribution, and Bradley–Terry on
pairs (explicit picks, and the pairs that differing star ratings imply).

From scratch the whole net trains. From a trained trunk (`init`), everything but the last
stage is frozen, its features are computed once and cached, and only the last stage and the
head train: that is what makes a personal scorer from 1,000 ratings quick on a CPU.

    python -m trainer.scorer train --data x.safetensors --out scorer.safetensors [--init T]
    python -m trainer.scorer score --model scorer.safetensors --data x.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from trainer.callbacks import Progress, StopCheck, never_stop, no_progress
from trainer.configs import FromDict
from trainer.device import pick_device  # not trainer.base: diffusers takes ~10 s to import
from trainer.latents import LatentsFile, LatentsFileError, load_latents_file
from trainer.tensorfiles import read_safetensors, write_atomic

FORMAT = "tastebud.scorer"
FORMAT_VERSION = "3"  # 3: layout maps in the statistics; 2: the statistics head; all still load
STARS = 5
BOOTSTRAP = 8  # resampled ridge fits a scorer keeps for its uncertainty
Pick = tuple[int, int, float]  # (row i, row j, outcome): 1 = i wins, 0 = j wins, 0.5 = tie


class ScorerFileError(ValueError):
    """A scorer file is missing, not safetensors, or not a scorer this code can build."""


@dataclass(frozen=True)
class ScorerConfig(FromDict):
    """How a scorer is built and trained; the web layer fills this from app config."""

    arch: str = "resnet18"  # timm ResNet: small, and its stages split cleanly into trunk/last
    channels: tuple[int, ...] | None = (32, 64, 128, 256)  # stage widths; half of resnet18's
    # so a CPU trains 1,000 ratings from scratch in under a minute; None = the arch's own
    epochs: int = 8  # upper bound (cosine lr spans it); 8 fit 1,000 CPU ratings in under a minute
    patience: int = 3  # epochs without a better held-out SRCC before training stops
    min_steps: int = 100  # few ratings make short epochs: run more of them (and scale the
    # patience) so 10–100 ratings still get enough optimiser steps to leave the warm-up
    batch_size: int = 64  # big enough for BatchNorm and for many implied pairs per batch
    lr: float = 2e-3  # AdamW peak rate; short runs need a brisk rate, cosine-decayed to 0
    warmup_steps: int = 20  # linear warm-up: a fresh BatchNorm net diverges at full rate
    weight_decay: float = 1e-4  # light: few samples, but augmentation does most regularising
    val_fraction: float = 0.2  # share of images held out for metrics and early stopping
    seed: int = 0  # same seed, same data → the same model and metrics
    mse_weight: float = 1.0  # squared error on the score: the plain regression signal
    emd_weight: float = 1.0  # earth mover's distance over star bins: ordinal-aware
    bt_weight: float = 0.5  # Bradley–Terry on pairs: what the user ranks, not the level
    bt_scale: float = 2.0  # logits per star of score gap: one star apart ≈ 88% win chance
    pick_batch: int = 32  # explicit picks drawn per step, when there are any
    max_shift: int = 2  # translation augmentation, in latent pixels (8 image pixels each)
    flip: bool = True  # mirror augmentation: a mirrored picture is rated the same
    # A linear head on fixed multi-scale statistics of the latents (per-channel levels, spread,
    # detail, layout), beside the CNN: global tastes (colour, contrast, smoothness, where the
    # weight of a picture sits) are one linear step away instead of something the CNN must find.
    # It starts as a ridge regression fitted in closed form on the training ratings, and from
    # scratch the CNN's last layer starts at zero: training begins at that baseline, and the
    # held-out check before the first epoch keeps it if the CNN never does better.
    # 0: no statistics head; 1: the summary statistics; 2: those and the layout maps (where a
    # picture's energy sits, on 4×4 to 32×32 grids), whose weight in the ridge fit is chosen by
    # cross-validation, so a taste for composition is within reach without costing the others
    stats: int = 2
    baseline_margin: float = 0.01  # held-out SRCC a trained epoch must add to replace it
    # ... and in this share of paired bootstrap resamples of the held-out images it must rank
    # them better than the fitted head alone: a fifth of a few dozen ratings is a noisy judge,
    # and the best of many epochs beats a sound baseline by luck (bench/README.md, the choice)
    baseline_confidence: float = 0.95


LAYOUT_GRIDS = (4, 8, 16, 32)  # where the energy sits, coarse to fine (composition)
LAYOUT_SCALES = (0.0, 0.3, 1.0)  # the layout maps' weight against the summary, chosen by CV


STAT_GROUPS = ("level", "energy", "spread", "detail", "balance", "layout")
LAYOUT = STAT_GROUPS.index("layout")  # the layout maps' group: its share is chosen first


def latent_stats(x: torch.Tensor, version: int = 2) -> torch.Tensor:
    """[N,4,H,W] latents → [N,K] statistics a taste may weigh, whatever the latent size.

    Summary (version 1), per channel: the mean on 1×1, 2×2, 3×3 and 4×4 grids (colour, and
    where it sits: centre, border, top, thirds); the root mean square on 3×3, 5×5, 6×6 and 9×9
    grids (where the energy sits); the spread on 1×1 and 2×2 (contrast); first-difference and
    Laplacian energy on 1×1 and 2×2 (detail against smoothness); and, between channels, the
    covariances, the gaps between their means and the products of their means (balance, and
    a liked middle level). Version 2 adds the layout maps: the mean energy over the channels
    on `LAYOUT_GRIDS` grids, fine enough to find a liking for any place in the frame.
    """
    return torch.cat([part for _, part in _stat_parts(x, version)], 1)


def _stat_parts(x: torch.Tensor, version: int) -> list[tuple[str, torch.Tensor]]:
    """`latent_stats`, part by part, each with its group (`STAT_GROUPS`)."""
    x = x.float()
    parts = [("level", F.adaptive_avg_pool2d(x, grid).flatten(1)) for grid in (1, 2, 3, 4)]
    parts += [
        ("energy", F.adaptive_avg_pool2d(x.square(), grid).sqrt().flatten(1))
        for grid in (3, 5, 6, 9)
    ]
    for grid in (1, 2):
        mean = F.adaptive_avg_pool2d(x, grid)
        square = F.adaptive_avg_pool2d(x.square(), grid)
        spread = (square - mean.square()).clamp_min(0).add(1e-6).sqrt()
        parts.append(("spread", spread.flatten(1)))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]
    lap = (lap - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs()
    for energy in (dx, dy, lap):
        parts += [("detail", F.adaptive_avg_pool2d(energy, grid).flatten(1)) for grid in (1, 2)]
    flat = x.flatten(2) - x.flatten(2).mean(-1, keepdim=True)
    covariance = flat @ flat.transpose(1, 2) / flat.shape[-1]
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    means = x.mean((2, 3))
    a, b = torch.triu_indices(x.shape[1], x.shape[1])  # pairs with repeats: squares too
    parts += [
        ("balance", covariance[:, i, j]),
        ("balance", (means[:, i] - means[:, j]).abs()),
        ("balance", means[:, a] * means[:, b]),
    ]
    if version >= 2:
        energy = x.square().mean(1, keepdim=True)
        for grid in LAYOUT_GRIDS:
            # a grid finer than the latents would only repeat their pixels, and repeats weigh
            # more in a ridge fit: the latents' own pixels, zeros for the rest (same width)
            fine = min(grid, *x.shape[-2:])
            pooled = F.adaptive_avg_pool2d(energy, fine).flatten(1)
            parts.append(("layout", F.pad(pooled, (0, grid * grid - pooled.shape[1]))))
    return parts


def stats_groups(version: int = 2, channels: int = 4) -> torch.Tensor:
    """Each statistic's group, as an index into `STAT_GROUPS`."""
    parts = _stat_parts(torch.zeros(1, channels, 8, 8), version)
    return torch.cat(
        [torch.full((part.shape[1],), STAT_GROUPS.index(group)) for group, part in parts]
    )


def stats_of(latents: torch.Tensor, version: int = 2, batch: int = 256) -> torch.Tensor:
    """`latent_stats` of many latents, a batch at a time, on the CPU."""
    return torch.cat([latent_stats(part, version) for part in latents.cpu().split(batch)])


def stats_width(version: int = 2, channels: int = 4) -> int:
    """How many statistics `latent_stats` gives for latents of `channels` channels."""
    return latent_stats(torch.zeros(1, channels, 8, 8), version).shape[1]


def layout_mask(version: int = 2, channels: int = 4) -> torch.Tensor:
    """Which of the statistics are layout maps (their weight is chosen apart)."""
    return stats_groups(version, channels) == LAYOUT


class Scorer(nn.Module):
    """A timm ResNet with five star-bin logits; `forward` returns the mean star, in [1, 5].

    With `config.stats`, a linear head on the standardised `latent_stats` adds its logits to
    the CNN's. Its standardisation (`stats_mean`, `stats_std`) is set from the training data.
    """

    def __init__(self, config: ScorerConfig):
        super().__init__()
        extra = {"channels": config.channels} if config.channels else {}
        self.net = timm.create_model(
            config.arch, pretrained=False, in_chans=4, num_classes=STARS, **extra
        )
        if not hasattr(self.net, "layer4"):
            raise ValueError(f"{config.arch!r} is not a timm ResNet (it has no layer4)")
        self.register_buffer("stars", torch.arange(1.0, STARS + 1), persistent=False)
        self.stats_head: nn.Linear | None = None
        self.stats_version = int(config.stats)
        if config.stats:
            width = stats_width(self.stats_version)
            self.stats_head = nn.Linear(width, STARS)
            nn.init.zeros_(self.stats_head.weight)  # starts as the CNN alone
            nn.init.zeros_(self.stats_head.bias)
            self.register_buffer("stats_mean", torch.zeros(width))
            self.register_buffer("stats_std", torch.ones(width))
            # ridge fits on bootstrap resamples of the ratings ([weights, intercept] rows):
            # how far they disagree on an image is how unsure the scorer is of it
            self.register_buffer("stats_bootstrap", torch.zeros(BOOTSTRAP, width + 1))
            # the ridge fit's choices: each statistic's weight (the layout maps' share) and
            # the penalty, kept so that what to rate next is judged by the same fit
            self.register_buffer("stats_scale", torch.ones(width))
            self.register_buffer("stats_alpha", torch.tensor(RIDGE_ALPHAS[-1]))
            # a crowd model's: the directions its raters' tastes span (zeros: none known)
            self.register_buffer("stats_tastes", torch.zeros(TASTES, width))

    def fit_stats(self, latents: torch.Tensor) -> None:
        """Standardise the statistics head's inputs on these latents (all of them: no labels)."""
        if self.stats_head is not None:
            found = stats_of(latents, self.stats_version)
            self.stats_mean.copy_(found.mean(0))
            self.stats_std.copy_(found.std(0).clamp_min(1e-4) if len(found) > 1 else 1)

    def standardised_stats(self, latents: torch.Tensor) -> torch.Tensor:
        """The statistics head's inputs for raw latents, on the CPU."""
        return (
            stats_of(latents, self.stats_version) - self.stats_mean.cpu()
        ) / self.stats_std.cpu()

    def _stats_logits(self, stats: torch.Tensor) -> torch.Tensor:
        return self.stats_head((stats - self.stats_mean) / self.stats_std * self.stats_scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Five star-bin logits for raw latents."""
        out = self.net(x)
        if self.stats_head is None:
            return out
        return out + self._stats_logits(latent_stats(x, self.stats_version))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the last stage: the part frozen and cached when finetuning.

        Returned packed, one flat row per input: the stage-3 features, then the statistics.
        """
        net = self.net
        features = net.maxpool(net.act1(net.bn1(net.conv1(x))))
        features = net.layer3(net.layer2(net.layer1(features)))
        self._feature_shape = features.shape[1:]
        packed = [features.flatten(1)]
        if self.stats_head is not None:
            packed.append(latent_stats(x, self.stats_version))
        return torch.cat(packed, 1)

    def head_logits(self, packed: torch.Tensor) -> torch.Tensor:
        """The last stage, pooling and the five-logit head, from `trunk`'s packed rows."""
        size = math.prod(self._feature_shape)
        features = packed[:, :size].view(len(packed), *self._feature_shape)
        out = self.net.forward_head(self.net.layer4(features))
        if self.stats_head is not None:
            out = out + self._stats_logits(packed[:, size:])
        return out

    def to_score(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(-1) * self.stars).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_score(self.logits(x))


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
CHOOSE_AGAIN_BELOW = 500  # ratings under which the refit on all of them chooses afresh: at 1,000
# choosing again costs ~17 s of cross-validation and changes little (bench/README.md, the choice)
FEW_FOR_CV = 8  # under this many rated training rows, no cross-validation: the largest alpha
# (5 folds of 8 rows are noisy, but the choice between a crowd's say and none is one comparison,
# and the largest alpha alone let a crowd unlike the person outvote their first ratings)


def _ridge_path(z: torch.Tensor, r: torch.Tensor, alphas: Sequence[float]) -> list[torch.Tensor]:
    """Ridge weights of centred targets r on z for each penalty, from one eigendecomposition
    (of the n×n kernel when there are fewer rows than statistics, else of the p×p Gram)."""
    if len(z) < z.shape[1]:
        lam, u = torch.linalg.eigh(z @ z.T)
        ur = u.T @ r
        return [z.T @ (u @ (ur / (lam + alpha))) for alpha in alphas]
    lam, v = torch.linalg.eigh(z.T @ z)
    vr = v.T @ (z.T @ r)
    return [v @ (vr / (lam + alpha)) for alpha in alphas]


def ridge(z: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of y on standardised z: (weights, intercept), in closed form."""
    z, y = z.double(), y.double()
    mean = y.mean()
    return _ridge_path(z, y - mean, [alpha])[0].float(), mean.float()


TASTE_WEIGHTS = (0.0, 10.0, 30.0, 100.0)  # how far a fit may lean on the crowd's tastes
TASTES = 8  # taste directions a crowd model keeps (see trainer.crowd.taste_directions)


@dataclass(frozen=True)
class RidgeDesign:
    """How the statistics become a ridge fit's features: each statistic's scale (the layout
    maps' share), and, from a crowd, the directions its raters' tastes span, as extra
    features with their own weight: a prior that a person's taste is likely one of theirs."""

    scale: torch.Tensor  # [width]
    tastes: torch.Tensor | None = None  # [k, width], in the scaled statistics
    taste_weight: float = 0.0

    @property
    def leans(self) -> bool:
        """Whether the fit leans on the crowd's tastes at all."""
        return self.tastes is not None and bool(self.taste_weight)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        scaled = z * self.scale.to(z.dtype)
        if not self.leans:
            return scaled
        return torch.cat([scaled, self.taste_weight * scaled @ self.tastes.to(z.dtype).T], 1)

    def fold(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights on `features` → the same fit's weights on the scaled statistics."""
        if not self.leans:
            return weights
        width = len(self.scale)
        extra = self.tastes.to(weights.dtype).T @ weights[width:]
        return weights[:width] + self.taste_weight * extra


def designs(
    layout: torch.Tensor, shares: Sequence[float], tastes: torch.Tensor | None = None
) -> list[RidgeDesign]:
    """Every design to try: each layout share, with each taste weight when there are tastes."""
    shares = shares if layout.any() else (1.0,)
    found = tastes is not None and bool(tastes.any())
    return [
        RidgeDesign(torch.where(layout, share, 1.0), tastes if found else None, weight)
        for share in shares
        for weight in (TASTE_WEIGHTS if found else (0.0,))
    ]


def ridge_choice(
    z: torch.Tensor,
    y: torch.Tensor,
    candidates: Sequence[RidgeDesign],
    start: torch.Tensor | float = 0.0,
    folds: int = 5,
) -> tuple[float, float, RidgeDesign]:
    """Fit y as `start` plus a ridge regression on the statistics z: the penalty and the
    design (of `candidates`) with the best cross-validated rank correlation of the whole
    prediction. Returns (that correlation, alpha, design); with too few rows to judge, (nan,
    the largest penalty, the first design)."""
    if len(y) < FEW_FOR_CV:
        return math.nan, RIDGE_ALPHAS[-1], candidates[0]
    z, y = z.double(), y.double()
    start = torch.as_tensor(start, dtype=torch.float64).expand(len(y))
    fold = torch.arange(len(y)) % folds
    target = torch.from_numpy(rankdata(y))
    found = {}
    for d, design in enumerate(candidates):
        x = design.features(z)
        right = start.repeat(len(RIDGE_ALPHAS), 1)
        for k in range(folds):
            fit, out = fold != k, fold == k
            residual = y[fit] - start[fit]
            mean = residual.mean()
            paths = _ridge_path(x[fit], residual - mean, RIDGE_ALPHAS)
            for a, weights in enumerate(paths):
                right[a, out] += x[out] @ weights + mean
        for a, alpha in enumerate(RIDGE_ALPHAS):
            found[alpha, d] = _pearson(torch.from_numpy(rankdata(right[a])), target)
    alpha, d = max(found, key=found.get)
    return found[alpha, d], alpha, candidates[d]


GROUP_SCALES = (0.0, 0.3, 1.0, 3.0)  # what a group of statistics may weigh, against the rest


def refine_groups(
    z: torch.Tensor,
    y: torch.Tensor,
    found: tuple[float, float, RidgeDesign],
    groups: torch.Tensor,
    start: torch.Tensor | float = 3.0,
    frozen: Sequence[int] = (),
) -> tuple[float, float, RidgeDesign]:
    """Let each group of statistics (`STAT_GROUPS`) weigh what the ratings say it should.

    One ridge penalty for every statistic spreads a taste for one global quantity (a middle
    brightness, the balance of two channels) over hundreds of unrelated ones. Here, one group
    at a time, the group's scale is tried at each of `GROUP_SCALES` (0 leaves it out), and
    kept when cross-validation says the whole fit ranks better; `found` is `ridge_choice`'s
    answer to start from, and the same is returned, improved or not. `frozen` groups keep
    their scale."""
    quality, alpha, design = found
    if math.isnan(quality):
        return found
    for group in range(len(STAT_GROUPS)):
        members = groups == group
        if not members.any() or group in frozen:
            continue
        current = float(design.scale[members][0])
        trials = [
            replace(design, scale=torch.where(members, scale, design.scale))
            for scale in GROUP_SCALES
            if scale != current
        ]
        tried = ridge_choice(z, y, trials, start)
        if tried[0] > quality:
            quality, alpha, design = tried
    return quality, alpha, design


def fit_stats_head(
    model: Scorer,
    latents: torch.Tensor,
    scores: torch.Tensor,
    rows: torch.Tensor,
    on_top: bool = False,
    picks: Sequence[Pick] = (),
    again: bool = False,
) -> float:
    """Set the statistics head to a ridge regression of the stars on the statistics.

    Logit k gets ½·(k−3)·(r−3) for a ridge prediction r (in stars): the softmax mean over the
    bins then rises with r and stays near it (≈ 3 + (r−3) for moderate r), so training starts
    from the baseline's ranking. With `on_top` (a crowd model's head is loaded) the ridge fits
    what the crowd model's scores leave unexplained and is added to that head; how much of
    the crowd's say to keep (`CROWD_WEIGHTS`: all, half, none) is chosen by cross-validation
    on these ratings with the rest, so a taste unlike the crowd's sets the crowd aside. The
    penalty and the layout maps' weight are chosen by cross-validation (`ridge_choice`).
    Returns the crowd weight kept (1 without a crowd).

    Someone with no stars yet but `picks` (rows of the same latents) gets a ridge fit of the
    picks instead: each pick's statistics difference against one star for its winner.
    `again` fits once more with the penalty and scales chosen before (on more rows).
    """
    rows = rows[torch.isfinite(scores[rows])]
    with torch.no_grad():
        if len(rows) >= 2:
            z, y = model.standardised_stats(latents[rows]), scores[rows].float()
        elif len(picks) >= 2 and not on_top:
            z, y = _pick_differences(model, latents, picks)
        else:
            return 1.0
        groups = stats_groups(model.stats_version, latents.shape[1])
        crowd_scale = model.stats_scale.clone()
        kept, start = 1.0, 3.0
        if again:
            alpha, design = float(model.stats_alpha), RidgeDesign(crowd_scale)
        elif on_top:
            kept, start, (_, alpha, design) = _crowd_weight(model, latents[rows], z, y, groups)
        else:
            found = ridge_choice(z, y, designs(groups == LAYOUT, LAYOUT_SCALES), start)
            _, alpha, design = refine_groups(z, y, found, groups, start)
        # A crowd head that keeps a say reads the statistics at the scale it was fitted on:
        # the personal weights are carried over to it (a group it left out stayed out).
        scale = crowd_scale if on_top and kept else design.scale
        onto = torch.where(scale > 0, design.scale / scale.clamp_min(1e-12), 0.0)
        x = design.features(z)
        weights, intercept = ridge(x, y - start, alpha)
        weights = design.fold(weights) * onto
        generator = torch.Generator().manual_seed(len(y))
        for b in range(BOOTSTRAP):
            drawn = torch.randint(len(y), (len(y),), generator=generator)
            w, c = ridge(x[drawn], (y - start)[drawn], alpha)
            model.stats_bootstrap[b] = torch.cat([design.fold(w) * onto, c.view(1)])
        model.stats_scale.copy_(scale)
        model.stats_alpha.fill_(alpha)
        bins = 0.5 * (model.stars - 3)
        head = model.stats_head
        if not on_top:
            head.weight.zero_()
            head.bias.zero_()
        head.weight += bins[:, None] * weights[None, :]  # on the scaled statistics
        head.bias += bins * (intercept if len(rows) >= 2 else 0.0)  # differences: no level
    return kept


CROWD_SAY = ("net.fc.", "stats_head.", "stats_scale")  # what a personal fit scales or sets
CROWD_WEIGHTS = (1.0, 0.5, 0.0)  # how much of a crowd model's say a personal fit may keep


def _crowd_weight(
    model: Scorer, latents: torch.Tensor, z: torch.Tensor, y: torch.Tensor, groups: torch.Tensor
) -> tuple[float, torch.Tensor | float, tuple[float, float, RidgeDesign]]:
    """Scale a crowd-started model's own say (its last layer and statistics head) to the
    weight in `CROWD_WEIGHTS` whose scores, plus a personal ridge fit, best predict y in
    cross-validation. Returns that weight, the scaled model's scores of `latents` (the start
    the personal fit adds to) and that fit's `ridge_choice`, its groups of statistics weighed
    (`refine_groups`), except a group the crowd's head left out while it keeps a say."""
    model.eval()
    layout = groups == LAYOUT
    parts = [model.net.fc.weight, model.net.fc.bias, model.stats_head.weight, model.stats_head.bias]
    crowd = [part.detach().clone() for part in parts]
    crowd_share = model.stats_scale[layout][:1].tolist()  # the share the crowd's head was fit on

    def weigh(weight: float) -> torch.Tensor:
        for part, value in zip(parts, crowd, strict=True):
            part.copy_(value * weight)
        return torch.cat([model(chunk) for chunk in latents.split(256)])

    found = {}
    tastes = model.stats_tastes
    left_out = [g for g in range(len(STAT_GROUPS)) if (model.stats_scale[groups == g] == 0).any()]
    for weight in CROWD_WEIGHTS:
        start = weigh(weight)
        shares = crowd_share if weight else LAYOUT_SCALES  # no crowd head left: choose afresh
        choice = ridge_choice(z, y, designs(layout, shares, tastes), start)
        frozen = left_out if weight else ()  # what the crowd's head can't read stays out
        found[weight] = (refine_groups(z, y, choice, groups, start, frozen), start)
    judged = {w: f for w, f in found.items() if not math.isnan(f[0][0])}
    best = max(judged, key=lambda w: judged[w][0][0]) if judged else CROWD_WEIGHTS[0]
    weigh(best)
    return best, found[best][1], found[best][0]


def _pick_differences(
    model: Scorer, latents: torch.Tensor, picks: Sequence[Pick]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks as ridge rows: the two sides' statistics difference, and the star gap it implies
    (+1 for the first side's win, −1 for its loss, 0 for a tie), every other pick turned
    round so the targets centre on zero."""
    pairs = torch.tensor(picks, dtype=torch.float32).view(-1, 3)
    first, second = pairs[:, 0].long(), pairs[:, 1].long()
    z = model.standardised_stats(latents[first]) - model.standardised_stats(latents[second])
    sign = 1 - 2 * (torch.arange(len(pairs)) % 2).float()
    return z * sign[:, None], (2 * pairs[:, 2] - 1) * sign


@dataclass
class TrainedScorer:
    """A trained scorer and what to record about it."""

    model: Scorer
    config: ScorerConfig
    metrics: dict
    input_shape: list[int]  # [4, H, W] of the latents it was trained on
    ratings: int  # star ratings it learnt from (train and held-out)
    pairs: int  # explicit picks it learnt from
    init: str  # "scratch", or the trunk file it started from
    family: str | None = None  # the base model family of its latents (trainer.families)


# ---- losses ---------------------------------------------------------------------------------


def star_distribution(scores: torch.Tensor) -> torch.Tensor:
    """Spread each score over the two nearest star bins (3.25 → 75% at 3, 25% at 4)."""
    scores = scores.clamp(1, STARS) - 1
    low = scores.floor().clamp(max=STARS - 2)
    frac = (scores - low).unsqueeze(-1)
    low = low.long()
    return F.one_hot(low, STARS) * (1 - frac) + F.one_hot(low + 1, STARS) * frac


def emd_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Earth mover's distance (r=2, as in NIMA) between [N,5] distributions over ordered bins."""
    gap = p.cumsum(-1) - q.cumsum(-1)
    # eps inside the root: its gradient at an exact match would be infinite.
    return (gap.square().mean(-1) + 1e-12).sqrt().mean()


def bt_loss(
    winner_side: torch.Tensor, other: torch.Tensor, outcome: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Bradley–Terry: P(first wins) = sigmoid(scale·(s_first − s_second)); outcome 1/0/0.5."""
    return F.binary_cross_entropy_with_logits(scale * (winner_side - other), outcome)


def implied_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (i, j, outcome) pairs within a batch whose star ratings differ."""
    i, j = torch.triu_indices(len(scores), len(scores), offset=1, device=scores.device)
    keep = scores[i] != scores[j]
    i, j = i[keep], j[keep]
    return i, j, (scores[i] > scores[j]).float()


# ---- metrics --------------------------------------------------------------------------------


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_row_pearson(a.double().view(1, -1), b.double().view(1, -1))[0])


def _row_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (0 where one is constant)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp_min(1e-300), 0.0)


def pick_accuracy(pred: torch.Tensor, picks: Sequence[Pick]) -> float | None:
    """Share of decided picks (ties left out) whose winner the model scores higher."""
    right = [float((pred[i] > pred[j]) == (o > 0.5)) for i, j, o in picks if o != 0.5]
    return round(sum(right) / len(right), 4) if right else None


def metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """SRCC, Pearson, pairwise accuracy (pairs with differing targets; tied guesses = ½), MAE."""
    pred, target = pred.detach().cpu().double(), target.cpu().double()
    srcc = _pearson(torch.from_numpy(rankdata(pred)), torch.from_numpy(rankdata(target)))
    i, j, outcome = implied_pairs(target)
    agree = torch.sign(pred[i] - pred[j]) * (2 * outcome - 1)
    result = {
        "srcc": round(srcc, 4),
        "pearson": round(_pearson(pred, target), 4),
        "pairwise_accuracy": round(float((agree + 1).mean() / 2), 4) if len(i) else None,
        "mae": round(float((pred - target).abs().mean()), 4),
    }
    return result


# ---- data -----------------------------------------------------------------------------------


def split_by_image(
    n: int, val_fraction: float, generator: torch.Generator, sha256s: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row indices so every row of one image lands on the same side."""
    groups = list(dict.fromkeys(sha256s)) if sha256s else list(range(n))
    order = torch.randperm(len(groups), generator=generator).tolist()
    n_val = round(len(groups) * val_fraction)
    if 0 < val_fraction and len(groups) - n_val < 2:
        raise ValueError(f"too few images ({len(groups)}) to hold out {val_fraction:.0%}")
    held = {groups[k] for k in order[:n_val]}
    keys = sha256s if sha256s else range(n)
    val = [row for row, key in enumerate(keys) if key in held]
    train = [row for row, key in enumerate(keys) if key not in held]
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def _batches(rows: torch.Tensor, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    batches = list(rows[torch.randperm(len(rows), generator=generator)].split(size))
    if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs two samples to train
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _augment(
    x: torch.Tensor, mirrored: torch.Tensor, config: ScorerConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mirror half the batch, then shift each latent by up to max_shift pixels (edge-padded)."""
    if config.flip:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)).to(x.device), mirrored, x)
    s = config.max_shift
    if s == 0 or x.ndim != 4 or x.shape[-1] <= 2 * s:
        return x
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    dx, dy = torch.randint(0, 2 * s + 1, (2, len(x)), generator=generator).tolist()
    h, w = x.shape[-2:]
    crops = [
        padded[k, :, b : b + h, a : a + w] for k, (a, b) in enumerate(zip(dx, dy, strict=True))
    ]
    return torch.stack(crops)


# ---- training -------------------------------------------------------------------------------


def _lr(step: int, total: int, config: ScorerConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss(
    model: Scorer,
    logits: torch.Tensor,
    target: torch.Tensor,
    pair_scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    config: ScorerConfig,
) -> torch.Tensor:
    """Weighted MSE + EMD on rated rows, BT on implied pairs and on the picks drawn."""
    score = model.to_score(logits)
    rated = torch.isfinite(target)  # NaN marks a row that only appears in picks
    loss = score.sum() * 0  # keeps the graph when a batch holds no rated rows and no picks
    if rated.any():
        s, t = score[rated], target[rated]
        loss = loss + config.mse_weight * F.mse_loss(s, t)
        dist = star_distribution(t)
        loss = loss + config.emd_weight * emd_loss(logits[rated].softmax(-1), dist)
        i, j, outcome = implied_pairs(t)
        if len(i):
            loss = loss + config.bt_weight * bt_loss(s[i], s[j], outcome, config.bt_scale)
    if pair_scores is not None:
        first, second, outcome = pair_scores
        loss = loss + config.bt_weight * bt_loss(first, second, outcome, config.bt_scale)
    return loss


@torch.no_grad()
def _logits(
    model: Scorer, x: torch.Tensor, cached: bool, device: torch.device, batch: int = 256
) -> torch.Tensor:
    forward = model.head_logits if cached else model.logits
    return torch.cat([forward(part.to(device)).cpu() for part in x.split(batch)])


@torch.no_grad()
def predict(model: Scorer, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Score [N,4,H,W] latents on the model's device; returns [N] scores on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return model.to_score(_logits(model, latents, False, device, batch_size).to(device)).cpu()


@torch.no_grad()
def uncertainty(model: Scorer, latents: torch.Tensor) -> torch.Tensor:
    """How unsure the scorer is of each image, in stars: the spread of its bootstrap ridge
    fits' predictions (zeros for a scorer without a statistics head)."""
    if model.stats_head is None:
        return torch.zeros(len(latents))
    z = model.standardised_stats(latents) * model.stats_scale.cpu()
    fits = model.stats_bootstrap.cpu()
    guesses = z @ fits[:, :-1].T + fits[:, -1]  # [N, BOOTSTRAP]
    return guesses.std(1)


def greedy_variance_reduction(
    z: torch.Tensor, inverse: torch.Tensor, spread: torch.Tensor
) -> torch.Tensor:
    """Order candidates (rows of z) as a greedy batch V-optimal design: each next one is the
    one whose rating would most reduce the predictive variance left, over `spread`, once the
    ones before it are rated too (A⁻¹ updated by Sherman–Morrison after each choice). Returns
    each candidate's reduction when chosen, made non-increasing along the order, so the top k
    by value are the greedy batch of k: spread over directions, not piled onto one.

    Works on A⁻¹x per candidate rather than A⁻¹ itself: one rank-one update of n rows a step,
    O(n²·p) in all for n candidates of p statistics."""
    ax = z @ inverse  # A⁻¹x for each candidate
    s_ax = ax @ spread
    chosen = torch.zeros(len(z), dtype=torch.bool)
    value = torch.empty(len(z), dtype=z.dtype)
    last = math.inf
    for _ in range(len(z)):
        reduction = (s_ax * ax).sum(1) / (1 + (ax * z).sum(1))
        reduction[chosen] = -math.inf
        best = int(reduction.argmax())
        last = min(last, float(reduction[best]))  # a later gain may creep up: keep the order
        value[best], chosen[best] = last, True
        u, s_u = ax[best].clone(), s_ax[best].clone()
        shrink = (z @ u) / (1 + z[best] @ u)  # xᵢᵀA⁻¹x / (1 + xᵀA⁻¹x), x the chosen one
        ax -= shrink[:, None] * u
        s_ax -= shrink[:, None] * s_u
    return value


@torch.no_grad()
def rating_value(
    model: Scorer, rated: torch.Tensor, stars: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """How much rating each candidate would teach the scorer, as a batch: the drop in the
    statistics head's predictive variance over the candidates that rating it would bring once
    those valued above it are rated too (greedy expected variance reduction for a ridge fit,
    `greedy_variance_reduction`; zeros without a statistics head). The top k by value are
    the batch of k worth asking for, in the order worth asking."""
    if model.stats_head is None or not len(candidates):
        return torch.zeros(len(candidates))
    known = torch.isfinite(stars)
    scale = model.stats_scale.cpu().double()
    zr = model.standardised_stats(rated[known]).double() * scale
    zc = model.standardised_stats(candidates).double() * scale
    alpha = float(model.stats_alpha)
    inverse = torch.linalg.inv(zr.T @ zr + alpha * torch.eye(zr.shape[1], dtype=zr.dtype))
    spread = zc.T @ zc / len(zc)  # the candidates stand for the images to be scored
    return greedy_variance_reduction(zc, inverse, spread).float()


def _load_trunk(model: Scorer, path: str | Path) -> bool:
    """Copy every weight the file has for this net (all but a differently shaped head);
    return whether it also had a trained statistics head for this one (it is loaded too:
    the personal head is then fitted to what the crowd's leaves unexplained)."""
    tensors, _ = read_safetensors(path, ScorerFileError)
    own = model.net.state_dict()
    usable = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing:
        raise ScorerFileError(
            f"{path} does not fit this {model.net.__class__.__name__}: {missing[:3]}"
        )
    model.net.load_state_dict(usable, strict=False)
    return _load_stats(model, tensors) and bool(tensors["stats_head_weight"].any())


def train(
    data: LatentsFile,
    config: ScorerConfig | None = None,
    *,
    picks: Sequence[Pick] = (),
    init: str | Path | None = None,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> TrainedScorer:
    """Train a scorer on a latents file's rows (scores; NaN = unrated) and optional picks.

    Rows are split by image into train and held-out; training stops early when held-out SRCC
    stops improving, and the best epoch's weights are returned. With `init` (a scorer file or
    a same-arch timm state dict) the trunk is frozen and only the last stage and head train.
    """
    config = config or ScorerConfig()
    family = data.metadata.get("family")
    if init is not None:
        config = _config_of(init, config, family)
    started = time.perf_counter()
    device = pick_device()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's stream
        torch.manual_seed(config.seed)
        model = Scorer(config)
    crowd_head = init is not None and _load_trunk(model, init)
    latents, scores = data.latents, data.scores
    mirrored = data.flipped if data.flipped is not None else latents.flip(-1)
    train_rows, val_rows = split_by_image(
        len(latents), config.val_fraction, generator, data.sha256s
    )
    train_picks, val_picks = _split_picks(picks, train_rows, val_rows)
    crowd_weight = None  # with a crowd model's head: how much of its say the scorer keeps
    # the crowd's own say, as loaded, for a refit on every rating (see below)
    state = model.state_dict().items() if crowd_head else ()
    crowd = {k: v.clone() for k, v in state if k.startswith(CROWD_SAY)}
    if model.stats_head is not None:
        if not crowd_head:  # the crowd's head keeps its own standardisation
            model.fit_stats(latents)
        kept = fit_stats_head(model, latents, scores, train_rows, crowd_head, train_picks)
        crowd_weight = kept if crowd_head else None
        if init is None:  # from scratch the CNN adds to the fitted head, from nothing
            nn.init.zeros_(model.net.fc.weight)
            nn.init.zeros_(model.net.fc.bias)
    model.to(device)

    cached = init is not None
    if cached:  # frozen trunk: features once, for the latents and their mirror images
        progress(0, 1, "caching trunk features")
        model.eval()
        latents = _features(model, latents, device)
        mirrored = _features(model, mirrored, device)
        for name, param in model.net.named_parameters():
            param.requires_grad = name.startswith(("layer4.", "fc."))
    trainable = [p for p in model.parameters() if p.requires_grad]  # the statistics head too
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    forward = model.head_logits if cached else model.logits
    augment = replace(config, max_shift=0) if cached else config  # features can't shift
    pick_tensor = torch.tensor(train_picks, dtype=torch.float32).view(-1, 3)

    steps_per_epoch = len(_batches(train_rows, config.batch_size, torch.Generator()))
    epochs = max(config.epochs, math.ceil(config.min_steps / max(steps_per_epoch, 1)))
    patience = math.ceil(config.patience * epochs / config.epochs)
    total = steps_per_epoch * epochs
    best, best_state, best_epoch, stale, step, epochs_run = None, None, 0, 0, 0, 0
    head_alone = None  # the fitted head's held-out guesses, which a trained epoch must beat
    if len(val_rows) and model.stats_head is not None:  # the fitted head alone, as a baseline
        model.eval()
        best, head_alone = _evaluate(
            model, latents[val_rows], scores[val_rows], val_picks, cached, device
        )
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for epoch in range(epochs):
        if should_stop():
            break
        epochs_run = epoch + 1
        model.train()
        if cached:
            model.net.eval()  # frozen trunk BatchNorms keep the statistics the cache used
            model.net.layer4.train()
        for rows in _batches(train_rows, config.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, total, config)
            x = _augment(latents[rows], mirrored[rows], augment, generator)
            target = scores[rows].to(device)
            if len(pick_tensor):
                x, drawn = _add_picks(x, latents, mirrored, pick_tensor, augment, generator)
            logits = forward(x.to(device))
            pair_scores = None
            if len(pick_tensor):
                s = model.to_score(logits[len(rows) :])
                n = config.pick_batch
                pair_scores = (s[:n], s[n:], drawn[:, 2].to(device))
            loss = _loss(model, logits[: len(rows)], target, pair_scores, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # .item() is a CPU–GPU sync point; one per step is cheap next to the step itself
            progress(step, total, f"epoch {epoch + 1}: loss {loss.item():.3f}")

        if not len(val_rows):
            best_epoch = epoch + 1
            continue
        model.eval()
        found, guesses = _evaluate(
            model, latents[val_rows], scores[val_rows], val_picks, cached, device
        )
        # over the fitted head alone, the CNN must win by a margin and with confidence: 20% of
        # a few hundred images is a noisy judge, and a lucky epoch would replace a sound baseline
        over_head = best_epoch == 0 and best is not None
        margin = config.baseline_margin if over_head else 0.0
        better = best is None or _quality(found) > _quality(best) + margin
        if better and over_head and found.get("srcc") is not None:
            better = _confidently_better(
                guesses, head_alone, scores[val_rows], config.baseline_confidence
            )
        if better:
            best, best_epoch, stale = found, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    rated = int(torch.isfinite(data.scores).sum())
    if best_epoch == 0 and model.stats_head is not None:
        # the fitted head alone did best: fit it again on every rating, held-out ones too (the
        # figures stay those measured on the held-out images before this refit). Under
        # CHOOSE_AGAIN_BELOW ratings everything is chosen afresh on all of them, the crowd's
        # say too (a fifth more to choose from is worth most when there are few); above, as
        # chosen on the training rows, and a crowd that keeps a say keeps that fit
        every, few = torch.arange(len(data.scores)), rated < CHOOSE_AGAIN_BELOW
        if crowd_head and few:
            model.cpu().load_state_dict(crowd, strict=False)
            crowd_weight = fit_stats_head(model, data.latents, data.scores, every, True, picks)
        elif not crowd_head or crowd_weight == 0:  # with the crowd set aside, as from scratch
            again = not crowd_head and not few
            fit_stats_head(model.cpu(), data.latents, data.scores, every, picks=picks, again=again)
    model.eval()
    result = dict(best or {})
    result.update(
        epochs=epochs_run,
        best_epoch=best_epoch,
        train_size=len(train_rows),
        val_size=len(val_rows),
        seconds=round(time.perf_counter() - started, 2),
        crowd_weight=crowd_weight,
        dropped_crowd=crowd_weight == 0,
    )
    progress(total, total, f"done: held-out SRCC {result.get('srcc')}")
    return TrainedScorer(
        model=model.cpu(),
        config=config,
        metrics=result,
        input_shape=list(data.latents.shape[1:]),
        ratings=rated,
        pairs=len(picks),
        init=str(init) if init is not None else "scratch",
        family=family,
    )


def _split_picks(
    picks: Sequence[Pick], train_rows: torch.Tensor, val_rows: torch.Tensor
) -> tuple[list[Pick], list[Pick]]:
    """Picks within the training rows, and picks within the held-out rows (re-indexed to them).

    A pick across the split is dropped: training on it would leak the held-out image.
    """
    train_set = set(train_rows.tolist())
    val_index = {row: k for k, row in enumerate(val_rows.tolist())}
    train_picks = [p for p in picks if p[0] in train_set and p[1] in train_set]
    val_picks = [(val_index[i], val_index[j], o) for i, j, o in picks if {i, j} <= val_index.keys()]
    return train_picks, val_picks


def _add_picks(
    x: torch.Tensor,
    latents: torch.Tensor,
    mirrored: torch.Tensor,
    picks: torch.Tensor,
    config: ScorerConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw pick_batch picks; append both sides' inputs to the batch: [x, firsts, seconds]."""
    drawn = picks[torch.randint(len(picks), (config.pick_batch,), generator=generator)]
    rows = torch.cat([drawn[:, 0], drawn[:, 1]]).long()
    return torch.cat([x, _augment(latents[rows], mirrored[rows], config, generator)]), drawn


@torch.no_grad()
def _features(model: Scorer, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model.trunk(part.to(device)).cpu() for part in x.split(256)])


def _evaluate(
    model: Scorer,
    x: torch.Tensor,
    target: torch.Tensor,
    picks: Sequence[Pick],
    cached: bool,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    """Held-out metrics, and the guesses they were measured on."""
    logits = _logits(model, x, cached, device)
    pred = model.to_score(logits.to(device)).cpu()
    rated = torch.isfinite(target)
    found = metrics(pred[rated], target[rated]) if rated.sum() > 1 else {"srcc": None}
    if picks:
        found["pick_accuracy"] = pick_accuracy(pred, picks)
    return found, pred


RESAMPLES = 200  # paired bootstrap resamples behind `_confidently_better`


def _confidently_better(
    pred: torch.Tensor, baseline: torch.Tensor, target: torch.Tensor, confidence: float
) -> bool:
    """Whether `pred` ranks the rated targets better (SRCC) than `baseline` does in at least
    `confidence` of paired bootstrap resamples of them (the same images for both, so what
    they share cancels)."""
    rated = torch.isfinite(target)
    pred, baseline, target = pred[rated], baseline[rated], target[rated]
    if len(target) < 3:
        return False
    drawn = torch.randint(
        len(target), (RESAMPLES, len(target)), generator=torch.Generator().manual_seed(0)
    )
    ranks = [rankdata(v.double().numpy()[drawn.numpy()], axis=1) for v in (pred, baseline, target)]
    ours, theirs, truth = (torch.from_numpy(r) for r in ranks)
    wins = _row_pearson(ours, truth) > _row_pearson(theirs, truth)
    return float(wins.double().mean()) >= confidence


def _quality(found: dict) -> float:
    """What early stopping maximises: held-out SRCC, or pick accuracy when no stars are held
    out (someone who only compares)."""
    for key in ("srcc", "pick_accuracy"):
        if found.get(key) is not None:
            return found[key]
    return -1.0


# ---- files ----------------------------------------------------------------------------------


def check_family(metadata: dict, family: str | None, what: str) -> None:
    """Refuse a scorer file's use on latents of another base-model family: an SDXL scorer
    reads SD 1.x latents (same shape at some sizes) as nonsense, without an error."""
    from trainer.families import NAMES

    mine = metadata.get("family")
    if mine and family and mine != family:
        raise ScorerFileError(
            f"{what} was trained on {NAMES.get(mine, mine)} latents, and these are"
            f" {NAMES.get(family, family)} latents; train a scorer on this base model's latents"
        )


def _config_of(init: str | Path, config: ScorerConfig, family: str | None) -> ScorerConfig:
    """Take the arch and widths from a scorer file being finetuned; other settings stay."""
    _, metadata = read_safetensors(init, ScorerFileError)
    if metadata.get("format") != FORMAT:
        return config  # a plain state dict: it must fit the configured arch
    check_family(metadata, family, f"the trunk {init}")
    saved = ScorerConfig.from_dict(json.loads(metadata["config"]))
    return replace(config, arch=saved.arch, channels=saved.channels)


def save_scorer(path: str | Path, trained: TrainedScorer) -> None:
    """Write the weights and everything needed to rebuild and judge them, atomically."""
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": trained.config.arch,
        "input_shape": json.dumps(trained.input_shape),
        "config": json.dumps(asdict(trained.config)),
        "metrics": json.dumps(trained.metrics),
        "ratings": str(trained.ratings),
        "pairs": str(trained.pairs),
        "init": trained.init,
    }
    if trained.family:
        metadata["family"] = trained.family
    write_atomic(Path(path), scorer_tensors(trained.model), metadata)


def scorer_tensors(model: Scorer) -> dict[str, torch.Tensor]:
    """The timm net's weights under their own names (a trunk file any timm ResNet reads),
    plus the statistics head's under `stats_*` names, which no timm weight has."""
    tensors = dict(model.net.state_dict())
    if model.stats_head is not None:
        tensors.update(
            stats_head_weight=model.stats_head.weight,
            stats_head_bias=model.stats_head.bias,
            stats_mean=model.stats_mean,
            stats_std=model.stats_std,
            stats_bootstrap=model.stats_bootstrap,
            stats_scale=model.stats_scale,
            stats_alpha=model.stats_alpha,
            stats_tastes=model.stats_tastes,
        )
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _load_stats(model: Scorer, tensors: dict[str, torch.Tensor]) -> bool:
    """Load the statistics head from a file's tensors, if both have one of the same width."""
    head = model.stats_head
    if head is None or tensors.get("stats_head_weight", torch.empty(0)).shape != head.weight.shape:
        return False
    with torch.no_grad():
        head.weight.copy_(tensors["stats_head_weight"])
        head.bias.copy_(tensors["stats_head_bias"])
        model.stats_mean.copy_(tensors["stats_mean"])
        model.stats_std.copy_(tensors["stats_std"])
        for name in ("stats_bootstrap", "stats_scale", "stats_alpha", "stats_tastes"):  # newer
            mine = getattr(model, name)
            if tensors.get(name, torch.empty(0)).shape == mine.shape:
                mine.copy_(tensors[name])
    return True


def load_scorer(path: str | Path) -> tuple[Scorer, dict]:
    """Rebuild a saved scorer (eval mode, CPU) and return it with its file's metadata."""
    tensors, metadata = read_safetensors(path, ScorerFileError)
    if metadata.get("format") != FORMAT:
        raise ScorerFileError(
            f"{path} is not a tastebud scorer (format {metadata.get('format')!r})"
        )
    settings = json.loads(metadata["config"])
    settings.setdefault("stats", False)  # written before the statistics head existed
    model = Scorer(ScorerConfig.from_dict(settings))
    model.net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("stats_")})
    if model.stats_head is not None and not _load_stats(model, tensors):
        raise ScorerFileError(f"{path} lacks the statistics head its settings name")
    return model.eval(), metadata


# ---- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Train or apply a scorer: `python -m trainer.scorer train|score ...`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.scorer")
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="train a scorer on a latents file")
    tr.add_argument("--data", required=True, help="latents .safetensors (trainer.latents)")
    tr.add_argument("--out", required=True, help="the scorer .safetensors to write")
    tr.add_argument("--init", help="a scorer file whose trunk to start from (frozen)")
    tr.add_argument("--val-fraction", type=float, default=ScorerConfig.val_fraction)
    tr.add_argument("--seed", type=int, default=ScorerConfig.seed)
    tr.add_argument("--config", help="JSON object of further ScorerConfig settings")
    sc = commands.add_parser("score", help="score the latents in a latents file")
    sc.add_argument("--model", required=True)
    sc.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    try:
        data = load_latents_file(args.data)
        if args.command == "train":
            settings = json.loads(args.config) if args.config else {}
            settings.update(val_fraction=args.val_fraction, seed=args.seed)
            trained = train(data, ScorerConfig.from_dict(settings), init=args.init)
            save_scorer(args.out, trained)
            summary = {**trained.metrics, "out": args.out, "init": trained.init}
        else:
            model, metadata = load_scorer(args.model)
            check_family(metadata, data.metadata.get("family"), f"the scorer {args.model}")
            summary = {"scores": [round(float(s), 4) for s in predict(model, data.latents)]}
            if data.sha256s is not None:
                summary["sha256s"] = data.sha256s
    except (LatentsFileError, ScorerFileError, TypeError, ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
