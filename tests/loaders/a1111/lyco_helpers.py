# Verbatim copy from AUTOMATIC1111's Stable Diffusion web UI,
# https://github.com/AUTOMATIC1111/stable-diffusion-webui, commit
# 45b8a499a7e6d732b1711a0016c211f2b3c19232 (2 March 2024, the v1.8.0 release's day; read from the fork
# lllyasviel/stable-diffusion-webui-forge, whose history holds that commit),
# extensions-builtin/Lora/lyco_helpers.py: make_weight_cp, rebuild_conventional, rebuild_cp_decomposition.
# AGPL-3.0, see LICENSE.txt in this folder. Used only by tastebud's tests (tests/test_loaders.py).
# Only import lines differ from the original: they point at this folder and at shim.py.

import torch


def make_weight_cp(t, wa, wb):
    temp = torch.einsum('i j k l, j r -> i r k l', t, wb)
    return torch.einsum('i j k l, i r -> r j k l', temp, wa)


def rebuild_conventional(up, down, shape, dyn_dim=None):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    if dyn_dim is not None:
        up = up[:, :dyn_dim]
        down = down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def rebuild_cp_decomposition(up, down, mid):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return torch.einsum('n m k l, i n, m j -> i j k l', mid, up, down)

