"""Forge's LoRA loading code and UNet (copies, AGPL-3.0 / GPL-3.0) with stand-ins; see README.md."""
