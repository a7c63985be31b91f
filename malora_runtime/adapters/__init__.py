"""Adapter format, validation, loading and conversion."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .convert import is_peft_dir, peft_lora_to_malora
from .errors import AdapterError, CorruptFileError
from .format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights
from .io import MAX_WEIGHTS_BYTES, ModuleShapes, _group_and_validate, atomic_directory, load_malora_dir, save_adapter

log = logging.getLogger(__name__)

READ_ATTEMPTS = 3
"""Reads of a directory that a writer keeps replacing, before giving up."""


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _load_once(directory: Path, module_shapes: ModuleShapes | None, max_bytes: int) -> MaloraAdapter:
    if not is_peft_dir(directory):
        return load_malora_dir(directory, module_shapes, max_bytes=max_bytes)
    adapter = peft_lora_to_malora(directory, max_bytes=max_bytes)
    tensors = {f"{p}.{n}": t for p, w in adapter.modules.items() for n, t in w.tensors().items()}
    adapter.modules = _group_and_validate(tensors, adapter.config, str(directory), module_shapes)
    return adapter


def load_adapter(
    directory: str | Path,
    module_shapes: ModuleShapes | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int = MAX_WEIGHTS_BYTES,
) -> MaloraAdapter:
    """Load a MALoRA directory, or a PEFT LoRA directory converted on the fly; always validated.

    Files are opened by path, one after the other: if a writer swaps in a new directory meanwhile (see
    `atomic_directory`), the config and the weights could come from two versions, so the directory's
    identity is compared before and after and a changed one is read again.
    """
    root = Path(directory)
    for _ in range(READ_ATTEMPTS):
        before = _identity(root)
        try:
            adapter = _load_once(root, module_shapes, max_bytes)
        except AdapterError:
            if _identity(root) == before:
                raise
            adapter = None  # a mix of two versions can fail validation: read the new one
        if adapter is not None and _identity(root) == before:
            return adapter.to(dtype=dtype) if dtype is not None else adapter
        log.info("%s was replaced while being read; reading it again", root)
    raise CorruptFileError(f"{root}: replaced while being read, {READ_ATTEMPTS} times in a row")


__all__ = [
    "AdapterConfig", "AdapterError", "MaloraAdapter", "ModuleSpec", "ModuleWeights",
    "atomic_directory", "load_adapter", "save_adapter",
]
