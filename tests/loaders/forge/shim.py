"""Stand-ins for the parts of Forge that the copied functions reach but these tests don't run.

NOT Forge's code, except `ModelPatcher.add_patches`, copied verbatim (see below).
"""

from types import SimpleNamespace

import torch

try:
    from einops import rearrange, repeat
except ImportError:  # only the UNet's forward uses them; these tests only build the UNet

    def rearrange(*args, **kwargs):
        raise NotImplementedError("einops is not installed")

    repeat = rearrange


def attention_function(*args, **kwargs):
    """backend.attention.attention_function: only the UNet's forward calls it."""
    raise NotImplementedError("these tests build Forge's UNet but never run it")


def cast_to_device(tensor, device, dtype, copy=False):
    """backend.memory_management.cast_to_device without the non-blocking copy on CUDA."""
    return tensor.to(device=device, dtype=dtype, copy=copy)


memory_management = SimpleNamespace(cast_to_device=cast_to_device)
# packages_3rdparty/webui_lora_collection/lora.py is empty ("# TODO: Implement API"), so every
# LoRA function comes from the ComfyUI collection.
lora_utils_webui = SimpleNamespace()


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 (Forge's signature)
    """No text encoder here: these files hold UNet weights only."""
    return key_map


class KModel(torch.nn.Module):
    """What Forge's KModel offers the LoRA code: `diffusion_model`, whose `config` is the
    unet_config it was built from, and `config.huggingface_repo`, the repo the checkpoint was
    recognised as (huggingface_guess's names, e.g. "stabilityai/stable-diffusion-xl-base-1.0")."""

    def __init__(self, diffusion_model: torch.nn.Module, huggingface_repo: str):
        super().__init__()
        self.config = SimpleNamespace(huggingface_repo=huggingface_repo)
        self.diffusion_model = diffusion_model


class ModelPatcher:
    """Forge's backend.patcher.base.ModelPatcher, reduced to what `load_lora_for_models` calls."""

    def __init__(self, model: KModel):
        self.model = model
        self.lora_patches = {}

    def clone(self):
        return ModelPatcher(self.model)

    # Verbatim from backend/patcher/base.py (ModelPatcher.add_patches), commit
    # dfdcbab685e57677014f05a3309b48cc87383167: a patch counts as loaded only when its key
    # names a parameter of the model.
    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}

        p = set()
        model_keys = set(k for k, _ in self.model.named_parameters())

        for k in patches:
            offset = None
            function = None

            if isinstance(k, str):
                key = k
            else:
                offset = k[1]
                key = k[0]
                if len(k) > 2:
                    function = k[2]

            if key in model_keys:
                p.add(k)
                current_patches = this_patches.get(key, [])
                current_patches.append([strength_patch, patches[k], strength_model, offset, function])
                this_patches[key] = current_patches

        self.lora_patches[lora_identifier] = this_patches
        return p
