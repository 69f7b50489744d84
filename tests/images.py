"""Test images made on the fly: varied, valid, and deliberately broken ones."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage


def picture(seed: int, size=(320, 320)) -> PILImage.Image:
    """Return a distinct RGB picture for `seed` (smooth noise, so perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return PILImage.fromarray(small).resize(size, PILImage.Resampling.BICUBIC)


def encode(image: PILImage.Image, fmt: str = "PNG", **save) -> bytes:
    """Encode an image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def saturation(data: bytes) -> float:
    """The mean HSV saturation (0–1) of an encoded picture: a simple, visible taste."""
    hsv = np.asarray(PILImage.open(io.BytesIO(data)).convert("HSV"), dtype=float)
    return float(hsv[..., 1].mean() / 255)


def saturation_stars(data: bytes) -> int:
    """Stars (1–5) from a picture's saturation: a synthetic rater who likes vivid pictures."""
    return int(np.clip(1 + saturation(data) * 6, 1, 5))
