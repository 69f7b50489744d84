"""Multi-task pretraining: one Lion per criterion, the dataset adapters, the trunk as --init."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.optim import Lion

from trainer import pretrain as pt
from trainer import scorer as sc
from trainer.latents import LatentsFile, LatentsFileError, save_latents_file

# Tiny and quick: 4×8×8 latents, a narrow resnet18, a brisk Lion rate for a short run.
TINY = pt.PretrainConfig(channels=(8, 16, 32, 64), steps=40, batch_size=16, lr=2e-3, warmup_steps=5)


def planted(n: int = 96, side: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with a planted signal in channel 0 (top vs bottom), and that signal per row."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, side, side, generator=g)
    pattern = torch.ones(side, side)
    pattern[: side // 2] = -1  # survives mirroring
    latents[:, 0] += torch.randn(n, 1, 1, generator=g) * pattern
    return latents, (latents[:, 0] * pattern).mean((1, 2))


def tasks(seed: int = 0) -> list[pt.Task]:
    """Three tasks on the same latents, each a different function of the planted signal."""
    latents, signal = planted(seed=seed)
    rows = torch.arange(len(latents))
    bins = torch.arange(1.0, 11)
    centre = (5.5 + 2.5 * signal).clamp(1, 10).unsqueeze(-1)
    votes = (-((bins - centre) ** 2) / 2).softmax(-1)
    classes = (signal > -0.4).long() + (signal > 0.4).long()
    scores = signal + 0.1 * torch.randn(len(signal), generator=torch.Generator().manual_seed(1))
    return [
        pt.Task("votes", "distribution", latents, rows, votes, 10),
        pt.Task("classes", "classes", latents, rows, classes, 3),
        pt.Task("scores", "regression", latents, rows, (scores - scores.mean()) / scores.std(), 1),
    ]


@pytest.fixture(scope="module")
def trained() -> pt.PretrainedTrunk:
    return pt.pretrain(tasks(), TINY)


def write_images(folder: Path, names: list[str]) -> list[str]:
    """Write stand-in image files (only their bytes matter: rows are found by sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    sha256s = []
    for name in names:
        content = f"image {folder.name}/{name}".encode()
        (folder / name).write_bytes(content)
        sha256s.append(hashlib.sha256(content).hexdigest())
    return sha256s


def write_latents(path: Path, sha256s: list[str], seed: int = 0) -> LatentsFile:
    latents = torch.randn(len(sha256s), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    save_latents_file(path, latents, torch.zeros(len(sha256s)), sha256s)
    return LatentsFile(latents, torch.zeros(len(sha256s)), None, sha256s, {})


def ava_line(index: int, image_id: int, votes: list[int]) -> str:
    return " ".join(map(str, [index, image_id, *votes, 0, 0, 1396])) + "\n"


# ---- the loop -------------------------------------------------------------------------------


def test_two_criteria_step_two_lion_optimisers(monkeypatch):
    built: list[Lion] = []
    steps: list[Lion] = []

    class CountingLion(Lion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

        def step(self, closure=None):
            steps.append(self)
            return super().step(closure)

    monkeypatch.setattr(pt, "Lion", CountingLion)
    two = tasks()[:2]
    result = pt.pretrain(two, pt.PretrainConfig(**{**vars(TINY), "steps": 4}))
    assert len(built) == 2 and steps == built * 4  # each steps once a round, in task order
    trunk = {id(p) for n, p in result.model.net.named_parameters() if not n.startswith("fc.")}
    for own, other, optimizer in zip(result.heads, result.heads[::-1], built, strict=True):
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert params == trunk | {id(p) for p in own.parameters()}
        assert not params & {id(p) for p in other.parameters()}  # never steps another's head
        assert all("exp_avg" in optimizer.state[p] for p in own.parameters())


def test_loss_scale_changes_nothing_and_a_seed_repeats(monkeypatch):
    config = pt.PretrainConfig(**{**vars(TINY), "steps": 6})
    votes, _, scores = tasks()
    state = lambda r: {**r.model.state_dict(), **r.heads.state_dict()}  # noqa: E731
    base = state(pt.pretrain([votes, scores], config))
    again = state(pt.pretrain([votes, scores], config))
    assert all(torch.equal(again[k], v) for k, v in base.items())

    # Lion steps by the sign of its momentum, so a loss 1024× larger (a power of two, so
    # exact in floating point) trains exactly the same net: no criterion needs a weight.
    plain = pt.task_loss

    def scaled(kind, outputs, targets):
        return plain(kind, outputs, targets) * (1024 if kind == "regression" else 1)

    monkeypatch.setattr(pt, "task_loss", scaled)
    louder = state(pt.pretrain([votes, scores], config))
    assert all(torch.equal(louder[k], v) for k, v in base.items())
    reseeded = pt.PretrainConfig(**{**vars(config), "seed": 1})
    other = state(pt.pretrain([votes, scores], reseeded))
    assert not torch.equal(other["net.conv1.weight"], base["net.conv1.weight"])


def mean_guess_loss(task: pt.Task) -> float:
    """The loss of always guessing the task's mean target (class shares, vote shares, score)."""
    t = task.targets
    if task.kind == "regression":
        return float(pt.task_loss(task.kind, t.mean().expand(len(t), 1), t))
    shares = t.mean(0) if task.kind == "distribution" else torch.bincount(t) / len(t)
    return float(pt.task_loss(task.kind, shares.log().expand(len(t), -1), t))


def test_pretraining_learns_each_tasks_planted_signal(trained):
    assert [t["name"] for t in trained.tasks] == ["votes", "classes", "scores"]
    for task, record in zip(tasks(), trained.tasks, strict=True):
        assert record["final_loss"] < 0.7 * mean_guess_loss(task), record
        assert record["final_loss"] < record["first_loss"], record
    assert trained.steps == TINY.steps and trained.input_shape == [4, 8, 8]


def test_callbacks_report_progress_and_stop():
    seen = []

    def progress(step, total, message):
        seen.append((step, total, message))

    config = pt.PretrainConfig(**{**vars(TINY), "steps": 10})
    result = pt.pretrain(tasks()[:2], config, progress=progress, should_stop=lambda: len(seen) >= 3)
    assert result.steps == 3 and [s[:2] for s in seen] == [(1, 10), (2, 10), (3, 10)]
    assert seen[0][2].startswith("step 1: votes ") and "classes " in seen[0][2]


def test_config_refuses_unknown_keys_and_tasks_it_cannot_train():
    with pytest.raises(TypeError, match="unknown PretrainConfig keys"):
        pt.PretrainConfig.from_dict({"steps": 2, "loss_weights": [1, 2]})
    assert pt.PretrainConfig.from_dict({"channels": [8, 16, 32, 64]}).channels == (8, 16, 32, 64)
    votes, classes, _ = tasks()
    big = torch.randn(4, 4, 16, 16)
    small = pt.Task("small", "classes", big, torch.arange(4), torch.ones(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="differ in shape"):
        pt.pretrain([votes, small], TINY)
    with pytest.raises(ValueError, match="needs at least one task"):
        pt.pretrain([], TINY)
    odd = pt.Task("odd", "ranking", classes.latents, classes.rows, classes.targets, 3)
    with pytest.raises(ValueError, match="kind 'ranking'"):
        pt.pretrain([odd], TINY)
    narrow = pt.Task("narrow", "classes", classes.latents, classes.rows, classes.targets, 2)
    with pytest.raises(ValueError, match="'narrow': its targets do not fit a head of 2"):
        pt.pretrain([narrow], TINY)


# ---- datasets -------------------------------------------------------------------------------


def test_read_ava_gives_vote_distributions(tmp_path):
    ava = tmp_path / "AVA.txt"
    ava.write_text(
        ava_line(1, 953619, [0, 1, 5, 17, 38, 36, 15, 6, 5, 1])
        + "\n"  # blank lines are skipped
        + ava_line(2, 953958, [10, 0, 0, 0, 0, 0, 0, 0, 0, 30])
    )
    ids, distributions = pt.read_ava(ava)
    assert ids == ["953619", "953958"] and distributions.shape == (2, 10)
    assert torch.allclose(distributions.sum(-1), torch.ones(2))
    assert distributions[0, 4] == pytest.approx(38 / 124)
    assert distributions[1].tolist() == [0.25] + [0.0] * 8 + [0.75]


def test_ava_task_finds_images_by_content(tmp_path):
    ava = tmp_path / "AVA.txt"
    ava.write_text(
        ava_line(1, 11, [1] + [0] * 9)
        + ava_line(2, 12, [0] * 9 + [1])
        + ava_line(3, 13, [0, 1] + [0] * 8)  # its image was never downloaded
        + ava_line(4, 14, [0, 0, 1] + [0] * 7)  # downloaded but never encoded
    )
    shas = write_images(tmp_path / "images", ["11.jpg", "12.jpg", "14.jpg"])
    latents = tmp_path / "ava.safetensors"
    data = write_latents(latents, [shas[1], "f" * 64, shas[0]])  # any order, extra rows
    task = pt.ava_task(ava, tmp_path / "images", latents)
    assert task.kind == "distribution" and task.outputs == 10
    assert task.rows.tolist() == [2, 0] and task.targets.argmax(-1).tolist() == [0, 9]
    assert torch.equal(task.latents[task.rows[0]], data.latents[2])
    assert task.info["skipped"] == 2 and task.info["latents"] == str(latents)


def test_classes_task_takes_a_subfolder_per_class(tmp_path):
    folder = tmp_path / "styles"
    cats = write_images(folder / "cat", ["a.png", "b.jpg"])
    dogs = write_images(folder / "dog", ["c.webp"])
    (folder / "dog" / "notes.txt").write_text("not an image")
    latents = tmp_path / "styles.safetensors"
    write_latents(latents, [dogs[0], cats[1], cats[0]])
    task = pt.classes_task(folder, latents)
    assert task.name == "classes:styles" and task.outputs == 2
    assert task.info["classes"] == ["cat", "dog"] and task.info["skipped"] == 0
    assert task.rows.tolist() == [2, 1, 0] and task.targets.tolist() == [0, 0, 1]


def test_regression_task_reads_paths_and_sha256s_and_standardises(tmp_path):
    shas = write_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    csv_file = tmp_path / "scores.csv"
    csv_file.write_text(f"path,score\nimages/a.png,1\nimages/b.png,3\n{shas[2].upper()},8\n")
    latents = tmp_path / "x.safetensors"
    write_latents(latents, list(reversed(shas)))
    task = pt.regression_task(csv_file, latents)
    assert task.rows.tolist() == [2, 1, 0] and task.outputs == 1
    assert task.info["mean"] == pytest.approx(4.0) and task.targets.mean().abs() < 1e-6
    assert torch.allclose(task.targets * task.info["std"] + 4, torch.tensor([1.0, 3.0, 8.0]))


def test_bad_inputs_give_clear_errors(tmp_path):
    latents = tmp_path / "x.safetensors"
    shas = write_images(tmp_path / "images", ["1.jpg", "2.jpg"])
    write_latents(latents, shas)
    with pytest.raises(pt.PretrainDataError, match="no AVA file at"):
        pt.ava_task(tmp_path / "missing.txt", tmp_path / "images", latents)
    ava = tmp_path / "AVA.txt"
    ava.write_text(ava_line(1, 1, [1] * 10) + "2 2 1 1 1 1 1 1 1 1 1 x 0 0 3\n")
    with pytest.raises(pt.PretrainDataError, match=r"AVA.txt line 2: expected 15 whole numbers"):
        pt.read_ava(ava)
    ava.write_text(ava_line(1, 1, [0] * 10))
    with pytest.raises(pt.PretrainDataError, match="line 1: image 1 has no votes"):
        pt.read_ava(ava)
    ava.write_text(ava_line(1, 7, [1] * 10))
    with pytest.raises(pt.PretrainDataError, match="none of the 1 images of .* is in"):
        pt.ava_task(ava, tmp_path / "images", latents)
    with pytest.raises(LatentsFileError, match="no latents file at"):
        pt.ava_task(ava, tmp_path / "images", tmp_path / "nope.safetensors")

    folder = tmp_path / "styles"
    write_images(folder / "cat", ["a.png"])
    with pytest.raises(pt.PretrainDataError, match="a subfolder per class, two or more"):
        pt.classes_task(folder, latents)
    dogs = write_images(folder / "dog", ["b.png"])
    write_latents(tmp_path / "dogs.safetensors", dogs)
    with pytest.raises(pt.PretrainDataError, match="class 'cat' of .* has no image in"):
        pt.classes_task(folder, tmp_path / "dogs.safetensors")
    (folder / "cow").mkdir()
    with pytest.raises(pt.PretrainDataError, match="class 'cow' .* holds no images"):
        pt.classes_task(folder, latents)

    csv_file = tmp_path / "scores.csv"
    csv_file.write_text("image,score\n1.jpg,3\n")
    with pytest.raises(pt.PretrainDataError, match="'path' and 'score' columns"):
        pt.regression_task(csv_file, latents)
    csv_file.write_text("path,score\nimages/1.jpg,3\nimages/2.jpg,lots\n")
    with pytest.raises(pt.PretrainDataError, match="line 3: score 'lots' is not a number"):
        pt.regression_task(csv_file, latents)
    csv_file.write_text("path,score\nimages/1.jpg,3\nimages/2.jpg,3\n")
    with pytest.raises(pt.PretrainDataError, match="scores of its encoded images are all equal"):
        pt.regression_task(csv_file, latents)
    nameless = tmp_path / "nameless.safetensors"
    save_file({"latents": torch.randn(2, 4, 8, 8), "scores": torch.ones(2)}, str(nameless))
    with pytest.raises(pt.PretrainDataError, match="does not record its images' sha256s"):
        pt.regression_task(csv_file, nameless)


# ---- the trunk file -------------------------------------------------------------------------


def test_saved_trunk_starts_a_scorer(trained, tmp_path):
    path = tmp_path / "trunk.safetensors"
    pt.save_trunk(path, trained)
    loaded, metadata = sc.load_scorer(path)  # a scorer file, whose star head is untrained
    assert pt.PretrainConfig.from_dict(json.loads(metadata["pretrain"])) == TINY
    assert [t["name"] for t in json.loads(metadata["tasks"])] == ["votes", "classes", "scores"]
    assert json.loads(metadata["input_shape"]) == [4, 8, 8] and metadata["steps"] == "40"

    latents, signal = planted(seed=3)
    stars = (3 + 2 * torch.tanh(2 * signal)).round()
    data = LatentsFile(latents, stars, None, None, {})
    tuned = sc.train(data, sc.ScorerConfig(epochs=1, batch_size=32), init=path)
    assert tuned.config.channels == TINY.channels and tuned.init == str(path)
    before = trained.model.net.state_dict()
    after = tuned.model.net.state_dict()
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])


def test_cli_pretrains_a_trunk_the_scorer_cli_starts_from(tmp_path, capsys):
    shas = write_images(tmp_path / "images", [f"{i}.jpg" for i in range(1, 9)])
    latents = tmp_path / "x.safetensors"
    write_latents(latents, shas)
    ava = tmp_path / "AVA.txt"
    ava.write_text("".join(ava_line(i, i, [i, 1, 2, 3, 4, 5, 6, 7, 8, 9]) for i in range(1, 9)))
    csv_file = tmp_path / "scores.csv"
    csv_file.write_text("path,score\n" + "".join(f"images/{i}.jpg,{i}\n" for i in range(1, 9)))
    out = tmp_path / "trunk.safetensors"
    settings = json.dumps({"channels": [8, 16, 32, 64], "batch_size": 4, "warmup_steps": 1})
    pt.main(
        ["--ava", str(ava), str(tmp_path / "images"), str(latents)]
        + ["--regression", str(csv_file), str(latents), "--out", str(out)]
        + ["--steps", "3", "--seed", "2", "--config", settings]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["steps"] == 3 and "seconds" in summary
    assert [(t["name"], t["rows"]) for t in summary["tasks"]] == [
        ("ava", 8),
        ("regression:scores", 8),
    ]
    assert all(t["final_loss"] > 0 for t in summary["tasks"])

    data = tmp_path / "rated.safetensors"
    latents_in, signal = planted(32)
    save_latents_file(data, latents_in, (3 + signal).clamp(1, 5), [f"{i:064x}" for i in range(32)])
    scorer_out = tmp_path / "scorer.safetensors"
    train_args = ["train", "--data", str(data), "--out", str(scorer_out), "--init", str(out)]
    sc.main([*train_args, "--config", json.dumps({"epochs": 1, "batch_size": 16})])
    assert json.loads(capsys.readouterr().out)["init"] == str(out)
    assert sc.load_scorer(scorer_out)[0].net.layer1[0].conv1.out_channels == 8


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pt.main(["--out", str(tmp_path / "trunk.safetensors")])
    assert exit_info.value.code == 2 and "at least one task" in capsys.readouterr().err
    missing = ["--classes", str(tmp_path / "none"), str(tmp_path / "x.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        pt.main([*missing, "--out", str(tmp_path / "trunk.safetensors")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no class folder at")
    with pytest.raises(SystemExit) as exit_info:
        pt.main([*missing, "--out", "t.safetensors", "--config", '{"epochs": 3}'])
    assert "unknown PretrainConfig keys: ['epochs']" in capsys.readouterr().err
