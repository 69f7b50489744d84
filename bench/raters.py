"""Synthetic raters that judge pixels, and a style classifier trained on real demo renders.

Each rater has one kind of taste, measured on the picture as the demo world sees it (fit to
32 px, as the site's encoder crops and resizes): colour temperature, palette softness, a
liking for some styles over others, amount of detail, a favourite hue. Its noiseless stars
map the measure's z-score (against the pictures it was calibrated on) onto 1–5; its given
ratings add rater noise and round to whole stars, as a person's would.

The style classifier is a small CNN trained on real demo-pack renders; it is the "styles"
rater's eye and the judge of prompt control in bench/demo_world_quality.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.demo_art import DEMO_STYLES
from trainer.demo_world import fit_picture, render_world_data, to_pixels
from trainer.tensorfiles import read_safetensors, write_atomic

SIDE = 32  # raters and the classifier judge pictures at the demo world's resolution


def as_array(image: Image.Image) -> np.ndarray:
    """A picture as float RGB [32, 32, 3] in [0, 1], cropped and resized as the encoder does."""
    return fit_picture(image, SIDE).astype(np.float32) / 255


def _hsv(rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).convert("HSV")
    return np.asarray(image, np.float32) / 255


def warmth(rgb: np.ndarray) -> float:
    """Red over blue: warm pictures high, cool ones low."""
    return float(rgb[..., 0].mean() - rgb[..., 2].mean())


def softness(rgb: np.ndarray) -> float:
    """Light and unsaturated (pastel) high; dark or loud low."""
    hsv = _hsv(rgb)
    return float(hsv[..., 2].mean() - hsv[..., 1].mean())


def detail(rgb: np.ndarray) -> float:
    """Mean absolute Laplacian of the luminance: busy, detailed pictures high."""
    y = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.abs(lap).mean())


def contrast(rgb: np.ndarray) -> float:
    """Spread of the luminance: bold light-and-dark pictures high, flat ones low."""
    return float((rgb @ np.array([0.299, 0.587, 0.114], np.float32)).std())


Measure = Callable[[np.ndarray], float]


@dataclass
class Rater:
    """A taste: a measure of a picture, calibrated to stars on a reference set."""

    name: str
    measure: Measure
    noise: float = 0.6  # std of the rater's noise, in stars
    mean: float = 0.0
    spread: float = 1.0

    def calibrate(self, pictures: Sequence[np.ndarray]) -> Rater:
        """Fix the measure's mean and spread on reference pictures (the ones to be rated)."""
        values = np.array([self.measure(p) for p in pictures])
        self.mean, self.spread = float(values.mean()), float(values.std() or 1.0)
        return self

    def true_stars(self, picture: np.ndarray) -> float:
        """The rater's noiseless judgement, 1–5."""
        z = (self.measure(picture) - self.mean) / self.spread
        return float(np.clip(3 + 1.25 * z, 1, 5))

    def rate(self, picture: np.ndarray, rng: np.random.Generator) -> int:
        """A rating as given: the judgement plus noise, rounded to whole stars."""
        noisy = self.true_stars(picture) + rng.normal(0, self.noise)
        return int(np.clip(np.rint(noisy), 1, 5))


# ---- the style classifier -------------------------------------------------------------------


class StyleNet(torch.nn.Module):
    """A small CNN: 32 px RGB → one logit per demo style."""

    def __init__(self) -> None:
        super().__init__()
        c = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            c(3, 32, 3, padding=1), torch.nn.GELU(),
            c(32, 64, 3, stride=2, padding=1), torch.nn.GELU(),
            c(64, 64, 3, padding=1), torch.nn.GELU(),
            c(64, 96, 3, stride=2, padding=1), torch.nn.GELU(),
            c(96, 96, 3, padding=1), torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(96, len(DEMO_STYLES)),
        )  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits [N, 12] for pixels [N, 3, 32, 32] in [-1, 1]."""
        return self.body(pixels)


def train_style_classifier(
    count: int = 6000, steps: int = 1500, seed: int = 11, cache: Path | None = None
) -> tuple[StyleNet, float]:
    """Train (or load from `cache`) the classifier on real renders; return it and its accuracy.

    Accuracy is on 600 further renders it never saw. Renderer seed 11: neither the pack's
    (0) nor the demo world's training data (7).
    """
    net = StyleNet()
    if cache is not None and cache.is_file():
        tensors, meta = read_safetensors(cache, ValueError, what="style classifier")
        net.load_state_dict(tensors)
        return net.eval(), float(meta["accuracy"])
    torch.manual_seed(seed)
    data = render_world_data(count + 600, seed, SIDE)
    x, y = to_pixels(data.pixels), torch.from_numpy(data.styles)
    train_x, train_y, test_x, test_y = x[:count], y[:count], x[count:], y[count:]
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    for _ in range(steps):
        rows = torch.randint(count, (128,))
        batch = train_x[rows]
        batch = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch.flip(-1), batch)
        loss = torch.nn.functional.cross_entropy(net(batch), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test_x).argmax(1) == test_y).float().mean())
    if cache is not None:
        write_atomic(cache, net.state_dict(), {"accuracy": repr(accuracy)})
    return net, accuracy


@torch.no_grad()
def style_probabilities(net: StyleNet, pictures: Sequence[np.ndarray]) -> np.ndarray:
    """P(style) per picture: [N, 12], columns in DEMO_STYLES order."""
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) * 2 - 1
    return torch.softmax(net(x), dim=1).numpy()


def style_measure(net: StyleNet, liked: Sequence[str], disliked: Sequence[str]) -> Measure:
    """A measure that likes some styles and dislikes others, as the classifier sees them."""
    plus = [DEMO_STYLES.index(s) for s in liked]
    minus = [DEMO_STYLES.index(s) for s in disliked]

    def measure(picture: np.ndarray) -> float:
        p = style_probabilities(net, [picture])[0]
        return float(p[plus].sum() - p[minus].sum())

    return measure


def standard_raters(classifier: StyleNet | None = None) -> list[Rater]:
    """The bench's raters, each a different kind of taste (uncalibrated)."""
    raters = [
        Rater("warm", warmth),
        Rater("pastel", softness),
        Rater("detail", detail),
        Rater("contrast", contrast),
    ]
    if classifier is not None:
        liked, disliked = ("landscape", "bokeh", "mandala"), ("stripes", "mondrian", "shapes")
        raters.insert(2, Rater("styles", style_measure(classifier, liked, disliked)))
    return raters


def diversity(pictures: Sequence[np.ndarray], groups: Sequence[str]) -> float:
    """Mean pairwise RMS pixel distance between pictures of the same prompt."""
    by_group: dict[str, list[np.ndarray]] = {}
    for picture, group in zip(pictures, groups, strict=True):
        by_group.setdefault(group, []).append(picture.reshape(-1))
    distances = []
    for members in by_group.values():
        stack = np.stack(members)
        for i in range(len(stack)):
            for j in range(i + 1, len(stack)):
                distances.append(float(np.sqrt(((stack[i] - stack[j]) ** 2).mean())))
    return float(np.mean(distances)) if distances else 0.0
