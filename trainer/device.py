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


def pick_device() -> torch.device:
    """Return the best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
