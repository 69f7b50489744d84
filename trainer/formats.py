"""File-format facts both sides share: names, folder layouts, the grid's strengths.

No torch, no diffusers: the web process imports this in requests, and the trainer writes what
it says, so the two can't drift apart.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

STRENGTHS = (0.0, 0.5, 1.0, -1.0)  # the grid's columns: base, half taste, taste, anti-taste

# A taste-LoRA run folder holds checkpoint-NNNNNN/ folders, each a whole checkpoint.
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the adapter, in diffusers' key names
STATE_NAME = "state.json"  # step, rank, alpha, config, the evaluation history so far
CHECKPOINT_PREFIX = "checkpoint-"

# Download names: safe in every file system and in A1111's <lora:name:1> syntax.
DEFAULT_NAME = "taste_lora"
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10))}
WINDOWS_RESERVED |= {f"LPT{i}" for i in range(10)}


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step`: checkpoint-000120."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """A run folder's checkpoint folders, oldest step first."""
    found = Path(run_dir).glob(f"{CHECKPOINT_PREFIX}[0-9]*")
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def read_history(checkpoint: str | Path) -> list[dict]:
    """The evaluation history a checkpoint's state records (OSError/ValueError if unreadable)."""
    return json.loads((Path(checkpoint) / STATE_NAME).read_text()).get("history") or []


def sanitize_name(text: str) -> str:
    """Return `text` as a file name safe everywhere and in A1111's `<lora:name:1>` syntax."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text).strip("_-")[:64].strip("_-")
    if name.upper() in WINDOWS_RESERVED:
        name += "_"
    return name or DEFAULT_NAME


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Read a .safetensors file's metadata from its header, without loading torch."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")  # the format: u64 header length, JSON
        header = json.loads(file.read(min(size, 100 * 2**20)))
    return header.get("__metadata__") or {}
