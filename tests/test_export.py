"""LoRA export: kohya keys and alpha, files that reproduce the trained UNet, bundle, CLI."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer import lora
from trainer.base import build_demo_pipeline
from trainer.export import (
    KOHYA_KEY,
    ExportError,
    kohya_state_dict,
    main,
    sanitize_name,
    save_kohya,
    write_bundle,
    zip_bundle,
)

RANK, ALPHA = 4, 8  # alpha ≠ rank on purpose: a file carrying the rank as alpha is 2× too strong
INFO = {
    "base_model": "demo",
    "resolution": 64,
    "scorer_sha256": "ab" * 32,
    "ratings": 42,
    "score_gain": 0.31,
    "config": {"steps": 10, "rank": RANK, "alpha": ALPHA},
}


@dataclass
class Trained:
    """A saved checkpoint, fixed UNet inputs, and the UNet outputs the exports must match."""

    checkpoint: Path
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    fp32: torch.Tensor  # the trained UNet as it is
    fp16: torch.Tensor  # the trained UNet with its LoRA weights rounded to fp16, like the file
    base: torch.Tensor  # the UNet without the LoRA


def unet_output(pipe, inputs) -> torch.Tensor:
    """Return the UNet's noise prediction for (latents, timesteps, text embeddings)."""
    with torch.no_grad():
        return pipe.unet(*inputs).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """Save a demo-UNet LoRA with random (non-zero) B matrices, and its reference outputs."""
    pipe = build_demo_pipeline()
    pipe.unet.add_adapter(lora.lora_config(RANK, ALPHA), adapter_name=lora.ADAPTER)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; a trained LoRA's is not
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    checkpoint = lora.save_checkpoint(
        pipe.unet, tmp_path_factory.mktemp("lora") / "ck", {"step": 10}
    )
    inputs = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 500]),
        torch.randn(2, 77, 32, generator=generator),
    )
    fp32 = unet_output(pipe, inputs)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(param.half().float())
    fp16 = unet_output(pipe, inputs)
    base = unet_output(build_demo_pipeline(), inputs)
    return Trained(checkpoint, inputs, fp32, fp16, base)


def loaded(path: Path, **kwargs):
    """Return a freshly built demo pipeline with the LoRA file at `path` loaded."""
    pipe = build_demo_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="taste", **kwargs)
    return pipe


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def test_kohya_keys_are_lora_unet_and_alpha_is_the_trained_one(trained):
    tensors, state = kohya_state_dict(trained.checkpoint)
    # Without `lora_unet_` ComfyUI skips every key and the LoRA silently does nothing.
    assert all(KOHYA_KEY.fullmatch(key) for key in tensors), sorted(tensors)[:3]
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= set(tensors)
    modules = {key.split(".")[0] for key in tensors}
    assert len(modules) == 32  # 4 transformer blocks (down, mid, 2 up) × 2 attentions × 4 layers
    assert len(tensors) == 3 * len(modules)
    alphas = [tensors[f"{module}.alpha"] for module in modules]
    assert all(alpha.item() == ALPHA for alpha in alphas)  # diffusers' helper writes the rank
    weights = [t for key, t in tensors.items() if key.endswith(".weight")]
    assert all(t.dtype == torch.float16 for t in weights)
    assert state["rank"] == RANK and state["alpha"] == ALPHA and state["step"] == 10


def test_every_kohya_module_is_a_unet_layer_under_comfyui_naming(trained):
    # ComfyUI's model_lora_keys_unet: each diffusers UNet weight "a.b.weight" is known as
    # "lora_unet_a_b"; a module name outside that set is dropped without a word.
    unet = build_demo_pipeline().unet
    comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in unet.state_dict()}
    tensors, _ = kohya_state_dict(trained.checkpoint)
    assert {key.split(".")[0] for key in tensors} <= comfy


def test_kohya_file_reproduces_the_trained_unet_and_strength_zero_the_base(trained, tmp_path):
    path = save_kohya(trained.checkpoint, tmp_path / "taste.safetensors", name="taste", info=INFO)
    pipe = loaded(path)
    out = unet_output(pipe, trained.inputs)
    effect = (trained.fp32 - trained.base).abs().max().item()
    assert effect > 0.1  # the LoRA matters, so the bounds below can tell a wrong file
    # The file holds the LoRA weights in fp16; against the trained UNet with the same fp16
    # rounding only summation order may differ, so 1e-4 (outputs are O(1)).
    assert (out - trained.fp16).abs().max().item() <= 1e-4
    # Against the fp32 UNet the rounding shows: each weight moves by ≤ 2^-11 relative, so
    # the LoRA's change moves by ~1e-3 of itself (≈ 5e-4 here). 2e-3 leaves headroom and is
    # still far below `effect`: the rank as alpha (half strength) misses by ~0.4.
    assert (out - trained.fp32).abs().max().item() <= 2e-3
    pipe.set_adapters(["taste"], adapter_weights=[0.0])
    assert torch.equal(unet_output(pipe, trained.inputs), trained.base)


def test_bundle_has_only_files_every_loader_reads_and_all_are_readable(trained, tmp_path):
    paths = write_bundle(
        trained.checkpoint, tmp_path / "bundle", name="taste", preview=None, info=INFO
    )
    # A diffusers-format file beside the kohya one is listed by A1111/Forge/ComfyUI (they
    # scan models/Lora recursively) and loads as nothing there: it is not in the bundle.
    files = sorted(p.relative_to(tmp_path / "bundle").as_posix() for p in paths.values())
    assert files == ["README.md", "taste.json", "taste.safetensors"]
    assert sorted(p.name for p in (tmp_path / "bundle").rglob("*")) == files
    assert "preview" not in paths["readme"].read_text()  # none given, none promised
    assert 'weight_name="taste.safetensors"' in paths["readme"].read_text()
    for path in paths.values():  # a loader running as another user can read every file
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
    archive = zip_bundle(tmp_path / "bundle", tmp_path / "taste.zip")
    assert archive.stat().st_mode & 0o777 == 0o644
    with zipfile.ZipFile(archive) as opened:
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in opened.infolist()}
    assert set(modes.values()) == {0o644}, modes


def test_kohya_metadata_is_present_and_parseable(trained, tmp_path):
    path = save_kohya(trained.checkpoint, tmp_path / "x.safetensors", name="My taste", info=INFO)
    meta = metadata_of(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert int(meta["ss_network_dim"]) == RANK
    assert float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "My_taste"
    assert "taste LoRA" in meta["ss_training_comment"]
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "My taste"
    assert meta["modelspec.resolution"] == "64x64"
    datetime.fromisoformat(meta["modelspec.date"])
    assert meta["tastebud.scorer_sha256"] == INFO["scorer_sha256"]
    assert int(meta["tastebud.ratings"]) == 42
    assert float(meta["tastebud.score_gain"]) == 0.31
    assert json.loads(meta["tastebud.config"]) == INFO["config"]
    assert meta["tastebud.base_model"] == "demo"
    # The hash covers the tensor data: the file's bytes after its header.
    blob = path.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little") :]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()


def test_bundle_holds_every_file_and_the_a1111_card(trained, tmp_path):
    preview = Image.new("RGB", (128, 64), "orange")
    paths = write_bundle(
        trained.checkpoint, tmp_path / "out", name="Ann's taste", preview=preview, info=INFO
    )
    stem = "Ann_s_taste"
    names = {"kohya": f"{stem}.safetensors"}
    names |= {"preview": f"{stem}.preview.png", "sidecar": f"{stem}.json", "readme": "README.md"}
    assert {kind: path.name for kind, path in paths.items()} == names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names.values())
    with Image.open(paths["preview"]) as image:
        assert image.size == (128, 64)
    card = json.loads(paths["sidecar"].read_text())
    assert card["sd version"] == "SD1" and card["preferred weight"] == 1.0
    assert card["activation text"] == "" and "taste LoRA" in card["description"]
    readme = paths["readme"].read_text()
    assert "Ann's taste" in readme and f"<lora:{stem}:1>" in readme and "+0.310" in readme
    assert "Demo model" in readme
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


def test_a_failed_bundle_leaves_the_previous_one_whole(trained, tmp_path):
    write_bundle(trained.checkpoint, tmp_path / "out", name="taste", preview=None, info=INFO)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(OSError):  # PNG can't hold CMYK: fails after the weights are written
        write_bundle(
            trained.checkpoint,
            tmp_path / "out",
            name="taste",
            preview=Image.new("CMYK", (8, 8)),
            info=INFO,
        )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_zip_bundle_has_one_top_folder(trained, tmp_path):
    write_bundle(trained.checkpoint, tmp_path / "taste", name="taste", preview=None, info=INFO)
    path = zip_bundle(tmp_path / "taste", tmp_path / "zips" / "taste.zip")
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(
            f"taste/{p.name}" for p in (tmp_path / "taste").iterdir()
        )
        assert archive.testzip() is None
    assert [p.name for p in (tmp_path / "zips").iterdir()] == ["taste.zip"]
    with pytest.raises(ExportError, match="no bundle folder"):
        zip_bundle(tmp_path / "missing", tmp_path / "zips" / "missing.zip")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Ann's taste", "Ann_s_taste"),
        ("../../etc/passwd", "etc_passwd"),
        ("café <lora:x:1>", "cafe_lora_x_1"),
        ("CON", "CON_"),
        ("", "taste_lora"),
        ("日本", "taste_lora"),
        ("a" * 100, "a" * 64),
    ],
)
def test_sanitize_name(text, name):
    assert sanitize_name(text) == name


def test_dora_checkpoint_is_refused(tmp_path):
    # peft's DoRA magnitude is per output channel, A1111's dora_scale per input channel.
    pipe = build_demo_pipeline()
    pipe.unet.add_adapter(lora.lora_config(RANK, ALPHA, dora=True), adapter_name=lora.ADAPTER)
    checkpoint = lora.save_checkpoint(pipe.unet, tmp_path / "dora", {"step": 1})
    with pytest.raises(ExportError, match="DoRA"):
        kohya_state_dict(checkpoint)
    with pytest.raises(ExportError, match="DoRA"):
        write_bundle(checkpoint, tmp_path / "out", name="d", preview=None, info={})
    assert [p.name for p in tmp_path.iterdir()] == ["dora"]


def test_unknown_info_field_is_an_error(trained, tmp_path):
    with pytest.raises(ExportError, match="unknown info field.*scorer_hash"):
        save_kohya(
            trained.checkpoint, tmp_path / "x.safetensors", name="x", info={"scorer_hash": 1}
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_writes_a_bundle_and_prints_its_paths(trained, tmp_path, capsys):
    Image.new("RGB", (16, 16), "teal").save(tmp_path / "grid.png")
    argv = ["--checkpoint", str(trained.checkpoint), "--out", str(tmp_path / "b"), "--name", "t"]
    main([*argv, "--info", json.dumps(INFO), "--preview", str(tmp_path / "grid.png")])
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == {"kohya", "preview", "sidecar", "readme"}
    assert all(Path(path).is_file() for path in paths.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "nowhere"], "not a taste LoRA checkpoint"),
        (["--info", "[1]"], "JSON object"),
        (["--info", '{"colour": 1}'], "unknown info field"),
    ],
)
def test_cli_errors_exit_2_with_a_message(trained, tmp_path, capsys, extra, message):
    argv = ["--checkpoint", str(trained.checkpoint), "--out", str(tmp_path / "b"), "--name", "t"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
