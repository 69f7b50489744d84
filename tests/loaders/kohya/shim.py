"""Stand-ins for what the copied sd-scripts files import but these tests don't need, and the
one change the tests make to them. NOT kohya's code."""

from contextlib import contextmanager

try:
    from einops import rearrange
except ImportError:  # only the UNets' forward uses it; these tests only build the UNets

    def rearrange(*args, **kwargs):
        raise NotImplementedError("einops is not installed")


def setup_logging(*args, **kwargs):
    """library.utils.setup_logging sets up rich console logging; plain logging will do."""


@contextmanager
def widths(module, **constants):
    """Build sd-scripts' UNets narrower: their classes read the channel counts from module
    constants (sdxl_original_unet.MODEL_CHANNELS, original_unet.BLOCK_OUT_CHANNELS, ...) while
    the block layout, depths and names stay SD 1.x's or SDXL's own. Restores them after."""
    saved = {name: getattr(module, name) for name in constants}
    for name, value in constants.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
