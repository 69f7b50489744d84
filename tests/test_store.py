"""The image store: validation, content addressing, thumbnails, no half-written files."""

from __future__ import annotations

import io

import pytest
from PIL import Image as PILImage

from rating.store import ImageRejected, ImageStore, pixel_sha256

LIMITS = {"max_pixels": 4_000_000, "min_side": 256}


def encoded(size=(640, 480), color=(200, 30, 30), fmt="PNG", **save) -> bytes:
    """Encode a solid image."""
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def test_add_writes_original_and_thumbnail_by_content(tmp_path):
    store = ImageStore(tmp_path, thumb_side=200)
    data = encoded((800, 400))
    stored = store.add_bytes(data, **LIMITS)
    assert (stored.width, stored.height, stored.original_ext) == (800, 400, "png")
    assert store.original_path(stored.sha256, "png").read_bytes() == data
    with PILImage.open(store.thumb_path(stored.sha256)) as thumb:
        assert thumb.size == (200, 100)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_same_pixels_in_another_format_have_the_same_identity(tmp_path):
    store = ImageStore(tmp_path)
    png = store.add_bytes(encoded(fmt="PNG"), **LIMITS)
    webp = store.add_bytes(encoded(fmt="WEBP", lossless=True), **LIMITS)
    assert png.sha256 == webp.sha256 and png.original_ext != webp.original_ext


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image at all", r"^not an image file \(JPEG, PNG, WebP or GIF\)$"),
        (encoded()[:200], "not a readable image"),
        (encoded((100, 600)), "too small"),
        (encoded((3000, 2000)), "too large"),
        (encoded(fmt="BMP"), "unsupported format BMP"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path, data, reason):
    store = ImageStore(tmp_path)
    with pytest.raises(ImageRejected, match=reason):
        store.add_bytes(data, **LIMITS)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_exif_orientation_is_applied(tmp_path):
    image = PILImage.new("RGB", (600, 300), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° when shown
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    stored = ImageStore(tmp_path).add_bytes(buffer.getvalue(), **LIMITS)
    assert (stored.width, stored.height) == (300, 600)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = ImageStore(tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("rating.store.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.add_bytes(encoded(), **LIMITS)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_pixel_hash_depends_on_pixels():
    a = PILImage.new("RGB", (300, 300), (1, 2, 3))
    b = PILImage.new("RGB", (300, 300), (1, 2, 4))
    assert pixel_sha256(a) != pixel_sha256(b) and pixel_sha256(a) == pixel_sha256(a.copy())
