"""Images to latents: shapes, scaling, the per-image cache, flips, and the latents file format."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.configuration_utils import FrozenDict
from PIL import Image, ImageOps
from safetensors.torch import save_file

from trainer import latents as lt
from trainer.base import build_demo_pipeline

RESOLUTION = 64  # the demo model's image side


@pytest.fixture(scope="module")
def vae():
    """Return the demo pipeline's VAE (4×8×8 latents for 64 px images)."""
    return build_demo_pipeline().vae.eval()


@pytest.fixture
def images(tmp_path):
    """Write three small distinct images of different sizes and return their paths."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, (w, h) in enumerate([(80, 64), (64, 64), (50, 90)]):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def count_encodes(vae, monkeypatch):
    """Wrap `vae.encode` so the test can count how many images reach the encoder."""
    seen = []
    original = vae.encode

    def encode(x, *args, **kwargs):
        seen.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", encode)
    return seen


def test_shapes_and_scaling(vae, images):
    out = lt.encode_images(images, vae, resolution=RESOLUTION)
    assert out.latents.shape == (3, 4, 8, 8) and out.flipped.shape == (3, 4, 8, 8)
    assert out.latents.dtype == torch.float32 and out.encoded == 3
    pixels = lt.load_pixels(images[0], RESOLUTION)
    assert pixels.shape == (3, 64, 64) and -1 <= pixels.min() and pixels.max() <= 1
    with torch.no_grad():
        mean = vae.encode(pixels[None]).latent_dist.mean[0]
    assert torch.allclose(out.latents[0], mean * vae.config.scaling_factor, atol=1e-5)
    assert not torch.allclose(out.latents[0], mean, atol=1e-3)


FAMILY_VAES = {  # the VAE configs' scaling conventions, as the families' own configs set them
    "sd1": {"scaling_factor": 0.18215},
    "sdxl": {"scaling_factor": 0.13025},
    "playground-v2.5": {
        "scaling_factor": 0.5,
        "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
        "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
    },
}


@pytest.mark.parametrize("family", FAMILY_VAES)
def test_each_family_scales_latents_its_own_way_and_decoding_undoes_it(family):
    config = FrozenDict(FAMILY_VAES[family])
    raw = torch.randn(2, 4, 8, 8) * 5
    scaled = lt.scale_latents(raw, config)
    if "latents_mean" in config:  # per channel: (x − mean) · scale / std
        mean = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1)
        std = torch.tensor(config["latents_std"]).view(1, 4, 1, 1)
        assert torch.allclose(scaled, (raw - mean) * 0.5 / std)
    else:
        assert torch.allclose(scaled, raw * config["scaling_factor"])
    assert torch.allclose(lt.unscale_latents(scaled, config), raw, atol=1e-5)


class _Fp16OverflowVae(torch.nn.Module):
    """Encodes like a VAE, except that in fp16 its activations overflow (as SDXL's do)."""

    config = FrozenDict(scaling_factor=0.13025)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.dtypes = []

    def encode(self, pixels):
        self.dtypes.append(self.weight.dtype)
        mean = pixels[:, :3].mean(1, keepdim=True).repeat(1, 4, 1, 1)[..., ::8, ::8].float()
        if self.weight.dtype == torch.float16:
            mean = mean * float("inf")
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))

    def decode(self, latents):
        self.dtypes.append(self.weight.dtype)
        pixels = latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).float()
        if self.weight.dtype == torch.float16:
            pixels = pixels * float("inf")
        return SimpleNamespace(sample=pixels)


def test_a_vae_that_overflows_in_fp16_decodes_again_in_fp32():
    vae = _Fp16OverflowVae().half()
    pixels = lt.decode_latents(torch.rand(2, 4, 8, 8), vae)
    assert torch.isfinite(pixels).all() and pixels.shape == (2, 3, 64, 64)
    assert pixels.dtype == torch.float32
    assert vae.dtypes == [torch.float16, torch.float32] and vae.weight.dtype == torch.float16


def test_decoding_inverts_encoding_scale(vae, images):
    latents = lt.encode_images(images[:2], vae, resolution=RESOLUTION).latents
    pixels = lt.decode_latents(latents, vae)
    with torch.no_grad():
        direct = vae.decode(lt.unscale_latents(latents, vae.config)).sample
    assert torch.allclose(pixels, direct, atol=1e-5)


def test_a_vae_that_overflows_in_fp16_encodes_again_in_fp32():
    vae = _Fp16OverflowVae().half()
    latents = lt.encode_pixels(torch.rand(2, 3, 64, 64) * 2 - 1, vae)
    assert torch.isfinite(latents).all() and latents.shape == (2, 4, 8, 8)
    assert vae.dtypes == [torch.float16, torch.float32] and vae.weight.dtype == torch.float16


def test_encoding_is_deterministic(vae, images):
    first = lt.encode_images(images, vae, resolution=RESOLUTION)
    again = lt.encode_images(images, vae, resolution=RESOLUTION)
    assert torch.equal(first.latents, again.latents)


def test_cache_means_second_call_encodes_nothing(vae, images, tmp_path, monkeypatch):
    seen = count_encodes(vae, monkeypatch)
    config = lt.LatentsConfig(batch_size=2, cache_dir=str(tmp_path / "cache"))
    steps = []
    first = lt.encode_images(
        images + [images[0]],
        vae,
        resolution=RESOLUTION,
        config=config,
        progress=lambda *a: steps.append(a),
    )
    assert sum(seen) == 6  # 3 distinct images + their mirrors; the duplicate is not re-encoded
    assert first.encoded == 3 and torch.equal(first.latents[0], first.latents[3])
    # counted in images, as the messages say: 0, 2 (batches of 2), then all 3 done
    assert [(done, total) for done, total, _ in steps] == [(0, 3), (2, 3), (3, 3)]
    assert steps[1][2] == "encoding images 3–3 of 3"
    seen.clear()
    second = lt.encode_images(images, vae, resolution=RESOLUTION, config=config)
    assert seen == [] and second.encoded == 0
    assert torch.equal(second.latents, first.latents[:3])
    assert torch.equal(second.flipped, first.flipped[:3])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # Another resolution or another encoder is another cache entry.
    lt.encode_images(images[:1], vae, resolution=32, config=config)
    lt.encode_images(images[:1], vae, resolution=RESOLUTION, config=config, identity="other")
    assert sum(seen) == 4


def test_corrupt_cache_entry_is_re_encoded(vae, images, tmp_path, monkeypatch):
    config = lt.LatentsConfig(cache_dir=str(tmp_path / "cache"))
    first = lt.encode_images(images[:1], vae, resolution=RESOLUTION, config=config)
    [entry] = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(b"garbage")
    seen = count_encodes(vae, monkeypatch)
    again = lt.encode_images(images[:1], vae, resolution=RESOLUTION, config=config)
    assert seen == [2] and torch.equal(again.latents, first.latents)


def test_flipped_latents_encode_the_mirrored_image(vae, images, tmp_path):
    mirrored = tmp_path / "mirrored.png"
    with Image.open(images[1]) as image:
        ImageOps.mirror(image).save(mirrored)
    out = lt.encode_images([images[1], mirrored], vae, resolution=RESOLUTION)
    assert torch.allclose(out.flipped[0], out.latents[1], atol=1e-4)
    assert torch.allclose(out.flipped[1], out.latents[0], atol=1e-4)
    assert not torch.allclose(out.flipped[0], out.latents[0], atol=1e-2)


def test_no_flip(vae, images, monkeypatch):
    seen = count_encodes(vae, monkeypatch)
    out = lt.encode_images(images, vae, resolution=RESOLUTION, config=lt.LatentsConfig(flip=False))
    assert out.flipped is None and sum(seen) == 3


def test_vae_identity_is_stable_and_tracks_weights(vae):
    assert lt.vae_identity(vae) == lt.vae_identity(build_demo_pipeline().vae)
    assert lt.vae_identity(vae) != lt.vae_identity(build_demo_pipeline(seed=5).vae)


def test_tiny_autoencoder_works_as_encoder(images, tmp_path):
    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    config = lt.LatentsConfig(cache_dir=str(tmp_path / "cache"))
    out = lt.encode_images(images, tiny, resolution=RESOLUTION, config=config)
    assert out.latents.shape == (3, 4, 8, 8)
    with torch.no_grad():
        direct = tiny.encode(lt.load_pixels(images[0], RESOLUTION)[None]).latents[0]
    assert torch.allclose(out.latents[0], direct, atol=1e-5)  # scaling_factor is 1.0
    assert lt.vae_identity(tiny).startswith("AutoencoderTiny-")


def test_latents_file_round_trip(tmp_path):
    path = tmp_path / "set.safetensors"
    latents, flipped = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    shas = [f"{i:064x}" for i in range(3)]
    lt.save_latents_file(
        path, latents, [1.0, 4.5, 3.0], shas, flipped=flipped, metadata={"base": "demo"}
    )
    loaded = lt.load_latents_file(path)
    assert torch.equal(loaded.latents, latents) and torch.equal(loaded.flipped, flipped)
    assert loaded.scores.tolist() == [1.0, 4.5, 3.0] and loaded.sha256s == shas
    assert loaded.metadata["base"] == "demo" and loaded.metadata["format"] == lt.FORMAT


def test_loader_accepts_a_foreign_file_without_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"latents": torch.randn(2, 4, 8, 8).half(), "scores": torch.tensor([1, 5])}, path)
    loaded = lt.load_latents_file(path)
    assert loaded.latents.dtype == torch.float32 and loaded.scores.tolist() == [1.0, 5.0]
    assert loaded.sha256s is None and loaded.flipped is None


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"latents": torch.zeros(2, 4, 8, 8)}, None, "no 'scores'"),
        ({"scores": torch.zeros(2)}, None, "no 'latents'"),
        ({"latents": torch.zeros(2, 4, 8), "scores": torch.zeros(2)}, None, r"\[N,4,H,W\]"),
        ({"latents": torch.zeros(2, 3, 8, 8), "scores": torch.zeros(2)}, None, r"\[N,4,H,W\]"),
        ({"latents": torch.zeros(2, 4, 8, 8), "scores": torch.zeros(2, 1)}, None, r"\[N\]"),
        ({"latents": torch.zeros(2, 4, 8, 8), "scores": torch.zeros(3)}, None, "2 latents but 3"),
        (
            {"latents": torch.zeros(2, 4, 8, 8, dtype=torch.int8), "scores": torch.zeros(2)},
            None,
            "must be float",
        ),
        (
            {"latents": torch.zeros(2, 4, 8, 8), "scores": torch.tensor([1.0, float("nan")])},
            None,
            "NaN",
        ),
        (
            {
                "latents": torch.zeros(2, 4, 8, 8),
                "scores": torch.zeros(2),
                "flipped": torch.zeros(1, 4, 8, 8),
            },
            None,
            "'flipped'",
        ),
        (
            {"latents": torch.zeros(2, 4, 8, 8), "scores": torch.zeros(2)},
            {"sha256s": json.dumps(["a"])},
            "1 sha256s",
        ),
        (
            {"latents": torch.zeros(2, 4, 8, 8), "scores": torch.zeros(2)},
            {"sha256s": "[oops"},
            "not JSON",
        ),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(lt.LatentsFileError, match=message):
        lt.load_latents_file(path)


def test_pickles_are_refused_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the loader unpickled a file",))

    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(lt.LatentsFileError, match="never unpickled"):
        lt.load_latents_file(pickled)
    saved = tmp_path / "saved.safetensors"
    torch.save({"latents": torch.zeros(1, 4, 8, 8), "scores": torch.zeros(1)}, saved)
    with pytest.raises(lt.LatentsFileError, match="pickle or torch.save"):
        lt.load_latents_file(saved)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(lt.LatentsFileError, match="not a readable safetensors"):
        lt.load_latents_file(junk)
    with pytest.raises(lt.LatentsFileError, match="no latents file"):
        lt.load_latents_file(tmp_path / "missing.safetensors")


def test_config_refuses_unknown_keys():
    assert lt.LatentsConfig.from_dict({"batch_size": 2}).batch_size == 2
    with pytest.raises(TypeError, match="batchsize"):
        lt.LatentsConfig.from_dict({"batchsize": 2})


def test_cli_exports_and_describes(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scores = tmp_path / "scores.csv"
    scores.write_text(f"image,score\nimg0.png,2\nimg2.png,4.5\n{lt.image_sha256(images[1])},3\n")
    out = tmp_path / "set.safetensors"
    cache = tmp_path / "cache"
    argv = [
        "export",
        "--images",
        str(images[0].parent),
        "--scores",
        str(scores),
        "--base",
        "demo",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--cache",
        str(cache),
    ]
    lt.main(argv)
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["encoded"] == 3
    assert summary["latent_shape"] == [4, 8, 8] and summary["resolution"] == 32  # demo world
    loaded = lt.load_latents_file(out)
    assert loaded.scores.tolist() == [2.0, 3.0, 4.5]
    assert loaded.sha256s == [lt.image_sha256(p) for p in images]
    lt.main(argv)  # again: everything comes from the cache
    assert json.loads(capsys.readouterr().out)["from_cache"] == 3
    lt.main(["info", str(out)])
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 3 and info["flipped"] and info["metadata"]["base"] == "demo"
    assert info["metadata"]["family"] == "sd1"  # so a scorer can refuse another family's


def test_cli_reports_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SystemExit) as exit_info:
        lt.main(["info", str(bad)])
    assert exit_info.value.code == 2 and "never unpickled" in capsys.readouterr().err


def test_a_stop_between_batches_ends_encoding_and_keeps_what_is_cached(vae, images, tmp_path):
    from trainer.callbacks import Stopped

    config = lt.LatentsConfig(batch_size=1, cache_dir=str(tmp_path / "cache"))
    asked = iter([False, True])  # go on for the first image, then stop
    with pytest.raises(Stopped, match="after encoding 1 images"):
        lt.encode_images(
            images, vae, resolution=RESOLUTION, config=config, should_stop=lambda: next(asked)
        )
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1  # not lost, not redone
