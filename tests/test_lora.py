"""The taste-LoRA loop on the demo model: it raises the held-out score, stops, resumes, refuses."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from trainer import lora
from trainer import scorer as sc
from trainer.base import load_base

# A few seconds per run on a CPU: 6-step schedules, 2 held-out prompts × 2 seeds.
QUICK = lora.TasteLoraConfig(
    steps=10,
    lr=1e-3,
    sample_steps=6,
    window=3,
    eval_every=5,
    eval_prompts=2,
    eval_seeds=(0, 1),
    keep_checkpoints=2,
)


def save_random_scorer(path, shape=(4, 8, 8), seed=0, family=None):
    """A tiny untrained scorer: any differentiable score will do for the loop to climb."""
    config = sc.ScorerConfig(channels=(8, 16, 32, 64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sc.Scorer(config).eval()
    trained = sc.TrainedScorer(model, config, {}, list(shape), 0, 0, "scratch", family)
    sc.save_scorer(path, trained)
    return path


@pytest.fixture
def scorer_file(tmp_path):
    return save_random_scorer(tmp_path / "scorer.safetensors")


@pytest.fixture
def base():
    return load_base("demo", device="cpu")


def adapter_weights(folder):
    return load_file(str(folder / lora.WEIGHTS_NAME))


def test_training_raises_the_held_out_score_and_keeps_the_pipeline_clean(
    base, scorer_file, tmp_path
):
    said = []
    summary = lora.train(
        base, scorer_file, tmp_path / "run", QUICK, progress=lambda *a: said.append(a)
    )
    assert summary["steps"] == 10 and not summary["stopped"]
    # The live drift is the evaluation's measure (relative RMS), not a raw squared error.
    live = [float(m.rsplit("drift ", 1)[1]) for _, _, m in said if "drift " in m]
    assert len(live) == 10 and all(0 <= d < 1 for d in live), live
    assert max(live) > 0.3 * summary["history"][-1]["drift"]  # the same scale as the table
    assert summary["score_gain"] > 0
    assert summary["lora_score"] > summary["base_score"]
    by_strength = summary["scores_by_strength"]
    assert (
        by_strength["1"] > by_strength["0.5"] > by_strength["-1"]
    )  # anti-taste goes the other way
    assert 0 < summary["drift"] <= QUICK.max_drift
    assert summary["diversity"] >= QUICK.min_diversity
    assert [e["step"] for e in summary["history"]] == [0, 5, 10]
    chosen = tmp_path / "run" / f"checkpoint-{summary['chosen_step']:06d}"
    assert summary["chosen_checkpoint"] == str(chosen)
    assert "highest held-out score" in summary["reason"]
    state = lora.read_state(chosen)
    assert state["rank"] == QUICK.rank and state["alpha"] == QUICK.alpha
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 10
    # The caller gets its pipeline back without the adapter, ready for apply_lora.
    assert lora.ADAPTER not in getattr(base.pipeline.unet, "peft_config", {})
    assert not base.pipeline.unet.is_gradient_checkpointing


def test_checkpoints_are_pruned_to_the_last_few_and_the_best(base, scorer_file, tmp_path):
    config = replace(QUICK, steps=4, eval_every=1, keep_checkpoints=2, patience=10)
    summary = lora.train(base, scorer_file, tmp_path / "run", config)
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    best = f"checkpoint-{summary['chosen_step']:06d}"
    assert kept[-2:] == ["checkpoint-000003", "checkpoint-000004"]
    assert set(kept) <= {"checkpoint-000003", "checkpoint-000004", best}
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # no temp folders left behind


def test_should_stop_is_honoured_within_one_step_and_resume_matches_a_straight_run(
    base, scorer_file, tmp_path
):
    straight = lora.train(base, scorer_file, tmp_path / "straight", QUICK)

    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    stopped = lora.train(base, scorer_file, tmp_path / "split", QUICK, should_stop=stop_after_three)
    assert stopped["stopped"] and stopped["steps"] == 3
    assert stopped["stopped_because"] == "asked to stop"
    assert (tmp_path / "split" / "checkpoint-000003").is_dir()  # the finished steps are kept

    messages = []
    resumed = lora.train(
        base,
        scorer_file,
        tmp_path / "split",
        QUICK,
        resume=True,
        progress=lambda step, total, message: messages.append((step, message)),
    )
    assert messages[0] == (3, "resumed from step 3")
    assert resumed["steps"] == 10 and [e["step"] for e in resumed["history"]] == [0, 5, 10]
    # Per-step seeds and the restored optimiser state make the resumed run the straight run.
    a = adapter_weights(tmp_path / "straight" / "checkpoint-000010")
    b = adapter_weights(tmp_path / "split" / "checkpoint-000010")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert resumed["score_gain"] == pytest.approx(straight["score_gain"], abs=1e-3)


def test_drift_past_the_cap_stops_training_and_is_never_chosen(base, scorer_file, tmp_path):
    config = replace(QUICK, max_drift=1e-6, lr=1e-2)
    summary = lora.train(base, scorer_file, tmp_path / "run", config)
    assert summary["steps"] == 5
    assert "drift" in summary["stopped_because"] and "passed the cap" in summary["stopped_because"]
    assert summary["chosen_step"] == 0  # the only checkpoint within the cap: the base itself
    assert summary["score_gain"] == 0


@pytest.mark.parametrize("optimizer", ["lion", "prodigy"])
def test_other_optimisers_train(base, scorer_file, tmp_path, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-4
    config = replace(QUICK, steps=2, eval_every=2, optimizer=optimizer, lr=lr)
    summary = lora.train(base, scorer_file, tmp_path / "run", config)
    assert summary["steps"] == 2
    weights = adapter_weights(tmp_path / "run" / "checkpoint-000002")
    assert any(k.endswith("lora.up.weight") and v.abs().max() > 0 for k, v in weights.items())


def test_dora_and_wider_targets_add_their_modules(base, scorer_file, tmp_path):
    config = replace(QUICK, steps=1, eval_every=1, use_dora=True, targets="attention+ff")
    lora.train(base, scorer_file, tmp_path / "run", config)
    keys = adapter_weights(tmp_path / "run" / "checkpoint-000001").keys()
    assert any("ff.net.2" in k for k in keys)
    assert any("lora_magnitude_vector" in k for k in keys)


def test_bad_inputs_are_refused_with_a_clear_message(base, scorer_file, tmp_path):
    with pytest.raises(TypeError, match="unknown TasteLoraConfig keys"):
        lora.TasteLoraConfig.from_dict({"stepz": 3})
    with pytest.raises(lora.TasteLoraError, match="grad_steps <= window"):
        lora.train(base, scorer_file, tmp_path / "a", replace(QUICK, window=1, grad_steps=2))
    half = load_base("demo", device="cpu", dtype=torch.float16)
    with pytest.raises(lora.TasteLoraError, match="load it with dtype=torch.float32"):
        lora.train(half, scorer_file, tmp_path / "h", QUICK)
    wrong = save_random_scorer(tmp_path / "wide.safetensors", shape=(4, 64, 64))
    with pytest.raises(lora.TasteLoraError, match=r"shape \[4, 64, 64\].*makes \[4, 8, 8\]"):
        lora.train(base, wrong, tmp_path / "b", QUICK)
    sdxl = save_random_scorer(tmp_path / "sdxl.safetensors", family="sdxl")  # the same shape
    with pytest.raises(lora.TasteLoraError, match="trained on SDXL family.*Stable Diffusion 1"):
        lora.train(base, sdxl, tmp_path / "x", QUICK)
    pickled = tmp_path / "scorer.ckpt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(sc.ScorerFileError, match="never unpickled"):
        lora.train(base, pickled, tmp_path / "c", QUICK)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    assert lora.ADAPTER not in getattr(base.pipeline.unet, "peft_config", {})


def test_cli_prints_a_json_summary_and_reports_errors(scorer_file, tmp_path, capsys):
    settings = json.dumps({"sample_steps": 4, "window": 2, "eval_prompts": 1, "eval_every": 1})
    argv = [
        "train",
        "--base",
        "demo",
        "--scorer",
        str(scorer_file),
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
        "--rank",
        "2",
        "--device",
        "cpu",
        "--config",
        settings,
    ]
    lora.main(argv)
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["chosen_checkpoint"].startswith(str(tmp_path))
    assert lora.read_state(tmp_path / "o" / "checkpoint-000001")["rank"] == 2
    with pytest.raises(SystemExit) as exit_info:
        lora.main(
            [
                "train",
                "--base",
                str(tmp_path / "nowhere"),
                "--scorer",
                str(scorer_file),
                "--out",
                str(tmp_path / "p"),
            ]
        )
    assert exit_info.value.code == 2
    assert "no base model at" in capsys.readouterr().err


def test_the_prior_loss_targets_what_the_model_predicts_noise_or_velocity():
    from diffusers import DDIMScheduler

    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDIMScheduler(prediction_type="epsilon")
    assert torch.equal(lora.denoising_target(eps, x0, noise, t), noise)
    v = DDIMScheduler(prediction_type="v_prediction")
    alpha = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0  # v = √ᾱ·ε − √(1−ᾱ)·x0
    assert torch.allclose(lora.denoising_target(v, x0, noise, t), velocity, atol=1e-6)
