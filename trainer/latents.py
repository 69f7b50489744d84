"""Turn images into VAE latents, cache them per image, and read/write `latents` tensor files.

A latents file is a `.safetensors` file holding `latents` [N,4,H,W] (float), `scores` [N]
(float) and optionally `flipped` [N,4,H,W] (the latents of the mirrored images), with the
images' sha256s as a JSON list in the metadata key `sha256s`. The scorer trains on any such
file, whoever made it; loading never unpickles anything.

    python -m trainer.latents export --images DIR_OR_FILE... --scores scores.csv --out x.safetensors
    python -m trainer.latents info x.safetensors
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from trainer.callbacks import Progress, StopCheck, Stopped, never_stop, no_progress
from trainer.configs import FromDict
from trainer.tensorfiles import read_safetensors, write_atomic

FORMAT = "tastebud.latents"
FORMAT_VERSION = "1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class LatentsFileError(ValueError):
    """A latents file is missing, not safetensors, or has the wrong keys, shapes or lengths."""


@dataclass(frozen=True)
class LatentsConfig(FromDict):
    """How images become latents; the web layer fills this from app config."""

    batch_size: int = 8  # images per encoder call (each also encoded mirrored, so 2× that)
    flip: bool = True  # also encode the mirrored image: free augmentation for the scorer
    cache_dir: str | None = None  # folder of per-image latents; None encodes every time
    fast_encoder: str | None = None  # AutoencoderTiny hub id/folder (e.g. taesd); None = full VAE


@dataclass(frozen=True)
class EncodedImages:
    """Latents for a list of images, in the order given."""

    sha256s: list[str]
    latents: torch.Tensor  # [N,4,H,W] float32 on the CPU, already scaled
    flipped: torch.Tensor | None  # same, for the mirrored images; None when flip is off
    encoded: int  # images run through the encoder by this call (the rest came from the cache)


@dataclass(frozen=True)
class LatentsFile:
    """A validated latents file: tensors on the CPU as float32 and its metadata."""

    latents: torch.Tensor  # [N,4,H,W]
    scores: torch.Tensor  # [N]
    flipped: torch.Tensor | None  # [N,4,H,W] or None
    sha256s: list[str] | None  # None when the file's maker did not record them
    metadata: dict[str, str]


def image_sha256(path: str | Path) -> str:
    """Return the sha256 of an image file's bytes (the image store's content address)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_identity(vae: torch.nn.Module) -> str:
    """Return a stable id for an encoder: its class, its config, and a few of its weights."""
    digest = hashlib.sha256(type(vae).__name__.encode())
    # Keys starting "_" are where it was loaded from and the diffusers version: not identity.
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = list(vae.state_dict().items())
    # First, middle and last tensors: cheap, and any real fine-tune or dtype change shows.
    for name, tensor in (tensors[0], tensors[len(tensors) // 2], tensors[-1]) if tensors else ():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"{type(vae).__name__}-{digest.hexdigest()[:16]}"


def fit_image(image: Image.Image, resolution: int) -> Image.Image:
    """Upright RGB, resized and centre-cropped to R×R: what every encoder here sees."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)


def image_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An open image as a [3,R,R] tensor in [-1,1], fitted as `fit_image` does."""
    fitted = np.asarray(fit_image(image, resolution), dtype=np.float32)
    return torch.from_numpy(fitted).permute(2, 0, 1) / 127.5 - 1.0


def load_pixels(path: str | Path, resolution: int) -> torch.Tensor:
    """Load an image as a [3,R,R] tensor in [-1,1], resized and centre-cropped to R pixels."""
    try:
        with Image.open(path) as image:
            return image_pixels(image, resolution)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


@torch.inference_mode()
def encode_pixels(pixels: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    """Encode [N,3,R,R] pixels in [-1,1] to scaled latents [N,C,R/8,R/8] (float32, CPU)."""
    parts = [_finite(vae, _encode_chunk, chunk).float() for chunk in _chunks(vae, pixels)]
    return scale_latents(torch.cat(parts), vae.config).cpu()


@torch.inference_mode()
def decode_latents(latents: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    """Decode scaled latents [N,C,h,w] (as `encode_pixels` makes them) to pixels [N,3,H,W] in
    about [-1,1], float32 on the VAE's device."""
    raw = unscale_latents(latents.float(), vae.config)
    return torch.cat([_finite(vae, _decode_chunk, chunk).float() for chunk in _chunks(vae, raw)])


def _chunks(vae: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On a GPU one image at a time: the VAE's activations are ≈ 0.6 GiB per 512 px image in
    fp32 (2.4 GiB at 1024 px), and a batch would not fit beside the rest on 8 GB."""
    on_gpu = next(vae.parameters()).device.type == "cuda"
    return batch.split(1 if on_gpu else max(len(batch), 1))


def _finite(vae: torch.nn.Module, call, chunk: torch.Tensor) -> torch.Tensor:
    """`call(vae, chunk)`; where an fp16 VAE overflows (SDXL's does: its config says
    force_upcast), the chunk again in fp32, as diffusers' SDXL pipelines upcast it."""
    out = call(vae, chunk)
    if next(vae.parameters()).dtype == torch.float16 and not torch.isfinite(out).all():
        vae.to(torch.float32)
        try:
            out = call(vae, chunk)
        finally:
            vae.to(torch.float16)
    return out


def _encode_chunk(vae: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    weight = next(vae.parameters())
    output = vae.encode(chunk.to(device=weight.device, dtype=weight.dtype))
    if hasattr(output, "latent_dist"):
        # The mean, not a sample: the same image must always give the same latents, so the
        # cache is exact and a scorer sees one target per image (a sample adds noise).
        return output.latent_dist.mean
    return output.latents  # AutoencoderTiny and friends return latents directly


def _decode_chunk(vae: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    weight = next(vae.parameters())
    return vae.decode(chunk.to(device=weight.device, dtype=weight.dtype)).sample


def scale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """The VAE's raw latents as the UNet sees them, by the family's convention (from the VAE's
    config): × 0.18215 for SD 1.x, × 0.13025 for SDXL; per channel (x − mean) × scale / std
    where the config has `latents_mean`/`latents_std` (Playground v2.5); (x − shift) × scale
    where it has a `shift_factor` (SD3, Flux)."""
    per_channel = _per_channel(config, latents)
    if per_channel is not None:
        mean, std = per_channel
        return (latents - mean) * config.scaling_factor / std
    return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor


def unscale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """The inverse of `scale_latents`: what the VAE's decoder takes."""
    per_channel = _per_channel(config, latents)
    if per_channel is not None:
        mean, std = per_channel
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (config.get("shift_factor") or 0.0)


def _per_channel(config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A VAE config's per-channel latents mean and std, shaped to broadcast over `like`."""
    values = config.get("latents_mean"), config.get("latents_std")
    if None in values:
        return None
    return tuple(
        torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1) for v in values
    )


def _cache_path(cache_dir: Path, identity: str, resolution: int, sha256: str) -> Path:
    return cache_dir / f"{identity}-{resolution}px" / sha256[:2] / f"{sha256}.safetensors"


def _read_cached(path: Path, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    # A missing, half-written or foreign file is a cache miss, never an error.
    try:
        with safe_open(str(path), framework="pt") as file:
            latents = file.get_tensor("latents")
            flipped = file.get_tensor("flipped") if flip else None
    except (OSError, SafetensorError):
        return None
    return latents, flipped


def encode_images(
    paths: Sequence[str | Path],
    vae: torch.nn.Module,
    *,
    resolution: int,
    config: LatentsConfig | None = None,
    identity: str | None = None,
    progress: Progress = no_progress,
    should_stop: StopCheck = never_stop,
) -> EncodedImages:
    """Encode image files to scaled latents (and mirrored latents), using the cache if set.

    `identity` names the encoder in the cache (default: `vae_identity(vae)`); pass the model
    name instead when hashing its weights is not wanted.
    """
    config = config or LatentsConfig()
    sha256s = [image_sha256(path) for path in paths]
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    if cache_dir is not None and identity is None:
        identity = vae_identity(vae)
    found: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if cache_dir is not None:
        for sha in set(sha256s):
            cached = _read_cached(_cache_path(cache_dir, identity, resolution, sha), config.flip)
            if cached is not None:
                found[sha] = cached
    # Each distinct missing image is encoded once, even if it is listed twice.
    todo = {sha: path for sha, path in zip(sha256s, paths, strict=True) if sha not in found}
    missing = list(todo)
    batches = [
        missing[i : i + config.batch_size] for i in range(0, len(missing), config.batch_size)
    ]
    for step, batch in enumerate(batches):
        if should_stop():  # what is encoded so far stays in the cache
            raise Stopped(f"stopped after encoding {step * config.batch_size} images")
        first = step * config.batch_size
        progress(  # counted in images, as the message says
            first,
            len(missing),
            f"encoding images {first + 1}–{first + len(batch)} of {len(missing)}",
        )
        pixels = torch.stack([load_pixels(todo[sha], resolution) for sha in batch])
        if config.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])  # one encoder call for both
        latents = encode_pixels(pixels, vae)
        for i, sha in enumerate(batch):
            flipped = latents[len(batch) + i] if config.flip else None
            found[sha] = (latents[i], flipped)
            if cache_dir is not None:
                tensors = {"latents": latents[i]}
                if flipped is not None:
                    tensors["flipped"] = flipped
                meta = {"sha256": sha, "vae": identity, "resolution": str(resolution)}
                write_atomic(_cache_path(cache_dir, identity, resolution, sha), tensors, meta)
    progress(
        len(missing), len(missing), f"encoded {len(missing)}, cached {len(found) - len(missing)}"
    )
    if not sha256s:
        return EncodedImages([], torch.empty(0, 4, 0, 0), None, 0)
    latents = torch.stack([found[sha][0] for sha in sha256s])
    flipped = torch.stack([found[sha][1] for sha in sha256s]) if config.flip else None
    return EncodedImages(sha256s, latents, flipped, encoded=len(missing))


def load_fast_encoder(spec: str, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Load an AutoencoderTiny (e.g. "madebyollin/taesd" or a local folder) to encode with."""
    from diffusers import AutoencoderTiny  # only needed when a fast encoder is configured

    encoder = AutoencoderTiny.from_pretrained(spec, dtype=dtype)
    return encoder.to(device).eval()


def save_latents_file(
    path: str | Path,
    latents: torch.Tensor,
    scores: torch.Tensor | Sequence[float],
    sha256s: Sequence[str],
    *,
    flipped: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a latents file atomically: `latents`, `scores`, optional `flipped`, sha256s."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    tensors = {"latents": latents.float().cpu(), "scores": scores}
    if flipped is not None:
        tensors["flipped"] = flipped.float().cpu()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **(metadata or {})}
    meta["sha256s"] = json.dumps(list(sha256s))
    _check(tensors, list(sha256s), str(path))  # never write a file the loader would refuse
    write_atomic(Path(path), tensors, meta)


def _check(tensors: dict[str, torch.Tensor], sha256s: list[str] | None, where: str) -> None:
    for key in ("latents", "scores"):
        if key not in tensors:
            raise LatentsFileError(f"{where}: no {key!r} tensor (found {sorted(tensors)})")
    latents, scores = tensors["latents"], tensors["scores"]
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise LatentsFileError(f"{where}: 'latents' must be [N,4,H,W], not {list(latents.shape)}")
    if not latents.is_floating_point():
        raise LatentsFileError(f"{where}: 'latents' must be float, not {latents.dtype}")
    if scores.ndim != 1:
        raise LatentsFileError(f"{where}: 'scores' must be [N], not {list(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise LatentsFileError(f"{where}: 'scores' must be float, not {scores.dtype}")
    n = latents.shape[0]
    if n == 0:
        raise LatentsFileError(f"{where}: holds no latents")
    if scores.shape[0] != n:
        raise LatentsFileError(f"{where}: {n} latents but {scores.shape[0]} scores")
    if not torch.isfinite(scores.float()).all():
        raise LatentsFileError(f"{where}: 'scores' holds NaN or infinite values")
    flipped = tensors.get("flipped")
    if flipped is not None and flipped.shape != latents.shape:
        raise LatentsFileError(
            f"{where}: 'flipped' is {list(flipped.shape)} but 'latents' is {list(latents.shape)}"
        )
    if sha256s is not None and len(sha256s) != n:
        raise LatentsFileError(f"{where}: {n} latents but {len(sha256s)} sha256s in metadata")


def load_latents_file(path: str | Path) -> LatentsFile:
    """Read and validate a latents file as training data; refuse anything but safetensors."""
    hint = " Re-export it with `python -m trainer.latents export`"
    tensors, metadata = read_safetensors(path, LatentsFileError, what="latents file", hint=hint)
    sha256s = None
    if "sha256s" in metadata:
        try:
            sha256s = json.loads(metadata["sha256s"])
        except json.JSONDecodeError as error:
            raise LatentsFileError(f"{path}: metadata 'sha256s' is not JSON: {error}") from None
        if not isinstance(sha256s, list) or not all(isinstance(s, str) for s in sha256s):
            raise LatentsFileError(f"{path}: metadata 'sha256s' must be a JSON list of strings")
    _check(tensors, sha256s, str(path))
    flipped = tensors.get("flipped")
    return LatentsFile(
        latents=tensors["latents"].float(),
        scores=tensors["scores"].float(),
        flipped=flipped.float() if flipped is not None else None,
        sha256s=sha256s,
        metadata=metadata,
    )


def read_scores_csv(path: str | Path) -> dict[str, float]:
    """Read a CSV with `image` and `score` columns; image is a file name, path or sha256."""
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or not {"image", "score"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with 'image' and 'score' columns")
        scores = {}
        for line, row in enumerate(reader, start=2):
            try:
                scores[row["image"].strip()] = float(row["score"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path} line {line}: score {row['score']!r} is not a number"
                ) from None
    return scores


def list_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Expand files and folders to (path, name-relative-to-its-folder) pairs, sorted per folder."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, p.relative_to(item).as_posix()) for p in files]
        elif item.is_file():
            found.append((item, item.name))
        else:
            raise FileNotFoundError(f"no image or folder at {item}")
    return found


def export(
    images: Sequence[str | Path],
    scores_csv: str | Path,
    out: str | Path,
    vae: torch.nn.Module,
    *,
    resolution: int,
    config: LatentsConfig | None = None,
    identity: str | None = None,
    base_name: str = "",
    family: str = "",
    progress: Progress = no_progress,
) -> dict:
    """Encode the scored images and write a latents file; return a JSON-ready summary.
    `family` (trainer.families) is recorded, so a scorer refuses another family's latents."""
    config = config or LatentsConfig()
    scores = read_scores_csv(scores_csv)
    listed = list_images(images)
    chosen, values = [], []
    for path, name in listed:
        score = scores.get(name, scores.get(path.name))
        if score is None:
            score = scores.get(image_sha256(path))
        if score is not None:
            chosen.append(path)
            values.append(score)
    if not chosen:
        raise ValueError(f"none of the images is scored in {scores_csv}")
    identity = identity or vae_identity(vae)
    encoded = encode_images(
        chosen, vae, resolution=resolution, config=config, identity=identity, progress=progress
    )
    metadata = {
        "vae": identity,
        "resolution": str(resolution),
        "base": base_name,
        "config": json.dumps(asdict(config)),
    }
    if family:
        metadata["family"] = family
    save_latents_file(
        out, encoded.latents, values, encoded.sha256s, flipped=encoded.flipped, metadata=metadata
    )
    return {
        "out": str(out),
        "images": len(chosen),
        "unscored_skipped": len(listed) - len(chosen),
        "encoded": encoded.encoded,
        "from_cache": len(set(encoded.sha256s)) - encoded.encoded,
        "latent_shape": list(encoded.latents.shape[1:]),
        "flipped": encoded.flipped is not None,
        "vae": identity,
        "resolution": resolution,
        "score_mean": round(sum(values) / len(values), 4),
    }


def describe(path: str | Path) -> dict:
    """Validate a latents file and return a JSON-ready summary of it."""
    loaded = load_latents_file(path)
    scores = loaded.scores
    return {
        "path": str(path),
        "count": loaded.latents.shape[0],
        "latent_shape": list(loaded.latents.shape[1:]),
        "flipped": loaded.flipped is not None,
        "sha256s": loaded.sha256s is not None,
        "score_min": float(scores.min()),
        "score_max": float(scores.max()),
        "score_mean": round(float(scores.mean()), 4),
        "metadata": {k: v for k, v in loaded.metadata.items() if k != "sha256s"},
    }


def main(argv: list[str] | None = None) -> None:
    """Export or inspect latents files: `python -m trainer.latents export|info ...`."""
    from trainer.base import DEMO, ENV_BASE_MODEL, BaseModelNotFound, load_base

    parser = argparse.ArgumentParser(prog="python -m trainer.latents")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="encode scored images into a latents file")
    ex.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    ex.add_argument("--scores", required=True, help="CSV with columns image,score")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--base", default=os.environ.get(ENV_BASE_MODEL, DEMO))
    ex.add_argument("--cache", help="latents cache folder (default: no cache)")
    ex.add_argument("--fast-encoder", help="AutoencoderTiny hub id or folder instead of the VAE")
    ex.add_argument("--batch-size", type=int, default=LatentsConfig.batch_size)
    ex.add_argument("--no-flip", action="store_true", help="skip the mirrored latents")
    ex.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    info = commands.add_parser("info", help="validate a latents file and describe it")
    info.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            summary = describe(args.file)
        else:
            config = LatentsConfig(
                batch_size=args.batch_size,
                flip=not args.no_flip,
                cache_dir=args.cache,
                fast_encoder=args.fast_encoder,
            )
            base = load_base(args.base, device=args.device)
            vae = base.pipeline.vae
            if config.fast_encoder:
                vae = load_fast_encoder(config.fast_encoder, vae.device, vae.dtype)
            summary = export(
                args.images,
                args.scores,
                args.out,
                vae,
                resolution=base.resolution,
                config=config,
                base_name=base.name,
                family=base.family,
            )
    except (LatentsFileError, BaseModelNotFound, ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
