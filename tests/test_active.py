"""Active selection: the ridge inverse update, and batches that spread over directions."""

from __future__ import annotations

import torch

from rating.taste_data import active_candidates
from trainer import scorer as sc


def sherman_morrison(inverse: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A + x xᵀ)⁻¹ from a symmetric A⁻¹: the ridge inverse once one more image is rated (the
    update greedy_variance_reduction makes on A⁻¹x; here the reference it is checked against)."""
    ax = inverse @ x
    return inverse - torch.outer(ax, ax) / (1 + x @ ax)


def test_sherman_morrison_equals_a_fresh_inverse():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 12, generator=g, dtype=torch.float64)
    a = z.T @ z + 10 * torch.eye(12, dtype=torch.float64)
    x = torch.randn(12, generator=g, dtype=torch.float64)
    fresh = torch.linalg.inv(a + torch.outer(x, x))
    assert torch.allclose(sherman_morrison(torch.linalg.inv(a), x), fresh, atol=1e-12)


def clusters(copies: int = 6, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates in `size` directions: near copies of one long vector along the first, one
    shorter vector along each other. Returns them and each one's direction."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.eye(size, dtype=torch.float64)
    rows = [3 * directions[0] + 0.01 * torch.randn(size, generator=g) for _ in range(copies)]
    rows += [2 * directions[d] for d in range(1, size)]
    direction = torch.tensor([0] * copies + list(range(1, size)))
    return torch.stack(rows), direction


def test_a_greedy_batch_spreads_over_directions_where_the_top_k_piles_on_one():
    z, direction = clusters()
    inverse = torch.eye(z.shape[1], dtype=torch.float64)
    spread = z.T @ z / len(z)
    alone = sc.greedy_variance_reduction(z, inverse, spread)  # the first pick: no others yet
    ax = z @ inverse
    independent = ((ax @ spread) * ax).sum(1) / (1 + (ax * z).sum(1))
    assert alone.argmax() == independent.argmax()
    k = 5
    piled = direction[independent.argsort(descending=True)[:k]]
    spread_out = direction[alone.argsort(descending=True)[:k]]
    assert piled.unique().tolist() == [0]  # every one of the top k is a copy of the same image
    assert len(spread_out.unique()) == k  # the greedy batch asks about k different directions
    assert (alone[:-1] >= 0).all() and (alone.sort(descending=True).values.diff() <= 0).all()


def test_greedy_order_is_each_step_s_best_with_the_inverse_updated():
    g = torch.Generator().manual_seed(1)
    rated, candidates = torch.randn(20, 10, generator=g), torch.randn(40, 10, generator=g)
    inverse = torch.linalg.inv(rated.T @ rated + torch.eye(10)).double()
    z = candidates.double()
    spread = z.T @ z / len(z)
    order = sc.greedy_variance_reduction(z, inverse, spread).argsort(descending=True)
    chosen: list[int] = []
    for _ in range(4):  # by brute force: a fresh reduction for every candidate at each step
        ax = z @ inverse
        reduction = ((ax @ spread) * ax).sum(1) / (1 + (ax * z).sum(1))
        reduction[chosen] = -1
        chosen.append(int(reduction.argmax()))
        inverse = sherman_morrison(inverse, z[chosen[-1]])
    assert order[:4].tolist() == chosen


def test_a_scorer_values_candidates_as_a_batch_and_the_page_asks_in_that_order():
    g = torch.Generator().manual_seed(2)
    model = sc.Scorer(sc.ScorerConfig(channels=(8, 16, 32, 64))).eval()
    rated, candidates = torch.randn(30, 4, 8, 8, generator=g), torch.randn(24, 4, 8, 8, generator=g)
    model.fit_stats(torch.cat([rated, candidates]))
    stars = torch.randint(1, 6, (30,), generator=g).float()
    stars[:3] = float("nan")  # picked-only images: no stars, not counted as rated
    values = sc.rating_value(model, rated, stars, candidates)
    assert values.shape == (24,) and (values > 0).all()
    guesses = [
        {"image_id": 100 + i, "score": 3.0, "spread": 0.1, "value": float(v)}
        for i, v in enumerate(values)
    ]
    asked = active_candidates(guesses, stars, keep=5)["informative"]
    assert asked == [100 + int(i) for i in values.argsort(descending=True)[:5]]
