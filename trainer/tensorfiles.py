"""Atomic writes of safetensors files and whole folders, and reads that never unpickle."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# mkstemp and mkdtemp make owner-only files (0600) and folders (0700). What this project writes
# is meant to be read by other programs — a LoRA by a ComfyUI or A1111 service running as
# another user — so each gets the mode a plain write under the usual umask 022 would give.
FILE_MODE, FOLDER_MODE = 0o644, 0o755


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors to `path` so readers see the old file or the whole new one, never a part."""
    # Temp name in the same folder, then rename: two writers racing on one file both write
    # whole files, so either may win.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temp, metadata=metadata)
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_written_whole(folder: Path) -> Iterator[Path]:
    """Yield a temp folder beside `folder`; if the block succeeds it replaces `folder`.

    Readers see the old folder or the whole new one; a failure leaves no half-written folder.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        temp.chmod(FOLDER_MODE)
        yield temp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "") -> dict:
    """An optimiser's per-parameter state as flat tensors ("<prefix><index>.<name>")."""
    tensors = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            tensors[f"{prefix}{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    return tensors


def optimizer_state(tensors: dict, prefix: str = "", device=None) -> dict[int, dict]:
    """The per-parameter state `optimizer_tensors` flattened, ready for `load_state_dict`."""
    by_index: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            by_index.setdefault(int(index), {})[name] = value.to(device) if device else value
    return by_index


def read_safetensors(
    path: str | Path, error: type[ValueError], *, what: str = "file", hint: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read (tensors, metadata), raising `error` with a plain reason; a pickle is never loaded."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as failure:
        with open(path, "rb") as file:
            head = file.read(2)
        # Only after safetensors refused it: a safetensors header length can start 0x80 too.
        if head[:1] == b"\x80" or head == b"PK":  # pickle protocol 2+ / torch.save zip
            raise error(
                f"{path} is a pickle or torch.save file, not safetensors; it is never unpickled"
                f" here.{hint}"
            ) from None
        raise error(f"{path} is not a readable safetensors file: {failure}") from failure
    return tensors, metadata
