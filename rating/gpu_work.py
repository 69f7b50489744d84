"""What every GPU job shares: the base model as the settings say, torch's threads and memory,
encoding images through the latents cache, and JSON-safe results."""

from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from pathlib import Path

from flask import current_app

from rating.media import image_store
from rating.settings import storage_root


def base_model(spec: str, *, vae_only: bool = False):
    """Load a base model as the settings say: BASE_MODEL_CONFIG describes a single-file
    checkpoint offline (a diffusers folder of its configs), DEVICE picks the GPU, PRECISION
    the weights' dtype. `vae_only`: just what encoding and decoding need on the device
    (trainer.base.load_vae)."""
    from trainer.base import load_base, load_vae

    config = current_app.config
    load = load_vae if vae_only else load_base
    return load(
        spec,
        device=config["DEVICE"] or None,
        config=config["BASE_MODEL_CONFIG"] or None,
        precision=config["PRECISION"],
    )


def prompts_file(base) -> Path:
    """The prompt set a job samples from: the TASTE_PROMPTS setting, else the base model's own."""
    return Path(current_app.config.get("TASTE_PROMPTS") or base.prompts_file)


@contextmanager
def gpu_job():
    """Run a GPU job's body with TORCH_THREADS applied; give its GPU memory back after."""
    import torch

    before = torch.get_num_threads()
    # Half the cores by default: torch's one thread per core spins against the web server and
    # anything else running, and on a busy 2-core machine that was 10× slower than 1 thread.
    threads = int(current_app.config["TORCH_THREADS"]) or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)  # process-wide, but one GPU job runs at a time
    try:
        yield
    finally:
        torch.set_num_threads(before)
        release_memory()  # the next job (or a refine) starts from a clean slate


def release_memory() -> None:
    """Collect what nothing refers to any more, and hand the GPU's cached memory back."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_pictures(base, images, progress, should_stop):
    """Encode pool images (Image rows) through the base model's VAE, only the VAE on the GPU,
    each image once ever (the latents cache under the storage root)."""
    from trainer.base import only_vae_on_gpu
    from trainer.latents import LatentsConfig, encode_images

    settings = {
        "cache_dir": str(storage_root() / "latents-cache"),
        **current_app.config["TASTE_LATENTS"],
    }
    store = image_store()
    with only_vae_on_gpu(base.pipeline):
        return encode_images(
            [store.original_path(image.sha256, image.original_ext) for image in images],
            base.pipeline.vae,
            resolution=base.resolution,
            config=LatentsConfig.from_dict(settings),
            progress=progress,
            should_stop=should_stop,
        )


def plain(value):
    """Make trainer output JSON-safe: floats finite or None, tuples as lists, paths as text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):  # a 0-d tensor or numpy number
        return plain(value.item())
    return str(value)
