"""Taste-LoRA files for other tools: the kohya-format file every loader reads, and a bundle.

The kohya file is built with diffusers' own converters (`convert_unet_state_dict_to_peft`,
then `convert_state_dict_to_kohya`), so its keys name diffusers modules in kohya style:

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha

All three loaders read these names: A1111's built-in Lora extension maps diffusers-style
names to its own (`convert_diffusers_name_to_compvis`), ComfyUI's `model_lora_keys_unet`
maps every diffusers UNet weight to `lora_unet_<name with _ for .>`, and diffusers'
`load_lora_weights` detects the kohya format and converts it back. ComfyUI ignores keys
without the `lora_unet_` prefix without a word, so `kohya_state_dict` checks every key.

Weights are fp16, like every kohya file. `.alpha` is the alpha the LoRA was trained with
(diffusers' converter writes the rank there, which would rescale the LoRA by rank/alpha);
it stays fp32 because it is a single number and fp16 would round alphas such as 0.1.
DoRA checkpoints are refused: peft's magnitude vector is one norm per output channel,
A1111 normalises `dora_scale` per input channel, so the exported file would load and
quietly draw something else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from PIL import Image

from trainer.base import DEMO
from trainer.formats import WEIGHTS_NAME, sanitize_name
from trainer.lora import LoraFileError, read_state
from trainer.tensorfiles import FILE_MODE, folder_written_whole, read_safetensors, write_atomic

KOHYA_KEY = re.compile(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)")
# What the files say of the base each family is: kohya's ss_base_model_version (sd-scripts'
# values), the SAI ModelSpec architecture id, and the "sd version" of A1111's LoRA card.
# The demo base mimics SD 1.x.
FAMILY_TAGS = {
    "sd1": ("sd_v1", "stable-diffusion-v1/lora", "SD1"),
    "sd2": ("sd_v2_768_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "SDXL"),
    # SDXL-structured: loaders take it as an SDXL LoRA (A1111 and Forge by the card's "SDXL"),
    # while the tags say which base it fits.
    "playground-v2.5": ("playground_v2.5", "playground-v2.5/lora", "SDXL"),
}
# Names Windows won't create as files, whatever the extension.


class ExportError(ValueError):
    """A checkpoint can't be exported as asked (DoRA, unknown info field, unsafe key)."""


@dataclass(frozen=True)
class ExportInfo:
    """What the exported files say about a taste LoRA besides its weights."""

    base_model: str = "unknown"  # hub id, path or "demo": the UNet the LoRA only fits
    resolution: int = 512  # image side in pixels it was trained at (SD 1.x: 512)
    scorer_sha256: str = ""  # the scorer it was trained to please, to trace the file back
    ratings: int | None = None  # how many ratings trained that scorer
    score_gain: float | None = None  # held-out mean score, LoRA minus base, on the 1–5 scale
    config: dict = field(default_factory=dict)  # training config, so the run can be repeated
    description: str = ""  # a paragraph for people; a plain default when empty
    author: str = ""  # shown by UIs that read modelspec.author
    preferred_weight: float = 1.0  # the strength A1111 inserts with `<lora:name:weight>`
    family: str = "sd1"  # trainer.families: the base's family (one of FAMILY_TAGS)

    @property
    def tags(self) -> tuple[str, str, str]:
        """(ss_base_model_version, modelspec.architecture, A1111's sd version)."""
        if self.family not in FAMILY_TAGS:
            raise ExportError(f"no LoRA file format is known for base family {self.family!r}")
        return FAMILY_TAGS[self.family]

    @property
    def is_demo(self) -> bool:
        """Whether the LoRA was trained on the tiny demo base, which fits no real SD model."""
        return self.base_model == DEMO


def _export_info(info: dict | None) -> ExportInfo:
    unknown = set(info or {}) - {f.name for f in fields(ExportInfo)}
    if unknown:
        known = ", ".join(f.name for f in fields(ExportInfo))
        raise ExportError(f"unknown info field(s) {', '.join(sorted(unknown))}; known: {known}")
    return ExportInfo(**(info or {}))


def _check_plain_lora(layers: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if any("lora_magnitude_vector" in key for key in layers):
        raise ExportError(
            "DoRA checkpoints can't be exported to kohya format: peft scales each output"
            " channel, A1111 each input channel; train with dora off to get a shareable file"
        )
    config = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    if config.get("unet.use_rslora"):
        raise ExportError("rsLoRA scales by alpha/sqrt(rank); kohya files can only say alpha/rank")
    if config.get("unet.alpha_pattern"):
        raise ExportError("per-module alphas (alpha_pattern) are not supported by this export")
    others = sorted(key for key in layers if not key.startswith("unet."))
    if others:
        raise ExportError(f"only UNet LoRAs are exported; found {others[0]}")


def kohya_state_dict(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return a checkpoint's tensors in kohya naming (fp16, trained alpha) and its state."""
    state = read_state(checkpoint_dir)
    layers, metadata = read_safetensors(
        Path(checkpoint_dir, WEIGHTS_NAME), LoraFileError, what="LoRA weights"
    )
    _check_plain_lora(layers, metadata)
    kohya = convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(layers))
    alpha = torch.tensor(float(state["alpha"]))  # the helper wrote the rank here
    tensors = {}
    for key, tensor in sorted(kohya.items()):
        if not KOHYA_KEY.fullmatch(key):  # ComfyUI would skip it silently
            raise ExportError(f"{key!r} is not a kohya UNet key (lora_unet_*)")
        tensors[key] = alpha.clone() if key.endswith(".alpha") else tensor.to(torch.float16)
    return tensors, state


def tensor_data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Return the sha256 of the tensor data a safetensors file of `tensors` holds."""
    # The bytes after the header, which metadata edits can't change: the "addnet" hash
    # A1111 and kohya's sd-scripts use, and what ModelSpec's hash_sha256 asks for.
    blob = safetensors.torch.save(tensors)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest()


def kohya_metadata(
    tensors: dict[str, torch.Tensor], state: dict, *, name: str, info: ExportInfo
) -> dict[str, str]:
    """Return the safetensors metadata A1111, ComfyUI and tastebud read, as strings."""
    digest = tensor_data_sha256(tensors)
    description = info.description or _default_description(info)
    side = info.resolution
    base_version, architecture, _ = info.tags
    metadata = {
        # kohya's sd-scripts fields: A1111 shows them and detects the SD version from them.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(state["rank"]),
        "ss_network_alpha": str(float(state["alpha"])),
        "ss_base_model_version": base_version,
        "ss_v2": str(info.family == "sd2"),
        "ss_output_name": sanitize_name(name),
        "ss_training_comment": description,
        "ss_sd_model_name": info.base_model,
        "ss_resolution": f"({side}, {side})",
        "ss_steps": str(state.get("step", 0)),
        "sshs_model_hash": digest,
        # SAI ModelSpec 1.0.0.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.description": description,
        "modelspec.date": datetime.now(UTC).isoformat(timespec="seconds"),
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.hash_sha256": f"0x{digest}",
        "modelspec.usage_hint": "Weight 1 = the trained taste, 0 = off, negative = its opposite",
        # tastebud's own: enough to trace the file to its scorer and repeat the run.
        "tastebud.base_model": info.base_model,
        "tastebud.step": str(state.get("step", 0)),
        "tastebud.scorer_sha256": info.scorer_sha256,
        "tastebud.config": json.dumps(info.config or state.get("config") or {}, sort_keys=True),
    }
    if info.author:
        metadata["modelspec.author"] = info.author
    if info.ratings is not None:
        metadata["tastebud.ratings"] = str(int(info.ratings))
    if info.score_gain is not None:
        metadata["tastebud.score_gain"] = repr(float(info.score_gain))
    return metadata


def _default_description(info: ExportInfo) -> str:
    text = "A tastebud taste LoRA: the UNet nudged towards pictures one person's scorer likes"
    if info.ratings is not None:
        text += f", a scorer trained on {info.ratings} of their ratings"
    if info.is_demo:
        text += ". Trained on the tiny demo model: it fits no real Stable Diffusion checkpoint"
    return text + "."


def save_kohya(checkpoint_dir: str | Path, out_path: str | Path, *, name: str, info: dict) -> Path:
    """Write a checkpoint as a kohya-format .safetensors with A1111/ComfyUI metadata."""
    export_info = _export_info(info)
    tensors, state = kohya_state_dict(checkpoint_dir)
    try:
        metadata = kohya_metadata(tensors, state, name=name, info=export_info)
    except TypeError as error:  # json.dumps on a config that isn't JSON
        raise ExportError(f"info config is not JSON-serialisable: {error}") from None
    out_path = Path(out_path)
    write_atomic(out_path, tensors, metadata)
    return out_path


def a1111_sidecar(info: ExportInfo, description: str) -> dict:
    """Return the `<name>.json` A1111 reads for a LoRA card (its user-metadata editor's fields)."""
    return {
        "description": description,
        "sd version": info.tags[2],
        "activation text": "",  # no trigger word: the taste applies to every prompt
        "preferred weight": info.preferred_weight,
        "negative text": "",
        "notes": f"tastebud taste LoRA; base model {info.base_model}; weight 0 = off",
    }


def model_card(
    name: str, stem: str, state: dict, info: ExportInfo, file_sha256: str, *, preview: bool
) -> str:
    """Return a short README.md: what the LoRA is, how to load it, and its numbers."""
    gain = "—" if info.score_gain is None else f"{info.score_gain:+.3f} (1–5 scale)"
    ratings = "—" if info.ratings is None else str(info.ratings)
    demo = (
        "\n> **Demo model.** Trained on tastebud's tiny built-in demo base, not on a real"
        " Stable Diffusion checkpoint: it does not fit real SD 1.x models.\n"
        if info.is_demo
        else ""
    )
    side = info.resolution
    a1111_files = f"`{stem}.safetensors`, `{stem}.json`" + (f", `{stem}.preview.png`" * preview)
    preview_line = f"- `{stem}.preview.png` — the same prompt without and with the LoRA\n"
    return f"""# {name}

{info.description or _default_description(info)}

Base model: **{info.base_model}** (Stable Diffusion 1.x, {side}×{side}). UNet only; no
trigger word — the taste applies to every prompt.
{demo}
| | |
|---|---|
| rank / alpha | {state["rank"]} / {float(state["alpha"]):g} |
| training steps | {state.get("step", 0)} |
| ratings behind the scorer | {ratings} |
| held-out score gain | {gain} |
| scorer sha256 | `{info.scorer_sha256 or "—"}` |
| `{stem}.safetensors` sha256 | `{file_sha256}` |

## Files

- `{stem}.safetensors` — kohya format, fp16: AUTOMATIC1111, Forge, ComfyUI, kohya, diffusers
{preview_line * preview}- `{stem}.json` — the card settings A1111 reads

## Use it

**AUTOMATIC1111 / Forge:** copy {a1111_files} into `models/Lora`, then add
`<lora:{stem}:{info.preferred_weight:g}>` to a prompt (0 = off, negative = the opposite taste).

**ComfyUI:** copy `{stem}.safetensors` into `models/loras` and load it with a
`LoraLoaderModelOnly` node (there are no text-encoder weights).

**diffusers:**

```python
pipe.load_lora_weights(
    "path/to/this/folder", weight_name="{stem}.safetensors", adapter_name="taste"
)
pipe.set_adapters(["taste"], adapter_weights=[{info.preferred_weight!r}])
```
"""


def write_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    preview: Image.Image | None,
    info: dict,
) -> dict[str, Path]:
    """Write the download bundle to `out_dir`: the kohya file, preview, sidecar and card."""
    export_info = _export_info(info)
    stem = sanitize_name(name)
    out_dir = Path(out_dir)
    # Everything goes into a temp folder renamed at the end: a failure leaves no half bundle.
    with folder_written_whole(out_dir) as temp:
        kohya = save_kohya(checkpoint_dir, temp / f"{stem}.safetensors", name=name, info=info)
        # Only files every tool reads: a diffusers-format file beside it would be listed by
        # A1111/Forge/ComfyUI (they scan models/Lora recursively) and load as nothing, or at
        # the wrong strength. diffusers reads the kohya file itself.
        files = {"kohya": kohya.name}
        if preview is not None:
            preview.save(temp / f"{stem}.preview.png", format="PNG")
            files["preview"] = f"{stem}.preview.png"
        description = export_info.description or _default_description(export_info)
        sidecar = json.dumps(a1111_sidecar(export_info, description), indent=2)
        (temp / f"{stem}.json").write_text(sidecar + "\n")
        files["sidecar"] = f"{stem}.json"
        with open(kohya, "rb") as file:
            file_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        state = read_state(checkpoint_dir)
        card = model_card(name, stem, state, export_info, file_sha256, preview="preview" in files)
        (temp / "README.md").write_text(card)
        files["readme"] = "README.md"
    return {kind: out_dir / file_name for kind, file_name in files.items()}


def zip_bundle(bundle_dir: str | Path, zip_path: str | Path) -> Path:
    """Zip a bundle folder into `zip_path` (one top folder inside), atomically."""
    bundle_dir, zip_path = Path(bundle_dir), Path(zip_path)
    if not bundle_dir.is_dir():
        raise ExportError(f"no bundle folder at {bundle_dir}")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(bundle_dir.iterdir()):
                if path.is_file():
                    info = zipfile.ZipInfo.from_file(path, f"{bundle_dir.name}/{path.name}")
                    info.external_attr = (0o100000 | FILE_MODE) << 16  # a plain 0644 file
                    info.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(info, path.read_bytes())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, zip_path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return zip_path


def main(argv: list[str] | None = None) -> None:
    """Write a download bundle: `python -m trainer.export --checkpoint D --out D --name N`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.export")
    parser.add_argument("--checkpoint", required=True, help="taste LoRA checkpoint folder")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced)")
    parser.add_argument("--name", required=True, help="the LoRA's name; files use a safe form")
    parser.add_argument("--info", default="{}", help=f"JSON object: {asdict(ExportInfo())}")
    parser.add_argument("--preview", help="PNG/JPEG to ship as <name>.preview.png")
    args = parser.parse_args(argv)
    try:
        info = json.loads(args.info)
        if not isinstance(info, dict):
            raise ExportError("--info must be a JSON object")
        preview = None
        if args.preview:
            with Image.open(args.preview) as image:
                preview = image.copy()  # loaded now, so the file is closed here
        paths = write_bundle(args.checkpoint, args.out, name=args.name, preview=preview, info=info)
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps({kind: str(path) for kind, path in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
