"""Where torch work runs: CUDA, then Apple MPS, then CPU (kept apart from diffusers' imports)."""

import torch


def half_dtype(device: torch.device) -> torch.dtype:
    """The half precision a device computes natively: bf16 on CUDA cards that have it (Ampere
    and later), else fp16. Turing and Volta (T4, RTX 20xx, V100) only emulate bf16, and their
    efficient attention kernels can't run it: attention would fall back to the math path, out
    of memory on 8–11 GB cards."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


PRECISIONS = ("auto", "half", "full")


def weights_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a base model's weights load in on `device`. "auto": half precision on CUDA
    (half_dtype), fp32 elsewhere; "half": also fp16 on Apple MPS (half the memory of a
    16 GB Mac's shared RAM; the SDXL VAE's fp16 overflow falls back to fp32 per chunk);
    "full": fp32 everywhere. CPUs stay fp32 whatever is asked: half precision there is slow,
    and some kernels are missing or wrong."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "full":
        return torch.float32
    if device.type == "cuda":
        return half_dtype(device)
    if device.type == "mps" and precision == "half":
        return torch.float16
    return torch.float32


def pick_device() -> torch.device:
    """Return the best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
