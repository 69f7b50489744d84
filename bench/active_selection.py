"""Active selection bench: held-out SRCC after N ratings, when the rating page mixes in what
the scorer asks for, against a page that only explores. SYNTHETIC (the battery's raters).

A simulated sitting: the person rates `--start` images drawn at random and trains their taste;
from then on each batch of 8 images (the page's PICK_AHEAD) holds the share of images the
scorer asks for (`rating.taste_data.active_candidates` on `--guess-pool` unrated images, as
the taste job computes them, taken in turn as `rating.picking.active_ids` does), the rest drawn
at random; they retrain at each checkpoint. As on the site, the list is made once per trained
scorer and the page works down it (skipping what is rated) until the next one. The scorer is
the product's (`trainer.scorer`, default settings); SRCC is against the rater's stars on
held-out images.

With --refresh N the list is also remade every N ratings between checkpoints, from a quick
refit (`REFRESH`), as a page that kept its scorer up to date while the person rates would.

With --oracle N, a bound on any way of choosing instead: from the same `--start` random ratings,
each next image up to N is the one (of `--oracle-candidates` unrated ones drawn at random) whose
rating most raises the held-out SRCC itself, a cheat no selection can use: the statistics head's
ridge fit, with the penalty and weights chosen at the start, is refitted for every candidate and
scored on the held-out images. The product's scorer is then trained on those N ratings.

    .venv/bin/python bench/active_selection.py        # --raters ..., --checkpoints 30 50 100 200
    .venv/bin/python bench/active_selection.py --oracle 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scorer_battery import Rater, data_file, fields, srcc, tastes

from rating.picking import in_turn
from rating.taste_data import active_candidates
from trainer import scorer as sc

BATCH = 8  # images the rating page picks ahead at a time
# --refresh's quick refit: one short epoch beside the fitted head (kept when the CNN adds nothing)
REFRESH = sc.ScorerConfig(epochs=1, min_steps=0, patience=1)


def asked_for(model, pool, stars, rated: list[int], guess_pool: int, g) -> list[int]:
    """The pool rows the scorer asks for, in the order the rating page would show them."""
    unrated = [i for i in range(len(pool)) if i not in set(rated)]
    sample = [unrated[k] for k in torch.randperm(len(unrated), generator=g)[:guess_pool]]
    scores = sc.predict(model, pool[sample]).tolist()
    spreads = sc.uncertainty(model, pool[sample]).tolist()
    values = sc.rating_value(model, pool[rated], stars[rated], pool[sample]).tolist()
    guesses = [
        {"image_id": row, "score": s, "spread": u, "value": v}
        for row, s, u, v in zip(sample, scores, spreads, values, strict=True)
    ]
    active = active_candidates(guesses, stars[rated])
    return in_turn(active["informative"], active["edge_of_top"])  # as the rating page does


def sitting(stars, pool, test, test_stars, share: float, args, seed: int) -> dict:
    """Rate up to the last checkpoint (`stars`: what the rater gives each pool image);
    return SRCC at each checkpoint."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    rated = order[: args.start]
    explore = [i for i in order if i not in set(rated)]
    found, asked = {}, []
    for checkpoint in args.checkpoints:
        while len(rated) < checkpoint:
            batch = [i for i in asked if i not in set(rated)][: round(BATCH * share)]
            batch += [i for i in explore if i not in set(rated) and i not in batch][
                : BATCH - len(batch)
            ]
            before = len(rated)
            rated += batch[: checkpoint - len(rated)]
            if (
                share
                and args.refresh
                and len(rated) < checkpoint
                and (len(rated) // args.refresh > before // args.refresh)
            ):
                quick = sc.train(data_file(pool[rated], stars[rated]), REFRESH).model
                asked = asked_for(quick, pool, stars, rated, args.guess_pool, g)
        model = sc.train(data_file(pool[rated], stars[rated])).model
        found[checkpoint] = srcc(sc.predict(model, test), test_stars)
        if share:  # one list per trained scorer, as the taste job records it
            asked = asked_for(model, pool, stars, rated, args.guess_pool, g)
    return found


def oracle_sitting(stars, pool, test, test_stars, args, seed: int) -> float:
    """SRCC after `args.oracle` ratings chosen by their effect on the held-out SRCC (see above)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    rated = order[: args.start]
    model = sc.train(data_file(pool[rated], stars[rated])).model
    scale = model.stats_scale.double()
    z = model.standardised_stats(pool).double() * scale
    z_test = model.standardised_stats(test).double() * scale
    alpha = float(model.stats_alpha)

    def held_out(rows: list[int]) -> float:
        weights, _ = sc.ridge(z[rows], stars[rows], alpha)
        return srcc(z_test @ weights.double(), test_stars)

    while len(rated) < args.oracle:
        taken = set(rated)
        unrated = [i for i in order if i not in taken]
        drawn = torch.randperm(len(unrated), generator=g)[: args.oracle_candidates]
        rated.append(max((unrated[k] for k in drawn), key=lambda i: held_out(rated + [i])))
    model = sc.train(data_file(pool[rated], stars[rated])).model
    return srcc(sc.predict(model, test), test_stars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--start", type=int, default=30, help="random ratings before a scorer")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[30, 50, 100, 200])
    parser.add_argument("--guess-pool", type=int, default=200, help="TASTE_PREDICT_POOL")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 1.0])
    parser.add_argument("--raters", nargs="+", help="names from the battery (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh", type=int, default=0, help="refit the list every N ratings")
    parser.add_argument("--oracle", type=int, default=0, help="bound: rate up to N by a cheat")
    parser.add_argument("--oracle-candidates", type=int, default=60)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    battery = tastes(args.side)
    reference = fields(2000, args.side, g)
    raters = [Rater(name, fn, reference, g) for name, fn in battery.items()]
    raters = [r for r in raters if not args.raters or r.name in args.raters]
    pool, test = fields(args.pool, args.side, g), fields(args.test, args.side, g)
    began = time.perf_counter()
    if args.oracle:
        found = []
        for k, rater in enumerate(raters):
            stars, test_stars = rater.stars(pool), rater.stars(test)
            found.append(oracle_sitting(stars, pool, test, test_stars, args, seed=args.seed + k))
            print(f"  {rater.name:22s} oracle  N={args.oracle}: {found[-1]:.3f}", flush=True)
        print(
            f"\nSYNTHETIC: {len(raters)} battery raters; mean SRCC after {args.start} random "
            f"ratings and {args.oracle - args.start} chosen by the held-out SRCC itself: "
            f"{statistics.fmean(found):.3f} ({time.perf_counter() - began:.0f} s)"
        )
        return
    table: dict[float, dict[int, list[float]]] = {
        s: {n: [] for n in args.checkpoints} for s in args.shares
    }
    for k, rater in enumerate(raters):
        stars, test_stars = rater.stars(pool), rater.stars(test)
        for share in args.shares:
            found = sitting(stars, pool, test, test_stars, share, args, seed=args.seed + k)
            for n, value in found.items():
                table[share][n].append(value)
            cells = "  ".join(f"N={n}: {v:.3f}" for n, v in found.items())
            print(f"  {rater.name:22s} share {share:.2f}  {cells}", flush=True)
    print(
        f"\nSYNTHETIC: {len(raters)} battery raters, 4×{args.side}×{args.side} latents, "
        f"{args.test} held-out images; mean SRCC against held-out stars "
        f"({time.perf_counter() - began:.0f} s)"
    )
    print("| ratings | " + " | ".join(f"share {s:g}" for s in args.shares) + " |")
    print("|---:" * (1 + len(args.shares)) + "|")
    for n in args.checkpoints:
        cells = " | ".join(f"{statistics.fmean(table[s][n]):.3f}" for s in args.shares)
        print(f"| {n} | {cells} |")


if __name__ == "__main__":
    main()
