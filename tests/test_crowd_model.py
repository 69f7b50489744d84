"""The crowd model: z-scored crowd targets, training it, finetuning from it, and its CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer import crowd
from trainer import scorer as sc
from trainer.latents import LatentsFile, save_latents_file

# Tiny and quick: 4×8×8 latents, a narrow resnet18, a few epochs.
TINY = sc.ScorerConfig(channels=(8, 16, 32, 64), epochs=6, batch_size=32, max_shift=1)


def rated_pool(n: int = 120, raters: int = 4, seed: int = 0) -> tuple[LatentsFile, tuple]:
    """Latents with a hidden quality (a top/bottom channel-0 pattern) rated by offset raters.

    Rater k rates every image: quality + noise, shifted by k − 1.5 stars (harsh to lenient).
    """
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    pattern = torch.ones(8, 8)
    pattern[:4] = -1  # survives mirroring and small shifts
    quality = torch.randn(n, generator=g)
    latents[:, 0] += quality.view(-1, 1, 1) * pattern
    rater_ids, rows, stars = [], [], []
    for k in range(raters):
        noisy = quality + 0.3 * torch.randn(n, generator=g)
        given = (3 + (k - 1.5) + noisy).round().clamp(1, 5)
        rater_ids += [k] * n
        rows += list(range(n))
        stars += given.tolist()
    sha256s = [f"{i:064x}" for i in range(n)]
    data = LatentsFile(latents, torch.zeros(n), None, sha256s, {})
    return data, (rater_ids, rows, stars)


def replace_scores(data: LatentsFile, seed: int) -> LatentsFile:
    """The same latents rated by one person (the pattern again, other noise)."""
    g = torch.Generator().manual_seed(seed)
    signal = data.latents[:, 0, 4:].mean((1, 2)) - data.latents[:, 0, :4].mean((1, 2))
    stars = (3 + signal + 0.3 * torch.randn(len(signal), generator=g)).round().clamp(1, 5)
    return LatentsFile(data.latents, stars, None, data.sha256s, {})


def test_zscoring_removes_a_raters_offset():
    order = [1.0, 2, 3, 3, 2, 1, 2, 3]  # a harsh rater's stars
    harsh = crowd.crowd_scores([7] * 8, range(8), order, 8)
    lenient = crowd.crowd_scores([9] * 8, range(8), [s + 2 for s in order], 8)
    assert torch.allclose(harsh, lenient)
    # Each rates half the images, the same hidden quality: raw means would put every image the
    # lenient rater saw 2 stars above its twin; z-scored, the twins score the same.
    ids = [7] * 8 + [9] * 8
    rows = list(range(8)) + list(range(8, 16))
    both = crowd.crowd_scores(ids, rows, order + [s + 2 for s in order], 16)
    assert torch.allclose(both[:8], both[8:])
    assert torch.equal(both[:8].argsort(stable=True), torch.tensor(order).argsort(stable=True))
    assert 1 <= both.min() and both.max() <= 5


def test_unrated_rows_are_nan_and_small_raters_are_left_out():
    ids = [0] * 6 + [1] * 2  # rater 1 has too few ratings to learn their offset
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    scores = crowd.crowd_scores(ids, rows, [1, 2, 3, 4, 5, 3, 5, 5], 10)
    assert torch.isfinite(scores[:6]).all()
    assert torch.isnan(scores[6:]).all()  # 6, 7: rater 1 only; 8, 9: nobody
    counted = crowd.crowd_scores(ids, rows, [1, 2, 3, 4, 5, 3, 5, 5], 10, min_ratings_per_rater=2)
    assert torch.isfinite(counted[:8]).all()
    assert torch.isnan(crowd.crowd_scores([0, 0], [0, 1], [4, 5], 2)).all()  # nobody counts


def test_a_constant_rater_is_neutral_not_infinite():
    varied = [1.0, 2, 3, 4, 5, 4, 3, 2]
    alone = crowd.crowd_scores([0] * 8, range(8), varied, 8)
    with_constant = crowd.crowd_scores([0] * 8 + [1] * 8, list(range(8)) * 2, varied + [4] * 8, 8)
    assert torch.isfinite(with_constant).all()
    # The constant rater's z is 0 everywhere: the order stays, each image's mean z halves.
    assert torch.equal(with_constant.argsort(stable=True), alone.argsort(stable=True))
    shrunk, full = with_constant - 3, alone - 3
    ratio = float((shrunk * full).sum() / full.square().sum())
    assert torch.allclose(shrunk, ratio * full, atol=1e-5) and 0 < ratio < 1
    only = crowd.crowd_scores([3] * 6, range(6), [2] * 6, 6)
    assert torch.allclose(only, torch.full((6,), 3.0))  # all the same: all "as usual"


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="one of each per rating"):
        crowd.crowd_scores([0, 0], [0], [3, 4], 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        crowd.crowd_scores([0], [2], [3], 2)
    with pytest.raises(ValueError, match="NaN"):
        crowd.crowd_scores([0], [0], [math.nan], 2)


def test_train_crowd_makes_a_trunk_for_personal_finetunes(tmp_path):
    data, (ids, rows, stars) = rated_pool()
    # Rows 100.. are rated by nobody: the crowd model must leave them out, not train on NaN.
    keep = [k for k, row in enumerate(rows) if row < 100]
    ids, rows, stars = ([a[k] for k in keep] for a in (ids, rows, stars))
    seen = []
    trained = crowd.train_crowd(
        data, ids, rows, stars, TINY, progress=lambda *step: seen.append(step)
    )
    assert trained.metrics["crowd"]["raters"] == 4 and trained.metrics["crowd"]["images"] == 100
    assert trained.ratings == 400 and trained.init == "scratch"
    assert trained.metrics["train_size"] + trained.metrics["val_size"] == 100
    # It learnt the crowd's taste: its scores follow the z-scored crowd targets it trained on.
    targets = crowd.crowd_scores(ids, rows, stars, 100)
    fitted = sc.metrics(sc.predict(trained.model, data.latents[:100]), targets)
    assert fitted["srcc"] > 0.6, fitted
    assert seen[0][2].startswith("crowd targets: 400 ratings from 4 raters")

    path = tmp_path / "crowd.safetensors"
    sc.save_scorer(path, trained)
    _, metadata = sc.load_scorer(path)
    assert json.loads(metadata["metrics"])["crowd"]["ratings"] == 400

    personal = replace_scores(rated_pool(seed=3)[0], seed=3)
    config = sc.ScorerConfig(epochs=2, batch_size=32)
    tuned = sc.train(personal, config, init=path)
    assert tuned.init == str(path) and tuned.config.channels == TINY.channels
    before, after = trained.model.net.state_dict(), tuned.model.net.state_dict()
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert tuned.metrics["epochs"] >= 1  # it trained (and kept its best epoch, maybe the start)
    # From a trunk: a crowd model trained on top of another trunk keeps that trunk's arch.
    again = crowd.train_crowd(data, ids, rows, stars, sc.ScorerConfig(epochs=1), init=path)
    assert again.init == str(path) and again.config.channels == TINY.channels


def test_train_crowd_refuses_when_no_rater_counts():
    data, _ = rated_pool(n=10)
    with pytest.raises(ValueError, match="no rater has 5 ratings"):
        crowd.train_crowd(data, [0, 1], [0, 1], [3, 4], TINY)


def test_cli_trains_from_a_ratings_csv(tmp_path, capsys):
    data, (ids, rows, stars) = rated_pool(n=64, raters=3)
    latents_file = tmp_path / "data.safetensors"
    save_latents_file(latents_file, data.latents, data.scores, data.sha256s)
    ratings = tmp_path / "ratings.csv"
    lines = ["rater,sha256,stars"]
    lines += [f"user{i},{data.sha256s[r]},{s:g}" for i, r, s in zip(ids, rows, stars, strict=True)]
    lines.append(f"user0,{'f' * 64},5")  # an image this latents file lacks: skipped, counted
    ratings.write_text("\n".join(lines) + "\n")
    out = tmp_path / "crowd.safetensors"
    settings = json.dumps({"channels": [8, 16, 32, 64], "epochs": 1, "batch_size": 16})
    crowd.main(
        ["train", "--data", str(latents_file), "--ratings", str(ratings), "--out", str(out)]
        + ["--config", settings]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["crowd"]["raters"] == 3 and summary["crowd"]["ratings"] == 192
    assert summary["ratings_skipped"] == 1 and summary["init"] == "scratch" and out.is_file()
    sc.main(["score", "--model", str(out), "--data", str(latents_file)])
    assert len(json.loads(capsys.readouterr().out)["scores"]) == 64

    ratings.write_text("who,sha256,stars\nuser0,abc,3\n")
    with pytest.raises(SystemExit) as exit_info:
        crowd.main(
            ["train", "--data", str(latents_file), "--ratings", str(ratings), "--out", str(out)]
        )
    assert exit_info.value.code == 2
    assert "error: " in capsys.readouterr().err


def _three_tastes(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Latents, and three unrelated tastes of them: where channel 0's weight sits (top over
    bottom), how much channel 1 there is, and how busy channel 2 is (each z-scored)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g) * torch.rand(n, 4, 1, 1, generator=g).add(0.3)
    latents += torch.randn(n, 4, 1, 1, generator=g)
    raw = [
        latents[:, 0, :4].mean((1, 2)) - latents[:, 0, 4:].mean((1, 2)),
        latents[:, 1].mean((1, 2)),
        latents[:, 2].std((1, 2)),
    ]
    return latents, [(t - t.mean()) / t.std() for t in raw]


def test_a_newcomer_with_a_taste_from_the_crowd_is_read_from_few_ratings(tmp_path):
    latents, tastes = _three_tastes(600, seed=1)
    g = torch.Generator().manual_seed(2)
    ids, rows, stars = [], [], []
    for rater in range(12):  # four raters of each taste, 150 ratings each
        seen = torch.randperm(len(latents), generator=g)[:150]
        liking = tastes[rater % 3][seen] + 0.4 * torch.randn(150, generator=g)
        ids += [rater] * 150
        rows += seen.tolist()
        stars += (3 + liking).round().clamp(1, 5).tolist()
    data = LatentsFile(latents, torch.zeros(len(latents)), None, None, {})
    trained = crowd.train_crowd(data, ids, rows, stars, TINY)
    assert trained.metrics["crowd"]["taste_directions"] == 8
    assert torch.allclose(trained.model.stats_tastes.norm(dim=1), torch.ones(8), atol=1e-4)
    path = tmp_path / "crowd.safetensors"
    sc.save_scorer(path, trained)
    assert torch.equal(sc.load_scorer(path)[0].stats_tastes, trained.model.stats_tastes)

    # a newcomer who likes channel 1, the crowd's average taste or not, rates 10, then 30
    mine = (3 + tastes[1][:30] + 0.4 * torch.randn(30, generator=g)).round().clamp(1, 5)
    test_latents, test_tastes = _three_tastes(300, seed=3)
    found = {}
    for n in (10, 30):
        newcomer = LatentsFile(latents[:n], mine[:n], None, None, {})
        for start, init in (("scratch", None), ("crowd", path)):
            tuned = sc.train(newcomer, TINY, init=init)
            predicted = sc.predict(tuned.model, test_latents)
            found[start, n] = sc.metrics(predicted, test_tastes[1])["srcc"]
    # Read from the crowd's start from 10 ratings on. (A taste for one global quantity is
    # plain from their own ratings too, now that the statistics' groups are weighed: the crowd
    # is no longer needed for it, and must cost little; the benches measure where it helps.)
    for n in (10, 30):
        assert found["crowd", n] > 0.85 and found["crowd", n] > found["scratch", n] - 0.08, found
