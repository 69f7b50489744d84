"""The taste-LoRA loop on the demo model: it raises the held-out score, stops, resumes, refuses."""

from __future__ import annotations

import functools
import json
import pickle
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from trainer import lora
from trainer import scorer as sc
from trainer.base import load_base

# A few seconds per run on a CPU: 6-step schedules, 2 held-out prompts × 2 seeds. Rollout:
# it needs no pictures; the one-step tests below replace the mode.
QUICK = lora.TasteLoraConfig(
    mode="rollout",
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


def real_latents(base, count=12, first=0):
    """The pool's pictures as the site passes them: demo-pack renders through the demo VAE."""
    from trainer.demo_art import render_demo_image
    from trainer.latents import encode_pixels, image_pixels

    pictures = [image_pixels(render_demo_image(first + k), base.resolution) for k in range(count)]
    return encode_pixels(torch.stack(pictures), base.pipeline.vae)


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


@pytest.mark.parametrize("mode", ["rollout", "one_step"])
def test_should_stop_is_honoured_within_one_step_and_resume_matches_a_straight_run(
    base, scorer_file, tmp_path, mode
):
    config = replace(QUICK, mode=mode)
    train = functools.partial(lora.train, images=real_latents(base) if mode != "rollout" else None)
    straight = train(base, scorer_file, tmp_path / "straight", config)

    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    stopped = train(base, scorer_file, tmp_path / "split", config, should_stop=stop_after_three)
    assert stopped["stopped"] and stopped["steps"] == 3
    assert stopped["stopped_because"] == "asked to stop"
    assert (tmp_path / "split" / "checkpoint-000003").is_dir()  # the finished steps are kept

    messages = []
    resumed = train(
        base,
        scorer_file,
        tmp_path / "split",
        config,
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
    settings = {"mode": "rollout", "sample_steps": 4, "window": 2, "eval_prompts": 1}
    settings = json.dumps({**settings, "eval_every": 1})
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


# ---- the one-step and mixed modes, Min-SNR, the recommended strength -------------------------


def test_one_step_mode_raises_the_held_out_score_from_real_latents(base, scorer_file, tmp_path):
    config = replace(QUICK, mode="one_step")
    summary = lora.train(base, scorer_file, tmp_path / "run", config, images=real_latents(base))
    assert summary["mode"] == "one_step" and summary["steps"] == 10
    assert summary["score_gain"] > 0 and 0 < summary["drift"] <= QUICK.max_drift
    # one guided call with gradient (3 + 1 recomputed) and the drift's base call, per step
    assert summary["unet_passes"] == 10 * 5
    state = lora.read_state(tmp_path / "run" / f"checkpoint-{summary['chosen_step']:06d}")
    assert state["config"]["mode"] == "one_step"


def test_one_step_steps_learn_from_the_pictures_they_are_given(base, scorer_file, tmp_path):
    config = replace(QUICK, mode="one_step", steps=2, eval_every=2)
    a = lora.train(base, scorer_file, tmp_path / "a", config, images=real_latents(base, 6, first=0))
    b = lora.train(
        base, scorer_file, tmp_path / "b", config, images=real_latents(base, 6, first=100)
    )
    wa = adapter_weights(tmp_path / "a" / "checkpoint-000002")
    wb = adapter_weights(tmp_path / "b" / "checkpoint-000002")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) > 1e-6
    assert a["history"][0] == b["history"][0]  # the same base, the same start


def test_mixed_mode_interleaves_the_two_kinds_of_step_evenly():
    mixed = replace(QUICK, mode="mixed", one_step_share=0.25)
    kinds = [lora.step_kind(mixed, step) for step in range(100)]
    assert kinds.count("one_step") == 25 and kinds[:4].count("one_step") == 1
    half = [lora.step_kind(replace(mixed, one_step_share=0.5), step) for step in range(4)]
    assert half == ["rollout", "one_step", "rollout", "one_step"]
    assert {lora.step_kind(replace(QUICK, mode="one_step"), s) for s in range(5)} == {"one_step"}


def test_unet_passes_count_what_each_kind_of_step_runs():
    demo = lora.TasteLoraConfig.from_dict({**lora.DEMO_PRESET, "mode": "rollout"})
    # 15 − 4 + (4 − 2)/2 = 12 no-grad calls, then 2 × (forward, backward ×2, recompute, base)
    assert lora.unet_passes(demo) == 12 + 2 * 5
    assert lora.unet_passes(replace(demo, mode="one_step")) == 5
    assert lora.unet_passes(replace(demo, mode="one_step", gradient_checkpointing=False)) == 4
    assert lora.unet_passes(replace(demo, mode="mixed", one_step_share=0.5)) == (22 + 5) / 2
    with_prior = replace(demo, mode="one_step", prior_weight=1.0)  # 1 row against 2 × 4
    assert lora.unet_passes(with_prior) == 5 + 4 / 8


def test_mixed_mode_trains_and_resuming_in_another_mode_is_refused(base, scorer_file, tmp_path):
    config = replace(QUICK, mode="mixed", steps=4, eval_every=2)
    summary = lora.train(base, scorer_file, tmp_path / "run", config, images=real_latents(base))
    assert summary["steps"] == 4 and summary["unet_passes"] == 4 * lora.unet_passes(config)
    rollout = replace(config, mode="rollout", steps=6)
    with pytest.raises(lora.TasteLoraError, match="trained in mode 'mixed'"):
        lora.train(base, scorer_file, tmp_path / "run", rollout, resume=True)


def test_a_saved_config_from_before_the_modes_reads_as_rollout():
    old = {k: v for k, v in asdict(QUICK).items() if k not in ("mode", "one_step_share")}
    assert lora.TasteLoraConfig.from_saved(old).mode == "rollout"
    assert lora.TasteLoraConfig.from_saved({**old, "mode": "mixed"}).mode == "mixed"


def test_modes_that_noise_real_pictures_refuse_to_run_without_them(base, scorer_file, tmp_path):
    with pytest.raises(lora.TasteLoraError, match="needs latents of real pictures"):
        lora.train(base, scorer_file, tmp_path / "a", replace(QUICK, mode="one_step"))
    wide = torch.zeros(4, 4, 16, 16)
    with pytest.raises(lora.TasteLoraError, match=r"shape \[4, 16, 16\].*makes \[4, 8, 8\]"):
        lora.train(base, scorer_file, tmp_path / "b", replace(QUICK, mode="mixed"), images=wide)
    for bad in ({"mode": "onestep"}, {"mode": "mixed", "one_step_share": 1.0}):
        with pytest.raises(lora.TasteLoraError, match="mode|one_step_share"):
            replace(QUICK, **bad).check()
    with pytest.raises(lora.TasteLoraError, match="noise_range"):
        replace(QUICK, noise_range=(0.5, 0.2)).check()
    assert lora.ADAPTER not in getattr(base.pipeline.unet, "peft_config", {})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_is_rebuilt_from_each_kind_of_prediction(prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 400, 999])
    x = scheduler.add_noise(x0, noise, t)
    target = x0 if prediction_type == "sample" else lora.denoising_target(scheduler, x0, noise, t)
    assert torch.allclose(lora.predicted_x0(scheduler, x, target, t), x0, atol=1e-3)
    wrong = lora.predicted_x0(scheduler, x, torch.zeros_like(target), t)
    assert not torch.allclose(wrong, x0, atol=1e-1)


def test_one_step_timesteps_stay_in_the_chosen_share_of_the_schedule():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()  # 1000 training timesteps
    g = torch.Generator().manual_seed(0)
    t = lora._one_step_timesteps(scheduler, (0.2, 0.5), 4000, g)
    assert int(t.min()) == 200 and int(t.max()) == 499
    assert int(lora._one_step_timesteps(scheduler, (0.0, 0.001), 50, g).min()) >= 1  # not t=0


def test_min_snr_weights_cap_the_clean_timesteps_for_noise_and_velocity():
    from diffusers import DDIMScheduler

    eps = DDIMScheduler(prediction_type="epsilon")
    t = torch.tensor([10, 300, 900])
    alpha = eps.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    assert snr[0] > 5 > snr[2]  # one nearly clean timestep, one noisy one
    weights = lora.min_snr_weights(eps, t, 5.0)
    assert torch.allclose(weights, torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-4)
    assert weights[0] < 0.5 and weights[2] == pytest.approx(1.0)
    v = lora.min_snr_weights(DDIMScheduler(prediction_type="v_prediction"), t, 5.0)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-4)
    x0 = lora.min_snr_weights(DDIMScheduler(prediction_type="sample"), t, 5.0)
    assert torch.allclose(x0, torch.minimum(snr, torch.tensor(5.0)), rtol=1e-4)
    assert torch.equal(lora.min_snr_weights(eps, t, 0.0), torch.ones(3))


def test_the_prior_loss_weighs_each_timestep_by_min_snr(base, scorer_file):
    config = replace(QUICK, prior_weight=1.0, prior_images=2)
    run = lora._prepare(base, scorer_file, config)
    try:
        losses = {}
        for gamma in (0.0, 5.0):
            weighted = replace(run, config=replace(config, prior_snr_gamma=gamma))
            with torch.no_grad():
                losses[gamma] = float(lora._prior_loss(weighted, torch.Generator().manual_seed(7)))
    finally:
        lora._release(base)
    g = torch.Generator().manual_seed(7)  # the draws _prior_loss makes: the image, then t
    torch.randint(2, (1,), generator=g)
    t = torch.randint(run.scheduler.config.num_train_timesteps, (1,), generator=g)
    expected = float(lora.min_snr_weights(run.scheduler, t, 5.0))
    assert losses[0.0] > 0 and losses[5.0] == pytest.approx(expected * losses[0.0], rel=1e-4)


def test_the_recommended_strength_is_the_top_of_the_score_curve():
    def recommend(half, full, base=3.0):
        return lora.recommended_strength({"0.5": half, "1": full, "-1": 2.0}, base)

    assert recommend(3.5, 4.0) == 1.0  # still rising at 1
    assert recommend(3.9, 4.0) == 1.0  # bending near the top of the scale, yet still rising
    assert recommend(3.5, 3.2) == 0.55  # a peak between: f = 3 + 1.8·s − 1.6·s², top 0.5625
    assert recommend(3.5, 3.5) == 0.75
    assert recommend(3.01, 2.5) == 0.25  # never below a quarter
    assert recommend(2.9, 2.95) is None  # nothing beats the base
    assert recommend(3.0004, 3.0002) is None  # a tie: an adapter that has not moved yet


def test_the_cli_trains_one_step_from_a_latents_file(scorer_file, tmp_path, capsys):
    from trainer.latents import save_latents_file

    pool = real_latents(load_base("demo", device="cpu"), 6)
    save_latents_file(
        tmp_path / "pool.safetensors",
        pool,
        [3.0] * 6,
        [f"{k:064x}" for k in range(6)],
        flipped=pool.flip(-1),
    )
    assert len(lora.real_latents([tmp_path / "pool.safetensors"])) == 12  # mirrored rows too
    settings = {"mode": "one_step", "sample_steps": 4, "window": 2, "eval_prompts": 1}

    def argv(out):
        return ["train", "--base", "demo", "--scorer", str(scorer_file), "--out", str(out),
                "--steps", "2", "--device", "cpu", "--config", json.dumps(settings)]  # fmt: skip

    lora.main([*argv(tmp_path / "o"), "--latents", str(tmp_path / "pool.safetensors")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "one_step" and summary["steps"] == 2
    with pytest.raises(SystemExit) as exit_info:
        lora.main(argv(tmp_path / "p"))  # no --latents
    assert exit_info.value.code == 2 and "--latents" in capsys.readouterr().err
