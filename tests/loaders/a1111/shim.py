"""Stand-ins for the web UI modules (`modules.shared`, `devices`, `sd_models`, ...) that the
copied Lora-extension code reaches. NOT AUTOMATIC1111's code."""

from types import SimpleNamespace

import safetensors.torch
import torch

# modules.devices: the LoRA weights are kept in float32 here, as the web UI keeps them with
# --no-half (its default on GPUs is float16, which only adds fp16 rounding to the products).
devices = SimpleNamespace(cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32)

# modules.sd_models.read_state_dict: for a .safetensors LoRA, safetensors' load_file (the web
# UI's key replacements only touch text-encoder keys of full checkpoints).
sd_models = SimpleNamespace(read_state_dict=lambda filename: safetensors.torch.load_file(filename))

# modules.shared: the test sets shared.sd_model to a stand-in of the loaded checkpoint.
shared = SimpleNamespace(sd_model=None)

# modules.textual_inversion.textual_inversion: only bundled embeddings reach it.
textual_inversion = SimpleNamespace()


class SdModel:
    """What the Lora extension reads of the web UI's loaded model: the LDM UNet as
    `model.diffusion_model` (so module names start with "diffusion_model."), `is_sdxl`, and
    the text encoders (none here: these files hold UNet weights only)."""

    def __init__(self, diffusion_model: torch.nn.Module, *, is_sdxl: bool):
        self.model = torch.nn.Module()
        self.model.diffusion_model = diffusion_model
        self.is_sdxl = is_sdxl
        self.conditioner = SimpleNamespace(embedders=[])
        self.cond_stage_model = SimpleNamespace(wrapped=torch.nn.Module())
