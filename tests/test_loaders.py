"""Exported LoRA files load in the users' tools, through the tools' own code.

tests/loaders/ holds verbatim copies of the LoRA loading code of ComfyUI, Forge, AUTOMATIC1111's
web UI and kohya's sd-scripts (its README says which files, at which commits). A LoRA with random
B matrices is trained onto an SD 1.x- or SDXL-structured UNet built from config (the real block
layout and depths, narrow channels), saved as a checkpoint and exported to a kohya file. Each
tool then loads that file the way it does for a user: its own key mapping against the UNet it
would hold (the original LDM module names for ComfyUI, Forge and A1111; sd-scripts' own UNet
classes), its own patch math. Every module in the file must load, and the weight delta the
tool applies at strength 1 must be the trained one up to the file's fp16 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from tests.loaders import a1111, comfyui, forge
from tests.loaders.a1111 import networks as a1111_networks
from tests.loaders.comfyui import shim as comfyui_shim
from tests.loaders.forge import networks as forge_networks
from tests.loaders.forge import patcher_lora as forge_lora
from tests.loaders.forge import shim as forge_shim
from tests.loaders.forge.unet import IntegratedUNet2DConditionModel
from tests.loaders.kohya import lora as kohya_lora
from tests.loaders.kohya import original_unet, sdxl_original_unet
from tests.loaders.kohya.shim import widths
from trainer import lora
from trainer.export import save_kohya

RANK, ALPHA = 4, 8  # alpha ≠ rank on purpose: a file carrying the rank as alpha is 2× off
# Each factor of the file is fp16, ≤ 2^-11 relative rounding, so a delta moves by ~1e-3 of
# itself at worst (measured: ≤ 5e-4); a wrong scale is off by 0.5 or more.
TOLERANCE = 2e-3

# The real block layouts of SD 1.x and SDXL, at a fraction of the width: SD 1.5's
# (320, 640, 1280, 1280) channels as (32, 64, 128, 128), SDXL's (320, 640, 1280) as
# (32, 64, 128), with its 2- and 10-deep transformer stacks and 2048-wide text context.
UNET_CONFIGS = {
    "sd1": dict(
        sample_size=8,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=8,
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# The narrow widths for sd-scripts' UNets, which read them from module constants.
KOHYA_WIDTHS = {
    "sd1": (original_unet, dict(BLOCK_OUT_CHANNELS=(32, 64, 128, 128), TIMESTEP_INPUT_DIM=32)),
    "sdxl": (sdxl_original_unet, dict(MODEL_CHANNELS=32)),
}
# What Forge (huggingface_guess) recognises each family's checkpoints as.
FORGE_REPOS = {
    "sd1": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# Every target set on SD 1.x; on SDXL the largest, which holds the others.
CASES = [("sd1", targets) for targets in lora.TARGETS] + [("sdxl", "attention+ff+conv")]


def build_unet(family: str) -> UNet2DConditionModel:
    """Return the family's narrow UNet with random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**UNET_CONFIGS[family])


def ldm_config(config) -> dict:
    """Return the unet_config ComfyUI's model detection gives (Forge builds its UNet from it)
    for a diffusers UNet config: per-block transformer depths, the LDM's own field names."""
    levels = len(config.block_out_channels)
    depths = config.transformer_layers_per_block
    depths = [depths] * levels if isinstance(depths, int) else list(depths)
    depth = [
        d if kind.startswith("CrossAttn") else 0
        for d, kind in zip(depths, config.down_block_types, strict=True)
    ]
    heads = config.attention_head_dim  # diffusers' SD configs give the head count here
    sdxl = config.addition_embed_type == "text_time"
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        model_channels=config.block_out_channels[0],
        num_res_blocks=[config.layers_per_block] * levels,
        channel_mult=[c // config.block_out_channels[0] for c in config.block_out_channels],
        transformer_depth=[d for d in depth for _ in range(config.layers_per_block)],
        transformer_depth_output=[d for d in depth for _ in range(config.layers_per_block + 1)],
        transformer_depth_middle=depths[-1],  # the middle block always has attention
        context_dim=config.cross_attention_dim,
        use_spatial_transformer=True,
        use_linear_in_transformer=config.use_linear_projection,
        num_heads=-1 if sdxl else heads,
        num_head_channels=64 if sdxl else -1,
        num_classes="sequential" if sdxl else None,
        adm_in_channels=config.projection_class_embeddings_input_dim if sdxl else None,
    )


def ldm_unet(config: dict) -> torch.nn.Module:
    """Return Forge's UNet (the original LDM module names) for `config`, without weights."""
    with torch.device("meta"):
        return IntegratedUNet2DConditionModel(**config)


def kohya_unet(family: str) -> torch.nn.Module:
    """Return sd-scripts' own UNet class for the family at the narrow widths, without weights."""
    module, constants = KOHYA_WIDTHS[family]
    constants = {**constants, "TIME_EMBED_DIM": 4 * UNET_CONFIGS[family]["block_out_channels"][0]}
    with widths(module, **constants), torch.device("meta"):
        if family == "sdxl":
            return sdxl_original_unet.SdxlUNet2DConditionModel()
        config = UNET_CONFIGS[family]
        return original_unet.UNet2DConditionModel(
            sample_size=config["sample_size"],
            attention_head_dim=config["attention_head_dim"],
            cross_attention_dim=config["cross_attention_dim"],
        )


@dataclass
class Export:
    """A kohya file exported from a trained checkpoint, and what it was trained on."""

    family: str
    file: Path
    trained: dict[str, torch.Tensor]  # file module name → the delta the trained UNet applies
    ldm_config: dict
    ldm_unet: torch.nn.Module


def export_lora(family: str, targets: str, folder: Path) -> Export:
    """Train (random B) a LoRA on the family's UNet, save a checkpoint, export it to kohya."""
    unet = build_unet(family)
    extra = lora.TARGETS[targets]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet.add_adapter(lora.lora_config(RANK, ALPHA, extra=extra), adapter_name=lora.ADAPTER)
        with torch.no_grad():  # B starts at zero; a trained LoRA's is not
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    checkpoint = lora.save_checkpoint(unet, folder / "checkpoint", {"step": 1})
    # peft's own delta of each adapted layer: lora_B @ lora_A × alpha/rank (a convolution of
    # the two for 3×3 convs), what the trained UNet adds to the weight.
    with torch.no_grad():
        trained = {
            "lora_unet_" + name.replace(".", "_"): module.get_delta_weight(lora.ADAPTER)
            for name, module in unet.named_modules()
            if lora.ADAPTER in getattr(module, "lora_A", {})
        }
    info = {"family": family, "base_model": f"tiny {family}", "config": {"targets": targets}}
    file = save_kohya(checkpoint, folder / "taste.safetensors", name="taste", info=info)
    config = ldm_config(unet.config)
    return Export(family, file, trained, config, ldm_unet(config))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{t}" for f, t in CASES])
def exported(request, tmp_path_factory) -> Export:
    family, targets = request.param
    return export_lora(family, targets, tmp_path_factory.mktemp(f"{family}-{targets}"))


def file_modules(file: Path) -> set[str]:
    """Return the module names a kohya file holds (its keys before the first dot)."""
    return {key.split(".")[0] for key in load_file(file)}


def zeros_like_meta(tensor: torch.Tensor) -> torch.Tensor:
    """A zero weight of a meta parameter's shape: patched, it becomes the delta alone."""
    return torch.zeros(tensor.shape)


# ---- each tool, as it loads a LoRA for a user ---------------------------------------------
# Each returns {file module name: the weight delta the tool applies at strength 1} for the
# modules it loaded; a base weight of zeros patched by the tool's own math is that delta.


def comfyui_deltas(export: Export) -> dict[str, torch.Tensor]:
    """ComfyUI's LoraLoaderModelOnly: comfy.sd.load_lora_for_models, then the patch math."""
    model = comfyui_shim.ModelPatcher(comfyui_shim.BaseModel(export.ldm_unet, export.ldm_config))
    patched, _ = comfyui.sd.load_lora_for_models(model, None, load_file(export.file), 1.0, 0)
    key_map = comfyui.lora.model_lora_keys_unet(model.model, {})
    names = inverse(key_map, file_modules(export.file))
    model_sd = model.model.state_dict()
    return {
        names[key]: comfyui.lora.calculate_weight(patches, zeros_like_meta(model_sd[key]), key)
        for key, patches in patched.patches.items()
    }


def forge_deltas(export: Export) -> dict[str, torch.Tensor]:
    """Forge's Lora extension: load_lora_for_models, then merge_lora_to_weight."""
    kmodel = forge_shim.KModel(export.ldm_unet, FORGE_REPOS[export.family])
    model = forge_shim.ModelPatcher(kmodel)
    patched, _ = forge_networks.load_lora_for_models(
        model, None, load_file(export.file), 1.0, 0.0, filename=str(export.file)
    )
    key_map = forge_lora.model_lora_keys_unet(kmodel, {})
    names = inverse(key_map, file_modules(export.file))
    parameters = dict(kmodel.named_parameters())
    return {
        names[key]: forge_lora.merge_lora_to_weight(patches, zeros_like_meta(parameters[key]), key)
        for lora_patches in patched.lora_patches.values()
        for key, patches in lora_patches.items()
    }


def a1111_deltas(export: Export) -> dict[str, torch.Tensor]:
    """The web UI's Lora extension: load_network, then each module's calc_updown."""
    sd_model = a1111.shim.SdModel(export.ldm_unet, is_sdxl=export.family == "sdxl")
    a1111.shim.shared.sd_model = sd_model
    a1111_networks.assign_network_names_to_compvis_modules(sd_model)
    net = a1111_networks.load_network("taste", SimpleNamespace(filename=str(export.file)))
    deltas = {}
    with torch.no_grad():
        for module in net.modules.values():  # network_key: the first of its file keys
            updown, _ = module.calc_updown(zeros_like_meta(module.sd_module.weight))
            deltas[module.network_key.split(".")[0]] = updown
    return deltas


def kohya_deltas(export: Export) -> dict[str, torch.Tensor]:
    """sd-scripts' image generation: create_network_from_weights on its own UNet, apply_to,
    load_state_dict, and each module's weight (get_weight, the math merge_to applies)."""
    unet = kohya_unet(export.family)
    weights_sd = load_file(export.file)
    # sd-scripts renames diffusers-named SDXL modules to its own (original) names on load;
    # the same renaming on a {key: key} dict tells which file module each one came from.
    renamed = {key: key for key in weights_sd}
    if export.family == "sdxl":
        kohya_lora.convert_diffusers_to_sai_if_needed(renamed)
    origin = {new.split(".")[0]: old.split(".")[0] for new, old in renamed.items()}
    network, weights_sd = kohya_lora.create_network_from_weights(
        1.0, None, None, [], unet, weights_sd=weights_sd, for_inference=True
    )
    network.apply_to([], unet, apply_text_encoder=False)
    info = network.load_state_dict(weights_sd, False)
    assert not info.missing_keys and not info.unexpected_keys, info
    with torch.no_grad():
        return {origin[module.lora_name]: module.get_weight() for module in network.unet_loras}


def inverse(key_map: dict[str, str], modules: set[str]) -> dict[str, str]:
    """Return {model weight key: file module} for the file's modules in a tool's key map."""
    found = {key_map[module]: module for module in modules if module in key_map}
    assert len(found) == len([m for m in modules if m in key_map]), "two modules, one weight"
    return found


TOOLS = {
    "comfyui": comfyui_deltas,
    "forge": forge_deltas,
    "a1111": a1111_deltas,
    "kohya": kohya_deltas,
}


def worst_error(deltas: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> float:
    """Return the largest ‖applied − trained‖ / ‖trained‖ over the modules."""
    return max(
        ((deltas[name] - trained[name]).norm() / trained[name].norm()).item() for name in deltas
    )


# ---- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("tool", TOOLS)
def test_every_module_loads_with_the_trained_delta(tool, exported, caplog):
    with caplog.at_level(logging.WARNING):
        deltas = TOOLS[tool](exported)
    in_file = file_modules(exported.file)
    assert set(exported.trained) == in_file  # the export wrote every trained layer
    missing = sorted(in_file - set(deltas))
    assert not missing, f"{tool} loaded {len(deltas)} of {len(in_file)} modules; not {missing[:3]}"
    assert not [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    for name, delta in deltas.items():
        assert delta.shape == exported.trained[name].shape, name
    assert worst_error(deltas, exported.trained) <= TOLERANCE


@pytest.fixture(scope="module")
def wrong_alpha(tmp_path_factory) -> Export:
    """An export whose file says alpha = rank, as diffusers' converter alone would write it."""
    export = export_lora("sd1", "attention+ff+conv", tmp_path_factory.mktemp("wrong-alpha"))
    tensors = load_file(export.file)
    for key in tensors:
        if key.endswith(".alpha"):
            tensors[key] = torch.tensor(float(RANK))
    save_file(tensors, export.file)
    return export


@pytest.mark.parametrize("tool", TOOLS)
def test_a_file_with_the_rank_as_alpha_fails_the_delta_check(tool, wrong_alpha):
    deltas = TOOLS[tool](wrong_alpha)
    assert set(deltas) == set(wrong_alpha.trained)  # it loads…
    assert worst_error(deltas, wrong_alpha.trained) == pytest.approx(0.5, abs=TOLERANCE)  # …at ½


@pytest.mark.parametrize("family", UNET_CONFIGS)
def test_the_tools_unets_have_the_trained_unets_layers(family):
    unet = build_unet(family)
    config = ldm_config(unet.config)
    ldm = {key: value.shape for key, value in ldm_unet(config).state_dict().items()}
    # ComfyUI's and Forge's diffusers → LDM maps put every weight of the UNet the LoRA was
    # trained on onto a weight of the same shape in the LDM UNet built from `config`.
    for to_diffusers in (comfyui.utils.unet_to_diffusers, forge.lora_utils.unet_to_diffusers):
        mapping = to_diffusers(config)
        shapes = {key: ldm.get(mapping.get(key)) for key in unet.state_dict()}
        wrong = [key for key, value in unet.state_dict().items() if shapes[key] != value.shape]
        assert not wrong, wrong[:3]
    sd_scripts = {key: value.shape for key, value in kohya_unet(family).state_dict().items()}
    if family == "sdxl":  # sd-scripts' SDXL UNet has the original names: the LDM UNet's
        assert sd_scripts == ldm
    else:  # its SD 1.x UNet mimics diffusers' names
        assert sd_scripts == {key: value.shape for key, value in unet.state_dict().items()}
