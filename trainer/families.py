"""Which model family a base model belongs to, told from its configs or a checkpoint's keys.

The trainer's pipeline, LoRA loop and export take Stable Diffusion 1.x and 2.x, the SDXL
family (SDXL, Pony, Illustrious, NoobAI: two text encoders and added conditioning, see
trainer.conditioning) and Playground v2.5 (SDXL-structured, EDM-trained: see trainer.edm). The
SDXL refiner is recognised here and refused with a clear message, instead of failing somewhere
inside diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL family (SDXL, Pony, Illustrious, NoobAI)",
    "sdxl-refiner": "SDXL refiner",
    "playground-v2.5": "Playground v2.5",
    "other": "not a Stable Diffusion 1.x/2.x/XL model",
}
SUPPORTED = ("sd1", "sd2", "sdxl", "playground-v2.5")
# diffusers' single-file model types → families (diffusers.loaders.single_file_utils)
CHECKPOINT_TYPES = {
    "v1": "sd1",
    "inpainting": "sd1",
    "v2": "sd2",
    "inpainting_v2": "sd2",
    "xl_base": "sdxl",
    "xl_inpaint": "sdxl",
    "xl_refiner": "sdxl-refiner",
    "playground-v2-5": "playground-v2.5",
}


class UnsupportedFamily(ValueError):
    """A base model of a family the trainer can't train yet; the message names it."""


def refuse_unless_supported(family: str, where: str) -> None:
    """Raise UnsupportedFamily for a family the trainer doesn't support."""
    if family not in SUPPORTED:
        supported = ", ".join(NAMES[f] for f in SUPPORTED)
        raise UnsupportedFamily(
            f"{where} is {NAMES.get(family, family)}; tastebud trains taste LoRAs for"
            f" these base models: {supported} (not the SDXL refiner, which only refines)"
        )


def family_of_configs(model_index: dict, scheduler: dict | None = None) -> str:
    """The family of a diffusers pipeline from its model_index.json and scheduler config."""
    pipeline = model_index.get("_class_name", "")
    if pipeline.startswith("StableDiffusionXL"):
        edm = "EDM" in str((model_index.get("scheduler") or ["", ""])[-1])
        if edm or (scheduler or {}).get("sigma_data"):
            return "playground-v2.5"
        # the refiner has only the second, larger text encoder
        return "sdxl-refiner" if not (model_index.get("text_encoder") or [None])[-1] else "sdxl"
    if pipeline.startswith("StableDiffusion") and "text_encoder_2" not in model_index:
        v_prediction = (scheduler or {}).get("prediction_type") == "v_prediction"
        return "sd2" if v_prediction else "sd1"
    return "other"


def family_of_folder(folder: Path) -> str:
    """The family of a diffusers folder, from its configs alone (no weights are read)."""
    model_index = json.loads((folder / "model_index.json").read_text())
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    return family_of_configs(model_index, scheduler)


def family_of_checkpoint(path: Path) -> str:
    """The family of a single-file checkpoint from its tensor names and shapes (its header;
    no weights are loaded). `.ckpt` files are not read here: a pickle is never opened."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        return "sd1"  # unknown without unpickling; diffusers decides when it loads it
    with safe_open(str(path), framework="pt") as file:
        shapes = {
            key: SimpleNamespace(shape=file.get_slice(key).get_shape()) for key in file.keys()
        }
    return CHECKPOINT_TYPES.get(infer_diffusers_model_type(shapes), "other")


def scheduler_of_checkpoint(path: Path) -> dict:
    """What a single-file checkpoint says of its noise schedule, as scheduler settings: the
    v-prediction finetunes (NoobAI-XL V-Pred and others) carry an empty `v_pred` tensor, and
    those trained with zero terminal SNR a `ztsnr` one, since the original format has no
    scheduler config. Only the header is read."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
    said = {}
    if "v_pred" in keys:
        said["prediction_type"] = "v_prediction"
    if "ztsnr" in keys:
        said["rescale_betas_zero_snr"] = True
    return said


def describe(family: str, scheduler: dict | None = None) -> str:
    """The family's name as shown wherever the base is named, with v-prediction if so."""
    name = NAMES.get(family, family)
    if family != "sd2" and (scheduler or {}).get("prediction_type") == "v_prediction":
        name += ", v-prediction"
    if (scheduler or {}).get("rescale_betas_zero_snr"):
        name += ", zero terminal SNR"
    return name
