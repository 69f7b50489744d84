"""The latent-space scorer: build, losses, training on a learnable set, files and the CLI."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from trainer import scorer as sc
from trainer.latents import LatentsFile, save_latents_file

# Tiny and quick: 4×8×8 latents, a narrow resnet18, a few epochs.
TINY = sc.ScorerConfig(channels=(8, 16, 32, 64), epochs=8, batch_size=32, max_shift=1, min_steps=0)


def synthetic(n: int = 160, side: int = 8, seed: int = 0) -> LatentsFile:
    """Latents whose star rating is a learnable function: 3 + 2·tanh(channel-0 pattern) + noise."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, side, side, generator=g)
    pattern = torch.ones(side, side)
    pattern[: side // 2] = -1  # bright top vs bright bottom; survives mirroring and small shifts
    latents[:, 0] += torch.randn(n, 1, 1, generator=g) * pattern
    signal = (latents[:, 0] * pattern).mean((1, 2)) * 2
    scores = (3 + 2 * torch.tanh(signal) + 0.2 * torch.randn(n, generator=g)).clamp(1, 5).round()
    return LatentsFile(latents=latents, scores=scores, flipped=None, sha256s=None, metadata={})


@pytest.fixture(scope="module")
def trained() -> sc.TrainedScorer:
    return sc.train(synthetic(), TINY)


def test_builds_with_four_channels_and_scores_in_range():
    model = sc.Scorer(TINY).eval()
    assert model.net.conv1.in_channels == 4
    scores = sc.predict(model, 100 * torch.randn(6, 4, 16, 16))
    assert scores.shape == (6,) and 1 <= scores.min() and scores.max() <= 5
    assert torch.allclose(model.to_score(torch.tensor([[50.0, 0, 0, 0, 0]])), torch.tensor(1.0))
    assert torch.allclose(model.to_score(torch.tensor([[0.0, 0, 0, 0, 50]])), torch.tensor(5.0))


def test_unknown_config_keys_are_refused():
    with pytest.raises(TypeError, match="unknown ScorerConfig keys"):
        sc.ScorerConfig.from_dict({"epochs": 2, "lr_typo": 1.0})
    assert sc.ScorerConfig.from_dict({"channels": [8, 16, 32, 64]}).channels == (8, 16, 32, 64)


def test_emd_loss():
    p = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    assert sc.emd_loss(p, p).item() == pytest.approx(0, abs=1e-5)
    one_off = sc.emd_loss(sc.star_distribution(torch.tensor([3.0])), p)
    far_off = sc.emd_loss(sc.star_distribution(torch.tensor([5.0])), p)
    assert 0 < one_off < far_off
    expected = torch.tensor([[0, 0, 0.75, 0.25, 0]])
    assert torch.allclose(sc.star_distribution(torch.tensor([3.25])), expected)
    assert torch.allclose(sc.star_distribution(torch.tensor([5.0])), torch.eye(5)[4:])


def test_bt_loss_prefers_the_right_order():
    win = torch.tensor([1.0])
    right = sc.bt_loss(torch.tensor([4.0]), torch.tensor([2.0]), win)
    wrong = sc.bt_loss(torch.tensor([2.0]), torch.tensor([4.0]), win)
    assert right < wrong
    tie = sc.bt_loss(torch.tensor([3.0]), torch.tensor([3.0]), torch.tensor([0.5]))
    assert tie < sc.bt_loss(torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([0.5]))
    i, j, outcome = sc.implied_pairs(torch.tensor([3.0, 3.0, 5.0]))
    assert i.tolist() == [0, 1] and j.tolist() == [2, 2] and outcome.tolist() == [0, 0]


def test_metrics_on_a_known_ranking():
    found = sc.metrics(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.0, 2.0, 4.0, 3.0]))
    assert found["srcc"] == pytest.approx(0.8, abs=1e-4) and found[
        "pairwise_accuracy"
    ] == pytest.approx(5 / 6, abs=1e-4)
    assert found["mae"] == pytest.approx(0.75)
    assert sc.metrics(torch.ones(4), torch.arange(4.0))["srcc"] == 0  # constant guess: no warning


def test_split_keeps_each_image_on_one_side():
    sha256s = ["a", "b", "a", "c", "b", "d", "e", "e"]
    train, val = sc.split_by_image(8, 0.4, torch.Generator().manual_seed(1), sha256s)
    assert sorted(train.tolist() + val.tolist()) == list(range(8))
    assert not {sha256s[r] for r in train} & {sha256s[r] for r in val}


def test_learns_a_learnable_set(trained):
    metrics = trained.metrics
    assert metrics["srcc"] > 0.5, metrics
    assert metrics["val_size"] == 32 and metrics["train_size"] == 128
    assert {"pearson", "pairwise_accuracy", "mae", "seconds", "best_epoch"} <= set(metrics)


def test_same_seed_same_model(trained):
    again = sc.train(synthetic(), TINY)
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(again.metrics) == strip(trained.metrics)
    x = synthetic(8, seed=5).latents
    assert torch.equal(sc.predict(again.model, x), sc.predict(trained.model, x))


def test_save_load_reproduces_scores_and_records_metadata(trained, tmp_path):
    path = tmp_path / "scorer.safetensors"
    sc.save_scorer(path, trained)
    loaded, metadata = sc.load_scorer(path)
    x = synthetic(10, seed=3).latents
    assert torch.equal(sc.predict(loaded, x), sc.predict(trained.model, x))
    with safe_open(str(path), framework="pt") as file:
        saved = file.metadata()
    assert saved == metadata
    assert saved["arch"] == "resnet18" and json.loads(saved["input_shape"]) == [4, 8, 8]
    assert sc.ScorerConfig.from_dict(json.loads(saved["config"])) == TINY
    assert json.loads(saved["metrics"])["srcc"] == trained.metrics["srcc"]
    assert saved["ratings"] == "160" and saved["init"] == "scratch"


def test_pickles_are_refused_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the loader unpickled a file",))

    pickled = tmp_path / "scorer.safetensors"
    pickled.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(sc.ScorerFileError, match="never unpickled"):
        sc.load_scorer(pickled)


def test_finetune_from_a_trunk_trains_only_the_last_stage(trained, tmp_path):
    trunk = tmp_path / "trunk.safetensors"
    sc.save_scorer(trunk, trained)
    config = sc.ScorerConfig(epochs=2, batch_size=32, seed=1)  # arch/widths come from the file
    tuned = sc.train(synthetic(seed=7), config, init=trunk)
    assert tuned.config.channels == TINY.channels and tuned.init == str(trunk)
    before, after = trained.model.net.state_dict(), tuned.model.net.state_dict()
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    net = tuned.model.net  # only the last stage (and the heads) were given to the optimiser
    assert net.layer4[0].conv1.weight.requires_grad and not net.layer3[0].conv1.weight.requires_grad
    assert tuned.metrics["srcc"] > 0.5, tuned.metrics


def test_picks_train_the_same_model():
    data = synthetic(seed=2)
    picks = [(i, i + 1, float(data.scores[i] > data.scores[i + 1])) for i in range(0, 158, 2)]
    unrated = LatentsFile(
        latents=data.latents,
        scores=torch.full_like(data.scores, float("nan")).index_fill(0, torch.arange(80), 3.0),
        flipped=data.latents.flip(-1),
        sha256s=None,
        metadata={},
    )
    result = sc.train(unrated, sc.ScorerConfig(**{**vars(TINY), "epochs": 2}), picks=picks)
    assert result.pairs == len(picks) and result.ratings == 80
    assert "pick_accuracy" in result.metrics


def test_cli_trains_and_scores(tmp_path, capsys):
    data = synthetic(64)
    latents_file = tmp_path / "data.safetensors"
    save_latents_file(latents_file, data.latents, data.scores, [f"{i:064x}" for i in range(64)])
    out = tmp_path / "scorer.safetensors"
    settings = json.dumps({"channels": [8, 16, 32, 64], "epochs": 2, "batch_size": 16})
    sc.main(["train", "--data", str(latents_file), "--out", str(out), "--config", settings])
    summary = json.loads(capsys.readouterr().out)
    assert {"srcc", "pairwise_accuracy", "seconds"} <= set(summary) and out.is_file()
    sc.main(["score", "--model", str(out), "--data", str(latents_file)])
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert len(scores) == 64 and all(1 <= s <= 5 for s in scores)
    with pytest.raises(SystemExit) as exit_info:
        sc.main(["score", "--model", str(latents_file), "--data", str(latents_file)])
    assert exit_info.value.code == 2 and "not a tastebud scorer" in capsys.readouterr().err


def test_callbacks_report_progress_and_stop():
    seen, stop_after = [], 3
    config = sc.ScorerConfig(**{**vars(TINY), "epochs": 5})

    def progress(step, total, message):
        seen.append((step, total, message))

    result = sc.train(
        synthetic(64), config, progress=progress, should_stop=lambda: len(seen) >= stop_after
    )
    assert result.metrics["epochs"] == 2  # 2 steps per epoch: stopped before the third epoch
    assert seen[0][:2] == (1, 10) and seen[-1][0] == seen[-1][1] == 10


def test_few_ratings_get_more_epochs_to_reach_min_steps():
    config = sc.ScorerConfig(**{**vars(TINY), "epochs": 2, "min_steps": 24, "patience": 100})
    result = sc.train(synthetic(40), config)  # 32 training rows: one step an epoch
    assert result.metrics["epochs"] == 24
    assert sc.train(synthetic(40), TINY).metrics["epochs"] <= TINY.epochs


def test_latent_stats_have_one_width_for_any_latent_size():
    for side in (8, 13, 64):
        assert sc.latent_stats(torch.randn(3, 4, side, side)).shape == (3, sc.stats_width())
    flat, busy = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    busy[..., ::2, :] = 1  # stripes: the same mean, more detail
    gap = sc.latent_stats(busy) - sc.latent_stats(flat)
    assert gap.abs().max() > 0.4 and torch.isfinite(sc.latent_stats(flat)).all()


def test_the_statistics_head_learns_a_global_taste_the_cnn_alone_misses():
    # stars follow each image's overall channel-0 contrast: one statistic, no local pattern
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(240, 4, 8, 8, generator=g) * torch.rand(240, 1, 1, 1, generator=g).mul(2)
    contrast = latents[:, 0].std((1, 2))
    stars = (1 + 4 * (contrast - contrast.min()) / (contrast.max() - contrast.min())).round()
    data = LatentsFile(latents=latents, scores=stars, flipped=None, sha256s=None, metadata={})
    results = {}
    for stats in (False, True):
        trained = sc.train(data, replace(TINY, stats=stats))
        results[stats] = trained.metrics["srcc"]
    assert results[True] > 0.8 and results[True] > results[False] + 0.05, results


def test_a_scorer_file_from_before_the_statistics_head_still_loads(trained, tmp_path):
    old = sc.TrainedScorer(**{**trained.__dict__, "config": replace(TINY, stats=False)})
    old.model = sc.Scorer(old.config)
    path = tmp_path / "old.safetensors"
    sc.save_scorer(path, old)
    tensors = sc.scorer_tensors(old.model)
    assert not any(k.startswith("stats_") for k in tensors)
    config = json.loads(sc.load_scorer(path)[1]["config"])
    del config["stats"]  # as version-1 files were written
    from trainer.tensorfiles import read_safetensors, write_atomic

    _, metadata = read_safetensors(path, sc.ScorerFileError)
    write_atomic(path, tensors, {**metadata, "config": json.dumps(config)})
    loaded, _ = sc.load_scorer(path)
    assert loaded.stats_head is None
    x = synthetic(4, seed=2).latents
    assert torch.equal(sc.predict(loaded, x), sc.predict(old.model, x))


def _spot_taste(n: int, seed: int) -> LatentsFile:
    """Stars for how much is going on in one small spot off the centre and off the thirds,
    against the whole frame: a liking for a place, which global statistics barely hold."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 4, 8, 8, generator=g)
    latents = F.interpolate(coarse, size=(16, 16), mode="bilinear")
    latents += 0.3 * torch.randn(n, 4, 16, 16, generator=g)
    energy = latents.square().mean(1)
    liking = energy[:, 2:6, 10:14].mean((1, 2)) - energy.mean((1, 2))
    scores = (3 + 1.25 * (liking - liking.mean()) / liking.std()).clamp(1, 5).round()
    return LatentsFile(latents=latents, scores=scores, flipped=None, sha256s=None, metadata={})


def _fitted_head_alone(train: LatentsFile, test: LatentsFile, stats: int):
    """The scorer with statistics version `stats`, its fitted head kept (the CNN can't win),
    and its held-out SRCC on `test`."""
    trained = sc.train(train, replace(TINY, stats=stats, epochs=1, baseline_margin=9))
    return trained.model, sc.metrics(sc.predict(trained.model, test.latents), test.scores)["srcc"]


def test_layout_maps_let_the_scorer_learn_a_liking_for_a_place_in_the_frame():
    train, test = _spot_taste(400, seed=1), _spot_taste(300, seed=2)
    (_, summary), (model, layout) = (_fitted_head_alone(train, test, s) for s in (1, 2))
    assert layout > 0.85 and layout > summary + 0.05, (summary, layout)
    maps = sc.layout_mask()  # cross-validation gave the layout maps their say, and the most
    assert model.stats_scale[maps].min() > 0
    assert model.stats_scale[maps].min() >= model.stats_scale[~maps].max()


def _level_taste(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and stars for a liked middle level of one channel: one global quantity among
    the thousands of statistics."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 4, 8, 8, generator=g)
    latents = F.interpolate(coarse, size=(16, 16), mode="bilinear")
    latents += 0.5 * torch.randn(n, 4, 1, 1, generator=g)
    liking = -(latents[:, 0].mean((1, 2)) - 0.3).square()
    liking += 0.3 * liking.std() * torch.randn(n, generator=g)
    return latents, (3 + 1.25 * (liking - liking.mean()) / liking.std()).clamp(1, 5).round()


def test_weighing_the_groups_of_statistics_finds_a_taste_for_one_global_quantity():
    (train, y), (test, y_test) = _level_taste(400, seed=1), _level_taste(300, seed=2)
    stats = sc.stats_of(train)
    mean, std = stats.mean(0), stats.std(0) + 1e-6
    z, z_test = (stats - mean) / std, (sc.stats_of(test) - mean) / std
    groups = sc.stats_groups()
    one_penalty = sc.ridge_choice(z, y, sc.designs(sc.layout_mask(), sc.LAYOUT_SCALES), 3.0)
    weighed = sc.refine_groups(z, y, one_penalty, groups, 3.0)

    def held_out(found) -> float:
        _, alpha, design = found
        weights, _ = sc.ridge(design.features(z), y - 3.0, alpha)
        return sc.metrics(design.features(z_test) @ weights, y_test)["srcc"]

    assert held_out(weighed) > held_out(one_penalty) + 0.03, (held_out(one_penalty), weighed)
    scales = {g: float(weighed[2].scale[groups == k][0]) for k, g in enumerate(sc.STAT_GROUPS)}
    assert max(scales, key=scales.get) == "balance", scales  # where the squared levels are


def test_for_a_global_taste_the_layout_maps_cost_little():
    train, test = synthetic(240, seed=6), synthetic(300, seed=7)
    (_, summary), (_, layout) = (_fitted_head_alone(train, test, s) for s in (1, 2))
    assert layout > summary - 0.03, (summary, layout)


def test_a_scorer_file_from_before_the_layout_maps_still_loads(tmp_path):
    trained = sc.train(synthetic(), replace(TINY, stats=1, epochs=1))
    trained.model.stats_scale.fill_(1.0)  # format 2 knew no scales: every statistic weighed 1
    path = tmp_path / "v2.safetensors"
    sc.save_scorer(path, trained)
    from trainer.tensorfiles import read_safetensors, write_atomic

    tensors, metadata = read_safetensors(path, sc.ScorerFileError)
    config = {**json.loads(metadata["config"]), "stats": True}  # as format 2 wrote it
    del tensors["stats_scale"], tensors["stats_alpha"]
    write_atomic(path, tensors, {**metadata, "version": "2", "config": json.dumps(config)})
    loaded, _ = sc.load_scorer(path)
    assert loaded.stats_version == 1 and loaded.stats_head.in_features == sc.stats_width(1)
    x = synthetic(4, seed=2).latents
    assert torch.allclose(sc.predict(loaded, x), sc.predict(trained.model, x))


def test_a_scorer_refuses_latents_of_another_base_model_family(tmp_path, capsys):
    sdxl = synthetic()
    sdxl = LatentsFile(sdxl.latents, sdxl.scores, None, None, {"family": "sdxl"})
    trained = sc.train(sdxl, replace(TINY, epochs=1))
    assert trained.family == "sdxl"
    path = tmp_path / "sdxl-scorer.safetensors"
    sc.save_scorer(path, trained)
    assert sc.load_scorer(path)[1]["family"] == "sdxl"
    sd1 = synthetic(seed=3)
    data = tmp_path / "sd1.safetensors"
    save_latents_file(data, sd1.latents, sd1.scores, [f"{i:064x}" for i in range(len(sd1.scores))],
                      metadata={"family": "sd1"})  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        sc.main(["score", "--model", str(path), "--data", str(data)])
    assert exited.value.code == 2
    said = capsys.readouterr().err
    assert "trained on SDXL family" in said and "Stable Diffusion 1.x latents" in said
    mine = LatentsFile(sd1.latents, sd1.scores, None, None, {"family": "sd1"})
    with pytest.raises(sc.ScorerFileError, match="the trunk .* SDXL family"):
        sc.train(mine, TINY, init=path)
    unknown = LatentsFile(sd1.latents, sd1.scores, None, None, {})  # files from before: allowed
    assert sc.train(unknown, replace(TINY, epochs=1), init=path).family is None


def test_someone_who_only_compares_gets_a_scorer_that_ranks():
    data = synthetic(200, seed=4)
    g = torch.Generator().manual_seed(1)
    pairs = torch.randint(200, (600, 2), generator=g).tolist()
    picks = [  # no pick between equal stars: which of two equals wins is a coin toss
        (i, j, float(data.scores[i] > data.scores[j]))
        for i, j in pairs
        if data.scores[i] != data.scores[j]
    ]
    no_stars = LatentsFile(
        latents=data.latents,
        scores=torch.full_like(data.scores, float("nan")),
        flipped=None,
        sha256s=None,
        metadata={},
    )
    result = sc.train(no_stars, replace(TINY, epochs=12), picks=picks)
    assert result.ratings == 0 and result.metrics["srcc"] is None
    assert result.metrics["pick_accuracy"] > 0.6, result.metrics  # ~20 held-out picks: rough
    fresh = synthetic(300, seed=9)  # images it never saw, ranked against their stars
    assert sc.metrics(sc.predict(result.model, fresh.latents), fresh.scores)["srcc"] > 0.8


def test_the_scorer_is_less_sure_of_images_unlike_those_it_learnt_from(trained, tmp_path):
    seen = synthetic(40, seed=11).latents
    strange = seen * 6 + 4  # far outside what it was trained on
    familiar, far = sc.uncertainty(trained.model, seen), sc.uncertainty(trained.model, strange)
    assert familiar.shape == (40,) and (familiar >= 0).all()
    assert far.mean() > 3 * familiar.mean()
    path = tmp_path / "scorer.safetensors"
    sc.save_scorer(path, trained)
    assert torch.allclose(sc.uncertainty(sc.load_scorer(path)[0], seen), familiar)


def test_how_much_of_a_crowd_a_scorer_keeps_is_chosen_by_cross_validation(trained, tmp_path):
    crowd = tmp_path / "crowd.safetensors"
    sc.save_scorer(crowd, trained)  # learnt 3 + 2·tanh(pattern)
    test = synthetic(200, seed=22)
    found = {}
    for n in (6, 60, 240):  # 6 ratings: too few to judge (FEW_FOR_CV), the crowd is kept whole
        for taste in ("same", "opposite"):
            mine = synthetic(n, seed=21)
            stars = mine.scores if taste == "same" else 6 - mine.scores
            tuned = sc.train(LatentsFile(mine.latents, stars, None, None, {}), TINY, init=crowd)
            truth = test.scores if taste == "same" else 6 - test.scores
            srcc = sc.metrics(sc.predict(tuned.model, test.latents), truth)["srcc"]
            found[n, taste] = (tuned.metrics["crowd_weight"], srcc)
    assert found[6, "opposite"][0] == 1.0, found
    assert found[60, "opposite"][0] == 0.0 and found[240, "opposite"][0] == 0.0, found
    assert found[60, "same"][0] > 0 and found[240, "same"][1] > 0.8, found
    assert found[60, "opposite"][1] > 0.6 and found[240, "opposite"][1] > 0.8, found
    scratch = sc.train(synthetic(60, seed=21), TINY).metrics
    assert scratch["crowd_weight"] is None and scratch["dropped_crowd"] is False


def test_a_trained_epoch_replaces_the_fitted_head_only_when_it_is_surely_better():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(1, 6, (60,), generator=g).float()
    close = target + 0.3 * torch.randn(60, generator=g)
    guess = torch.randn(60, generator=g)
    assert sc._confidently_better(close, guess, target, 0.95)
    assert not sc._confidently_better(guess, close, target, 0.95)
    assert not sc._confidently_better(close, close, target, 0.5)  # a tie is no win
    # six held-out images (30 ratings): one misordered pair against two is better, not surely
    few = torch.tensor([1.0, 2, 3, 4, 5, 3])
    ours, theirs = torch.tensor([2.0, 1, 3, 4, 5, 3.5]), torch.tensor([2.0, 1, 4, 3, 5, 3.5])
    assert sc._confidently_better(ours, theirs, few, 0.5)
    assert not sc._confidently_better(ours, theirs, few, 0.95)
    unrated = torch.full((4,), float("nan"))  # nothing rated to judge by: no replacement
    assert not sc._confidently_better(unrated, unrated, unrated, 0.0)


def test_with_few_ratings_the_fitted_head_is_chosen_again_on_all_of_them():
    """30 ratings leave 6 held-out images: no epoch can surely beat the fitted head there, and
    the head is then fitted on all 30, its penalty and weights chosen on all of them."""
    data = synthetic(30, seed=4)
    trained = sc.train(data, TINY)
    assert trained.metrics["best_epoch"] == 0, trained.metrics
    fresh = sc.Scorer(TINY)
    fresh.fit_stats(data.latents)
    torch.nn.init.zeros_(fresh.net.fc.weight)
    torch.nn.init.zeros_(fresh.net.fc.bias)
    sc.fit_stats_head(fresh, data.latents, data.scores, torch.arange(30))
    x = synthetic(50, seed=5).latents
    assert torch.allclose(sc.predict(trained.model, x), sc.predict(fresh.eval(), x), atol=1e-5)
