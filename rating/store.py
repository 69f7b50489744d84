"""Content-addressed image files: validation, originals, thumbnails."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

THUMB_EXT = "jpg"
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}


class ImageRejected(ValueError):
    """An image that cannot enter the pool; the message says why."""


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    phash: str
    width: int
    height: int
    original_ext: str


def open_image(data: bytes, *, max_pixels: int, min_side: int) -> tuple[PILImage.Image, str]:
    """Validate encoded image bytes and return the upright RGB image and its file extension."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            probe = PILImage.open(io.BytesIO(data))
            fmt = probe.format
            if probe.width * probe.height > max_pixels:
                raise ImageRejected(
                    f"too large: {probe.width}×{probe.height} is over {max_pixels:,} pixels"
                )
            probe.verify()  # checks structure without decoding; the image is unusable after
            image = PILImage.open(io.BytesIO(data))
            image.seek(0)  # first frame of an animation
            image.load()  # decode now, so a truncated file is refused here
            ImageOps.exif_transpose(image, in_place=True)  # no copy when already upright
            if image.mode != "RGB":
                image = image.convert("RGB")
    except ImageRejected:
        raise
    except (PILImage.DecompressionBombWarning, PILImage.DecompressionBombError) as exc:
        raise ImageRejected(f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:  # its message names a BytesIO object: say it plainly
        raise ImageRejected("not an image file (JPEG, PNG, WebP or GIF)") from exc
    except Exception as exc:  # Pillow raises many types for corrupt or truncated files
        raise ImageRejected(f"not a readable image: {exc}") from exc
    if fmt not in FORMAT_EXT:
        raise ImageRejected(f"unsupported format {fmt}; use JPEG, PNG, WebP or GIF")
    if min(image.size) < min_side:
        raise ImageRejected(
            f"too small: {image.width}×{image.height}, the shorter side must be ≥ {min_side} px"
        )
    return image, FORMAT_EXT[fmt]


def pixel_sha256(image: PILImage.Image) -> str:
    """Hash the normalised pixels, so re-encoding a file does not change its identity."""
    digest = hashlib.sha256(f"{image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: PILImage.Image) -> str:
    """Return the 64-bit perceptual hash (hex), stable under resizing and re-encoding."""
    return str(imagehash.phash(image))


class ImageStore:
    """Image files under one root, addressed by sha256: originals/ab/<sha>.<ext>, thumbs/…"""

    def __init__(self, root: str | os.PathLike, thumb_side: int = 768):
        self.root = Path(root)
        self.thumb_side = thumb_side

    def original_path(self, sha256: str, ext: str) -> Path:
        """Return where the original file of `sha256` lives."""
        return self.root / "originals" / sha256[:2] / f"{sha256}.{ext}"

    def thumb_path(self, sha256: str) -> Path:
        """Return where the thumbnail of `sha256` lives."""
        return self.root / "thumbs" / sha256[:2] / f"{sha256}.{THUMB_EXT}"

    def add(
        self,
        image: PILImage.Image,
        original: bytes,
        ext: str,
        *,
        phash: str | None = None,
        sha256: str | None = None,
    ) -> StoredImage:
        """Write the original and its thumbnail (once) and describe the stored image."""
        sha = sha256 or pixel_sha256(image)
        original_path = self.original_path(sha, ext)
        if not original_path.exists():
            _write_atomic(original_path, original)
        thumb_path = self.thumb_path(sha)
        if not thumb_path.exists():
            _write_atomic(thumb_path, self._thumbnail(image))
        phash = phash or perceptual_hash(image)
        return StoredImage(sha, phash, image.width, image.height, ext)

    def add_bytes(self, data: bytes, *, max_pixels: int, min_side: int) -> StoredImage:
        """Validate encoded bytes and store them; raise ImageRejected with the reason."""
        image, ext = open_image(data, max_pixels=max_pixels, min_side=min_side)
        return self.add(image, data, ext)

    def _thumbnail(self, image: PILImage.Image) -> bytes:
        thumb = image.copy()
        thumb.thumbnail((self.thumb_side, self.thumb_side), PILImage.Resampling.LANCZOS)
        buffer = io.BytesIO()
        # baseline, not progressive: the browser has it preloaded, and baseline encodes ~2x faster
        thumb.save(buffer, "JPEG", quality=88, optimize=True)
        return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
