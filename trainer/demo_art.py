"""Procedural, deterministic "demo pack" images so an offline install has something to rate.

Each image is one of several styles with random parameters and a palette "mood"; some moods are
deliberately garish or muddy so raters form real preferences. For speed, numpy only computes
single-channel fields; colouring, compositing and drawing happen in Pillow on 8-bit images.
"""

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

Rng = np.random.Generator
Palette = np.ndarray  # (n, 3) float RGB in [0, 1]
Field = np.ndarray  # (h, w) float32
DrawFn = Callable[[ImageDraw.ImageDraw, int], None]  # draws at the given scale factor

DEMO_MOODS = ("analogous", "complementary", "triadic", "mono", "pastel", "garish", "muddy")
_MOOD_P = (0.22, 0.15, 0.1, 0.11, 0.15, 0.15, 0.12)  # about a quarter are meant to be unpleasant
_SIZES = ((512, 512), (512, 768), (768, 512))
_SIZE_P = (0.6, 0.2, 0.2)
_THIRDS = (1 / 3, 0.5, 2 / 3)


def _palette(rng: Rng, mood: str, n: int = 5) -> Palette:
    """Build an n-colour palette; harmonious moods run dark to light so gradients read well."""
    h0, ramp, u = rng.random(), np.linspace(0.0, 1.0, n), rng.uniform
    if mood == "analogous":
        hue, sat, val = h0 + u(-0.09, 0.09, n), u(0.35, 0.85, n), 0.15 + 0.8 * ramp
    elif mood == "complementary":
        hue = h0 + 0.5 * (np.arange(n) % 2) + u(-0.03, 0.03, n)
        sat, val = u(0.3, 0.75, n), 0.18 + 0.77 * ramp
    elif mood == "triadic":
        hue, sat, val = h0 + np.arange(n) / 3, u(0.4, 0.8, n), 0.3 + 0.65 * ramp
    elif mood == "mono":
        hue, sat, val = np.full(n, h0), u(0.15, 0.7, n), 0.1 + 0.85 * ramp
    elif mood == "pastel":
        hue, sat, val = h0 + u(-0.2, 0.2, n), u(0.12, 0.4, n), 0.75 + 0.22 * ramp
    elif mood == "garish":  # clashing saturated hues in random order: meant to look loud
        hue, sat, val = rng.random(n), u(0.85, 1.0, n), u(0.8, 1.0, n)
    else:  # muddy: dull, low-contrast and usually brown or olive
        hue = (h0 if h0 < 0.4 else u(0.04, 0.2)) + u(-0.06, 0.06, n)
        sat, val = u(0.2, 0.6, n), u(0.22, 0.55, n)
    rgb = [colorsys.hsv_to_rgb(h % 1.0, s, v) for h, s, v in zip(hue, sat, val, strict=True)]
    return np.array(rgb)


def _rgb(color: np.ndarray | float, alpha: float | None = None) -> tuple[int, ...]:
    """Convert a float colour to an 8-bit RGB (or RGBA) tuple for Pillow."""
    rgb = tuple(int(v) for v in np.clip(np.broadcast_to(color, 3) * 255 + 0.5, 0, 255))
    return rgb if alpha is None else (*rgb, int(alpha * 255))


def _mask(t: Field) -> Image.Image:
    """Quantise a [0, 1] field to an 8-bit greyscale image."""
    return Image.fromarray((np.clip(t, 0, 1) * 255 + 0.5).astype(np.uint8))


def _lut_image(idx: Image.Image, table: np.ndarray) -> Image.Image:
    """Colour an 8-bit index image through a (256, 3) float table, one channel at a time."""
    lut = np.clip(table * 255 + 0.5, 0, 255).astype(int)
    return Image.merge("RGB", [idx.point(lut[:, c].tolist()) for c in range(3)])


def _cmap(t: Field, pal: Palette) -> Image.Image:
    """Map a [0, 1] field to a smooth gradient through the palette."""
    x = np.linspace(0, 1, 256)
    stops = np.linspace(0, 1, len(pal))
    return _lut_image(_mask(t), np.stack([np.interp(x, stops, pal[:, c]) for c in range(3)], 1))


def _norm(t: Field) -> Field:
    """Rescale a field to span [0, 1]."""
    return (t - t.min()) / max(float(np.ptp(t)), 1e-6)


def _coords(w: int, h: int) -> tuple[Field, Field]:
    """Return broadcastable float pixel coordinates (x as a row, y as a column)."""
    return np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]


def _dist(w: int, h: int, cx: float, cy: float) -> Field:
    """Return each pixel's distance to (cx, cy)."""
    x, y = _coords(w, h)
    return np.sqrt((x - cx) ** 2 + (y - cy) ** 2)


def _fbm(rng: Rng, w: int, h: int, base: int = 3, octaves: int = 4) -> Field:
    """Return fractal value noise in [0, 1]; octaves are summed at quarter size for speed."""
    sw, sh = max(w // 4, 8), max(h // 4, 8)
    acc = np.zeros((sh, sw), np.float32)
    for o in range(octaves):
        cells = base * 2**o
        grid = rng.random((max(cells * h // w, 1) + 1, max(cells * w // h, 1) + 1), np.float32)
        acc += 0.5**o * np.asarray(Image.fromarray(grid).resize((sw, sh), Image.Resampling.BICUBIC))
    return _norm(np.asarray(Image.fromarray(acc).resize((w, h), Image.Resampling.BICUBIC)))


def _noise1d(rng: Rng, w: int, knots: int, octaves: int = 5) -> np.ndarray:
    """Return a 1-D fractal profile in [0, 1], used for mountain ridges."""
    x, acc = np.arange(w, dtype=np.float32), np.zeros(w, np.float32)
    for o in range(octaves):
        n = knots * 2**o
        acc += 0.5**o * np.interp(x, np.linspace(0, w, n + 1), rng.random(n + 1))
    return _norm(acc)


def _gradient(rng: Rng, w: int, h: int, pal: Palette) -> Image.Image:
    """Paint a linear or radial background gradient through the palette."""
    if rng.random() < 0.5:
        x, y = _coords(w, h)
        a = rng.uniform(0, 2 * math.pi)
        return _cmap(_norm(x * math.cos(a) + y * math.sin(a)), pal)
    return _cmap(_norm(_dist(w, h, rng.uniform(0, w), rng.uniform(0, h))), pal)


def _mix(img: Image.Image, color: np.ndarray | Image.Image, alpha: Field) -> Image.Image:
    """Blend a colour or image over img with a per-pixel alpha field."""
    top = color if isinstance(color, Image.Image) else Image.new("RGB", img.size, _rgb(color))
    return Image.composite(top, img, _mask(alpha))


def _add_luma(img: Image.Image, delta: Field) -> Image.Image:
    """Add a signed brightness field (in [0, 1] units) to every channel."""
    d = Image.fromarray((np.clip(delta * 255, -127, 127) + 128).astype(np.uint8))
    return ImageChops.add(img, Image.merge("RGB", (d, d, d)), 1.0, -128)


def _bands(s: Field, widths: np.ndarray, pal: Palette) -> Image.Image:
    """Colour a distance-like field (in px) by bands of given widths, anti-aliasing the edges."""
    bounds = np.cumsum(widths)
    steps = np.arange(0, float(s.max()) + 2, 0.25)  # quarter-pixel lookup beats searchsorted
    k = np.searchsorted(bounds, steps)
    frac = np.clip(steps - np.concatenate(([-1e9], bounds))[k], 0, 1)  # coverage past an edge
    q = (np.maximum(s, 0) * 4).astype(np.intp)
    n = len(pal)
    table = np.resize(pal, (256, 3))  # band k uses colour k % n
    cur = Image.fromarray((k % n).astype(np.uint8)[q])
    prev = _lut_image(cur, np.resize(np.roll(pal, 1, axis=0), (256, 3)))
    return Image.composite(_lut_image(cur, table), prev, _mask(frac[q]))


def _supersampled(bg: Image.Image, draw_fn: DrawFn) -> Image.Image:
    """Run draw_fn on a 2x canvas and downsample, which anti-aliases Pillow's hard edges."""
    big = bg.resize((bg.width * 2, bg.height * 2), Image.Resampling.NEAREST)
    draw_fn(ImageDraw.Draw(big, "RGBA"), 2)
    return big.reduce(2)


# --- styles: each takes (rng, width, height, palette, mood) and returns an RGB image ---


def _landscape(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Sky gradient, glowing sun or moon, hazy layered mountains and foreground ground."""
    scenes = (  # sky top, sky at horizon, sun, nearest ridge
        ((0.18, 0.12, 0.36), (1.0, 0.62, 0.38), (1.0, 0.93, 0.7), (0.1, 0.05, 0.12)),
        ((0.22, 0.45, 0.82), (0.78, 0.9, 0.97), (1.0, 1.0, 0.92), (0.1, 0.25, 0.15)),
        ((0.01, 0.02, 0.08), (0.1, 0.16, 0.32), (0.92, 0.94, 0.85), (0.01, 0.01, 0.03)),
        ((0.1, 0.22, 0.35), (0.95, 0.7, 0.62), (1.0, 0.85, 0.75), (0.05, 0.1, 0.14)),
    )
    if mood in ("garish", "muddy"):  # let the ugly palettes through unchanged
        top, hor, sun, near = pal[0], pal[1], pal[2], pal[3]
    else:
        cols = scenes[rng.integers(len(scenes))]
        top, hor, sun, near = (np.clip(np.array(c) + rng.normal(0, 0.04, 3), 0, 1) for c in cols)
    x, y = _coords(w, h)
    horizon = h * rng.uniform(0.45, 0.7)
    sky = np.clip(y / horizon, 0, 1) ** rng.uniform(0.6, 1.6)
    img = _cmap(np.broadcast_to(sky, (h, w)), np.stack([top, hor]))
    if top.sum() < 0.5:  # dark sky: scatter a few stars
        draw = ImageDraw.Draw(img)
        for sx, sy in rng.random((70, 2)) * (w, horizon):
            draw.point((sx, sy), fill=_rgb(sun * rng.uniform(0.5, 1)))
    sx, sy, sr = rng.uniform(0.15, 0.85) * w, horizon * rng.uniform(0.35, 0.85), rng.uniform(18, 50)
    d = _dist(w, h, sx, sy)
    img = _mix(img, sun, np.exp(-d / (sr * rng.uniform(1.5, 4))) * 0.6)  # atmospheric glow
    img = _mix(img, sun, sr - d + 0.5)
    layers = int(rng.integers(2, 6))
    for i in range(layers):
        f = (i + 1) / layers  # farther ridges fade into the horizon haze
        ridge = horizon - h * rng.uniform(0.05, 0.3) * (1 - 0.5 * f) * _noise1d(rng, w, 3 + i)
        ridge += (h - horizon) * 0.6 * i / layers
        img = _mix(img, hor + (near - hor) * f**0.8, y - ridge[None, :] + 0.5)
    return img


def _mondrian(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Recursively split the canvas into rectangles separated by thick dark lines."""
    rects = [(0, 0, w, h)]
    for _ in range(rng.integers(5, 14)):
        x0, y0, x1, y1 = rects.pop(int(rng.integers(len(rects))))
        if x1 - x0 > (y1 - y0) * rng.uniform(0.6, 1.6):
            c = int(x0 + (x1 - x0) * rng.uniform(0.25, 0.75))
            rects += [(x0, y0, c, y1), (c, y0, x1, y1)]
        else:
            c = int(y0 + (y1 - y0) * rng.uniform(0.25, 0.75))
            rects += [(x0, y0, x1, c), (x0, c, x1, y1)]
    classic = rng.random() < 0.5 and mood not in ("garish", "muddy")
    fills = np.array([(0.8, 0.12, 0.1), (0.1, 0.2, 0.6), (0.95, 0.8, 0.15)]) if classic else pal
    paper = (0.94, 0.93, 0.88) if mood != "muddy" else pal[-1]
    img = Image.new("RGB", (w, h), _rgb(0.05 if classic or rng.random() < 0.5 else pal[0]))
    draw, t = ImageDraw.Draw(img), int(rng.integers(3, 9))
    for x0, y0, x1, y1 in rects:
        blank = rng.random() < (0.6 if classic else 0.25)
        fill = paper if blank else fills[rng.integers(len(fills))]
        if x1 - x0 > 2 * t and y1 - y0 > 2 * t:  # a sliver thinner than two lines stays line
            draw.rectangle((x0 + t, y0 + t, x1 - t - 1, y1 - t - 1), fill=_rgb(fill))
    return img


def _bokeh(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Out-of-focus light discs over a dark gradient, screen-blended like light."""
    img = _gradient(rng, w, h, pal[:2] * rng.uniform(0.2, 0.6))
    for blur, count, rmax in ((rng.uniform(6, 14), 25, 90), (rng.uniform(1, 3), 30, 40)):
        layer = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(layer, "RGBA")
        for _ in range(int(rng.integers(count // 2, count))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, rmax)
            col = _rgb(pal[rng.integers(1, len(pal))], rng.uniform(0.3, 0.9))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
        img = ImageChops.screen(img, layer.filter(ImageFilter.GaussianBlur(blur)))
    return img


def _rings(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Concentric rings around a centre or thirds point; sometimes a busy moire of two sets."""
    d = _dist(w, h, rng.choice(_THIRDS) * w, rng.choice(_THIRDS) * h)
    if rng.random() < 0.3:
        p = rng.uniform(3, 9)
        d2 = _dist(w, h, rng.uniform(0, w), rng.uniform(0, h))
        return _cmap(0.5 + 0.25 * (np.sin(d / p) + np.sin(d2 / p)), pal)
    widths = rng.uniform(4, 60, 200) if rng.random() < 0.5 else np.full(200, rng.uniform(8, 40))
    return _bands(d, widths, rng.permutation(pal))


def _stripes(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Straight or wavy stripes at an angle, regular or varied widths."""
    x, y = _coords(w, h)
    a = rng.choice([0, math.pi / 2, math.pi / 4, rng.uniform(0, math.pi)])
    s = x * math.cos(a) + y * math.sin(a)
    if rng.random() < 0.4:  # ripple the stripes along their own direction
        along = y * math.cos(a) - x * math.sin(a)
        s = s + rng.uniform(10, 40) * np.sin(along / rng.uniform(20, 80))
    widths = rng.uniform(3, 70, 400) if rng.random() < 0.5 else np.full(400, rng.uniform(10, 50))
    return _bands(s - s.min(), widths, rng.permutation(pal))


def _marble(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Fractal-noise textures: soft clouds, warped marble veins or topographic contours."""
    n = _fbm(rng, w, h, base=int(rng.integers(2, 6)), octaves=int(rng.integers(3, 6)))
    kind = rng.integers(3)
    if kind == 0:
        return _cmap(n, pal)
    if kind == 1:
        x, y = _coords(w, h)
        a = rng.uniform(0, math.pi)
        vein = (x * math.cos(a) + y * math.sin(a)) / rng.uniform(15, 60) + n * rng.uniform(4, 12)
        return _cmap((0.5 + 0.5 * np.sin(vein)) ** rng.uniform(0.5, 3), pal)
    levels = int(rng.integers(6, 16))
    return _bands(n * (levels * 8), np.full(levels, 8.0), pal)  # 8 px per level keeps AA sane


def _flow(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Streamlines traced through a noise or wave angle field."""
    dark_bg = rng.random() < 0.6  # lines come from the opposite end of the palette to stand out
    bg_pal, line_pal = (pal[:2], pal[2:]) if dark_bg else (pal[-2:], pal[:-2])
    cell, gw, gh = 8, w // 8, h // 8
    if rng.random() < 0.5:
        ang = _fbm(rng, gw, gh) * rng.uniform(3, 9)
    else:
        _, gy = _coords(gw, gh)
        ang = np.broadcast_to(rng.uniform(0, 6) + np.sin(gy / rng.uniform(2, 8)), (gh, gw))
    n, steps = int(rng.integers(80, 260)), 30
    pts = rng.random((n, 2)) * (w, h)
    path = np.empty((steps, n, 2))
    for s in range(steps):  # advance every streamline at once
        path[s] = pts
        ix = np.clip((pts[:, 0] / cell).astype(int), 0, gw - 1)
        a = ang[np.clip((pts[:, 1] / cell).astype(int), 0, gh - 1), ix]
        pts = pts + 6 * np.stack([np.cos(a), np.sin(a)], 1)
    width, cols = int(rng.integers(1, 5)), rng.integers(len(line_pal), size=n)

    def draw(d: ImageDraw.ImageDraw, k: int) -> None:
        for i in range(n):
            fill = _rgb(line_pal[cols[i]], 0.8)
            d.line((path[:, i] * k).ravel().tolist(), fill=fill, width=width * k)

    return _supersampled(_gradient(rng, w, h, bg_pal), draw)


def _particles(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Scattered dots, uniform or in clusters, with power-law sizes."""
    bg = _gradient(rng, w, h, pal[rng.permutation(len(pal))[:2]])
    n = int(rng.integers(120, 600))
    if rng.random() < 0.5:
        centers = rng.random((int(rng.integers(1, 5)), 2)) * (w, h)
        pts = centers[rng.integers(len(centers), size=n)] + rng.normal(0, min(w, h) / 8, (n, 2))
    else:
        pts = rng.random((n, 2)) * (w, h)
    radii = rng.uniform(1.5, 5) + rng.pareto(2.5, n) * rng.uniform(3, 10)
    cols, alpha = rng.integers(len(pal), size=n), rng.uniform(0.5, 1.0)

    def draw(d: ImageDraw.ImageDraw, k: int) -> None:
        for (px, py), r, c in zip(pts * k, radii * k, cols, strict=True):
            d.ellipse((px - r, py - r, px + r, py + r), fill=_rgb(pal[c], alpha))

    return _supersampled(bg, draw)


def _shapes(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Bauhaus-like composition of a few polygons and circles placed on the thirds."""
    paper = (0.93, 0.9, 0.84) if rng.random() < 0.5 else pal[-1]
    n, shadow = int(rng.integers(3, 8)), rng.random() < 0.5

    def draw(d: ImageDraw.ImageDraw, k: int) -> None:
        for _ in range(n):
            cx = (rng.choice(_THIRDS[::2]) + rng.normal(0, 0.08)) * w * k
            cy = (rng.choice(_THIRDS[::2]) + rng.normal(0, 0.08)) * h * k
            r, sides = rng.uniform(0.06, 0.25) * min(w, h) * k, int(rng.integers(2, 7))
            ang = 2 * math.pi * (rng.random() + np.arange(sides) / sides)
            col = _rgb(pal[rng.integers(len(pal) - 1)], rng.choice([1.0, 0.85]))
            passes = [(6 * k, (0, 0, 0, 60)), (0, col)] if shadow else [(0, col)]
            for off, fill in passes:  # an offset shadow first lifts shapes off the page
                ox, oy = cx + off, cy + off
                if sides == 2:  # two "sides" reads as a circle
                    d.ellipse((ox - r, oy - r, ox + r, oy + r), fill=fill)
                else:
                    pts = np.stack([ox + r * np.cos(ang), oy + r * np.sin(ang)], 1)
                    d.polygon(pts.ravel().tolist(), fill=fill)

    return _supersampled(Image.new("RGB", (w, h), _rgb(paper)), draw)


def _orb(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """A shaded sphere as the single subject, centred or on a thirds point, with a halo."""
    img = _gradient(rng, w, h, pal[:2] * rng.uniform(0.3, 1.0))
    cx, cy = rng.choice(_THIRDS) * w, rng.choice(_THIRDS) * h
    r = rng.uniform(0.18, 0.33) * min(w, h)
    x, y = _coords(w, h)
    nx, ny = (x - cx) / r, (y - cy) / r
    rho = np.sqrt(nx * nx + ny * ny)
    halo = np.exp(-np.maximum(rho - 1, 0) * rng.uniform(2, 8)) * rng.uniform(0.1, 0.5)
    img = _mix(img, pal[-1], halo)
    lx, ly = rng.uniform(-0.7, 0.7, 2)
    lz = math.sqrt(max(1 - lx * lx - ly * ly, 0.0))
    lam = np.clip(-nx * lx - ny * ly + np.sqrt(np.clip(1 - rho * rho, 0, 1)) * lz, 0, 1)
    shade = _cmap(0.85 * lam + 0.4 * lam**30, pal[1:])  # Lambert plus a specular highlight
    return _mix(img, shade, (1 - rho) * r + 0.5)


def _colorfield(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """Rothko-like soft-edged colour blocks with a painterly noise texture; calm."""
    img = Image.new("RGB", (w, h), _rgb(pal[int(rng.integers(len(pal)))]))
    x, y = _coords(w, h)
    blocks, soft = int(rng.integers(1, 4)), rng.uniform(3, 25)
    edges = 0.07 + 0.86 * np.cumsum(np.r_[0, rng.uniform(0.5, 1.5, blocks)])
    edges /= edges[-1] / 0.93
    mx = np.clip((x - 0.1 * w) / soft, 0, 1) * np.clip((0.9 * w - x) / soft, 0, 1)
    for i in range(blocks):
        top, bot = edges[i] * h + 6, edges[i + 1] * h - 6
        my = np.clip((y - top) / soft, 0, 1) * np.clip((bot - y) / soft, 0, 1)
        img = _mix(img, pal[int(rng.integers(len(pal)))], mx * my)
    return _add_luma(img, (_fbm(rng, w, h, base=6) - 0.5) * 0.12)


def _mandala(rng: Rng, w: int, h: int, pal: Palette, mood: str) -> Image.Image:
    """k-fold rotationally symmetric petal pattern in polar coordinates."""
    x, y = _coords(w, h)
    dx, dy = x - w / 2, y - h / 2
    r, th = np.sqrt(dx * dx + dy * dy) / min(w, h), np.arctan2(dy, dx)
    petals = np.cos(int(rng.integers(5, 14)) * th) * rng.uniform(0.5, 3)
    wave = np.sin(r * rng.uniform(12, 60) + petals + rng.uniform(0, 6))
    t = 0.5 + 0.5 * wave * np.exp(-r * rng.uniform(0, 3)) * np.cos(r * rng.uniform(3, 20)) ** 2
    return _cmap(t, pal)


_STYLE_FNS = {  # style name is the function name without its underscore
    fn.__name__[1:]: fn
    for fn in (
        _landscape,
        _mondrian,
        _bokeh,
        _rings,
        _stripes,
        _marble,
        _flow,
        _particles,
        _shapes,
        _orb,
        _colorfield,
        _mandala,
    )
}
DEMO_STYLES: tuple[str, ...] = tuple(_STYLE_FNS)


def _rng(index: int, seed: int) -> Rng:
    """Return the image's own generator, independent of any global random state."""
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    return np.random.default_rng([seed, index])


def _size(rng: Rng) -> tuple[int, int]:
    """Draw the image size; it must stay the generator's first draw so both callers agree."""
    return _SIZES[int(rng.choice(len(_SIZES), p=_SIZE_P))]


def demo_image_size(index: int, *, seed: int = 0) -> tuple[int, int]:
    """Return the (width, height) image `index` will have."""
    return _size(_rng(index, seed))


def demo_image_style(index: int, *, seed: int = 0) -> str:
    """Return the style name of image `index`."""
    _rng(index, seed)  # validates the arguments
    # Each block of len(DEMO_STYLES) images is a shuffled permutation of the styles, so they
    # stay evenly spread without a rigid repeating cycle.
    block, pos = divmod(index, len(DEMO_STYLES))
    order = np.random.default_rng([seed, block, 1]).permutation(len(DEMO_STYLES))
    return DEMO_STYLES[int(order[pos])]


@dataclass(frozen=True)
class DemoPicture:
    """A rendered demo image and what the generator drew: the facts its prompt is made of."""

    image: Image.Image
    style: str  # one of DEMO_STYLES
    mood: str  # one of DEMO_MOODS: the palette's character
    grain: float  # film-grain amplitude, 0 for none; 0.14 is the heavy, grating setting


def render_demo_picture(index: int, *, seed: int = 0) -> DemoPicture:
    """Render demo image number `index` with its style, mood and grain."""
    rng = _rng(index, seed)
    w, h = _size(rng)
    mood = DEMO_MOODS[int(rng.choice(len(DEMO_MOODS), p=_MOOD_P))]
    style = demo_image_style(index, seed=seed)
    img = _STYLE_FNS[style](rng, w, h, _palette(rng, mood), mood)
    grain = 0.0
    if rng.random() < 0.5:  # film grain on half the set; the heavy setting is meant to grate
        grain = float(rng.choice([0.03, 0.05, 0.14]))
        img = _add_luma(img, (rng.random((h, w), np.float32) - 0.5) * grain)
    return DemoPicture(img.convert("RGB"), style, mood, grain)


def render_demo_image(index: int, *, seed: int = 0) -> Image.Image:
    """Render demo image number `index` (RGB), the same pixels for the same (index, seed)."""
    return render_demo_picture(index, seed=seed).image
