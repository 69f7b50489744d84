# Verbatim copy from ComfyUI, https://github.com/Comfy-Org/ComfyUI (formerly
# comfyanonymous/ComfyUI), commit a125cd84b054a57729b5eecab930ca9408719832,
# comfy/sd.py: load_lora_for_models.
# GPL-3.0, see LICENSE in this folder. Used only by tastebud's tests (tests/test_loaders.py).
# Only import lines differ from the original: they point at this folder and at shim.py.
import logging
from .shim import comfy


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)

    lora = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora, key_map)
    if model is not None:
        new_modelpatcher = model.clone()
        k = new_modelpatcher.add_patches(loaded, strength_model)
    else:
        k = ()
        new_modelpatcher = None

    if clip is not None:
        new_clip = clip.clone()
        k1 = new_clip.add_patches(loaded, strength_clip)
    else:
        k1 = ()
        new_clip = None
    k = set(k)
    k1 = set(k1)
    for x in loaded:
        if (x not in k) and (x not in k1):
            logging.warning("NOT LOADED {}".format(x))

    return (new_modelpatcher, new_clip)
