"""sd-scripts' LoRA network and UNets (copies, Apache-2.0) with stand-ins; see README.md."""
