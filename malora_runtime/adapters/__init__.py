"""Adapter format, validation, loading and conversion."""

from __future__ import annotations

from pathlib import Path

import torch

from .convert import is_peft_dir, peft_lora_to_malora
from .errors import AdapterError
from .format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights
from .io import ModuleShapes, _group_and_validate, load_malora_dir, save_adapter


def load_adapter(
    directory: str | Path,
    module_shapes: ModuleShapes | None = None,
    dtype: torch.dtype | None = None,
) -> MaloraAdapter:
    """Load a MALoRA directory, or a PEFT LoRA directory converted on the fly; always validated."""
    if is_peft_dir(directory):
        adapter = peft_lora_to_malora(directory)
        tensors = {f"{p}.{n}": t for p, w in adapter.modules.items() for n, t in w.tensors().items()}
        adapter.modules = _group_and_validate(tensors, adapter.config, str(directory), module_shapes)
        return adapter.to(dtype=dtype) if dtype is not None else adapter
    return load_malora_dir(directory, module_shapes, dtype)


__all__ = [
    "AdapterConfig", "AdapterError", "MaloraAdapter", "ModuleSpec", "ModuleWeights",
    "load_adapter", "save_adapter",
]
