"""Stand-ins for the parts of ComfyUI that the copied functions reach but these tests don't run.

NOT ComfyUI's code, except `ModelPatcher.add_patches`, copied verbatim (see below). The copied
modules refer to `comfy.utils`, `comfy.model_base`, `comfy.model_management`, `comfy.lora` and
`comfy.lora_convert`; `comfy` here is a namespace holding the copies and these stand-ins.
"""

import uuid
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from . import utils


def cast_to_device(tensor, device, dtype, copy=False):
    """comfy.model_management.cast_to_device without the non-blocking copy on CUDA."""
    return tensor.to(device=device, dtype=dtype, copy=copy)


# comfy.model_base: model_lora_keys_unet adds extra key forms for these architectures
# (isinstance checks); an SD 1.x or SDXL model is none of them.
_ARCHITECTURES = (
    "ACEStep AuraFlow Flux GenmoMochi HiDream HunyuanDiT HunyuanVideo Omnigen2 PixArt QwenImage"
    " SD3 StableCascade_C"
).split()
model_base = SimpleNamespace(**{name: type(name, (), {}) for name in _ARCHITECTURES})

comfy = SimpleNamespace(
    utils=utils,
    model_base=model_base,
    model_management=SimpleNamespace(cast_to_device=cast_to_device),
)  # .lora and .lora_convert are set by this package's __init__


class BaseModel(torch.nn.Module):
    """What ComfyUI's BaseModel offers the LoRA code: the UNet as `diffusion_model` (so its
    state-dict keys start with "diffusion_model.") and `model_config.unet_config`."""

    def __init__(self, diffusion_model: torch.nn.Module, unet_config: dict):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_config = SimpleNamespace(unet_config=unet_config)


class ModelPatcher:
    """ComfyUI's ModelPatcher, reduced to what `load_lora_for_models` calls on it."""

    def __init__(self, model: BaseModel):
        self.model = model
        self.patches = {}

    def clone(self):
        return ModelPatcher(self.model)

    @contextmanager
    def use_ejected(self):
        yield

    # Verbatim from comfy/model_patcher.py (ModelPatcher.add_patches), commit
    # a125cd84b054a57729b5eecab930ca9408719832: a patch counts as loaded only when its key is
    # a weight of the model.
    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        with self.use_ejected():
            p = set()
            model_sd = self.model.state_dict()
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

                if key in model_sd:
                    p.add(k)
                    current_patches = self.patches.get(key, [])
                    current_patches.append((strength_patch, patches[k], strength_model, offset, function))
                    self.patches[key] = current_patches

            self.patches_uuid = uuid.uuid4()
            return list(p)
