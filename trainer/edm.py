"""EDM-trained bases (Playground v2.5) run as the variance-preserving, noise-predicting models
the rest of tastebud samples, trains and evaluates.

An EDM UNet is a denoiser in Karras et al.'s preconditioning: at noise level σ it sees
c_in(σ)·x and c_noise(σ) = ¼·ln σ, and x̂0 = c_skip(σ)·x + c_out(σ)·F(…), with x = x0 + σ·ε
("variance exploding"). The same process, rescaled, is the DDPM one: x_vp = x / √(1 + σ²) =
√ᾱ·x0 + √(1 − ᾱ)·ε with ᾱ = 1 / (1 + σ²). So with a grid of 1,000 noise levels (Playground's
own exponential spacing between σ_min and σ_max) as timesteps, a DDIM scheduler whose ᾱ_t is
1 / (1 + σ_t²), and hooks on the UNet that turn (x_vp, t) into the EDM inputs and its x̂0 back
into ε, everything written for SD — the DDIM rollouts and x̂0 of the taste LoRA, its prior
loss, the grid, the blind check — runs the EDM model unchanged. DDIM on these levels is the
EDM paper's deterministic Euler sampler. The hooks keep the UNet the same module, so LoRA
layers, checkpoints and exported keys are those of any SDXL-structured UNet.
"""

from __future__ import annotations

import math
import threading

import torch
from diffusers import EDMDPMSolverMultistepScheduler

TRAIN_STEPS = 1000  # noise levels on the grid, as DDPM's timesteps


def is_edm(config) -> bool:
    """Whether a scheduler config is an EDM one (Playground v2.5's EDMDPMSolverMultistep)."""
    return "sigma_data" in config or str(config.get("_class_name", "")).startswith("EDM")


def noise_levels(config) -> torch.Tensor:
    """σ for timesteps 0…999: log-evenly spaced from σ_min to σ_max (float64)."""
    low, high = math.log(config["sigma_min"]), math.log(config["sigma_max"])
    return torch.linspace(low, high, TRAIN_STEPS, dtype=torch.float64).exp()


def vp_scheduler_config(config) -> dict:
    """A DDIM scheduler config whose ᾱ_t = 1 / (1 + σ_t²) on the EDM model's noise levels,
    sampled from the noisiest level ("trailing"), predicting ε."""
    alphas_cumprod = 1 / (1 + noise_levels(config) ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {
        "num_train_timesteps": TRAIN_STEPS,
        "trained_betas": (1 - alphas_cumprod / previous).tolist(),
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }


class EdmAsEpsilon:
    """Hooks on an EDM UNet so that unet(x_vp, t, …) answers ε, as an SD UNet does."""

    def __init__(self, unet: torch.nn.Module, edm_config):
        self.edm = EDMDPMSolverMultistepScheduler.from_config(edm_config)
        self.sigmas = noise_levels(edm_config).float()
        self._calls = threading.local()  # (x, σ) of each call in flight, innermost last
        self.handles = [
            unet.register_forward_pre_hook(self._inputs, with_kwargs=True),
            unet.register_forward_hook(self._outputs, with_kwargs=True),
        ]

    def _inputs(self, _unet, args, kwargs):
        args = list(args)
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        sigma = self.sigmas.to(sample.device)[t].expand(len(sample)).reshape(-1, 1, 1, 1)
        x = sample.float() * (1 + sigma**2).sqrt()  # back to x0 + σ·ε
        stack = getattr(self._calls, "stack", None) or []
        self._calls.stack = [*stack, (x, sigma)]
        inputs = self.edm.precondition_inputs(x, sigma).to(sample.dtype)
        noise = self.edm.precondition_noise(sigma.reshape(-1))
        if args:
            args[0] = inputs
        else:
            kwargs["sample"] = inputs
        if len(args) > 1:
            args[1] = noise
        else:
            kwargs["timestep"] = noise
        return tuple(args), kwargs

    def _outputs(self, _unet, _args, _kwargs, output):
        *rest, (x, sigma) = self._calls.stack
        self._calls.stack = rest
        raw = output[0] if isinstance(output, tuple) else output.sample
        x0 = self.edm.precondition_outputs(x, raw.float(), sigma)
        eps = ((x - x0) / sigma).to(raw.dtype)
        if isinstance(output, tuple):
            return (eps, *output[1:])
        output.sample = eps
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def as_variance_preserving(pipeline):
    """Make an EDM pipeline sample and train as an ε-predicting DDPM one: hooks on its UNet
    and a DDIM scheduler on its own noise levels. Returns the pipeline."""
    edm_config = dict(pipeline.scheduler.config)
    pipeline.unet.edm_as_epsilon = EdmAsEpsilon(pipeline.unet, edm_config)
    from trainer.base import ddim_scheduler  # base imports this module

    pipeline.scheduler = ddim_scheduler(vp_scheduler_config(edm_config))
    return pipeline
