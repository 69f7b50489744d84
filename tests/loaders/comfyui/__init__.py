"""ComfyUI's LoRA loading code (copies, GPL-3.0) with the stand-ins it needs; see README.md."""

from . import lora, lora_convert, sd, shim, utils

shim.comfy.lora = lora
shim.comfy.lora_convert = lora_convert

__all__ = ["lora", "lora_convert", "sd", "shim", "utils"]
