# From ComfyUI, https://github.com/Comfy-Org/ComfyUI, commit a125cd84b054a57729b5eecab930ca9408719832,
# comfy/weight_adapter/__init__.py, cut down to the plain-LoRA adapter: the other adapters
# (LoHa, LoKr, GLoRA, OFT, BOFT) look for keys a kohya LoRA file doesn't have (hada_w1_a,
# lokr_w1, a1.weight, oft_blocks, ...), so leaving them out changes nothing for these files.
# GPL-3.0, see LICENSE in the folder above.
from .base import WeightAdapterBase, WeightAdapterTrainBase
from .lora import LoRAAdapter


adapters: list[type[WeightAdapterBase]] = [
    LoRAAdapter,
]
