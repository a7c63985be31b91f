"""Wrap a transformers causal LM's target linear layers with `MaloraLinear`, and set adapters on them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .adapters.format import MaloraAdapter
from .adapters.io import ModuleShapes
from .context import StepContext
from .layers import MaloraLinear


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear layer by module path, wrapped or not (what adapters may target)."""
    shapes: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        if isinstance(module, MaloraLinear) or isinstance(module, nn.Linear) and not path.endswith(".base"):
            shapes[path] = (module.in_features, module.out_features)
    return shapes


def wrapped_layers(model: nn.Module) -> dict[str, MaloraLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, MaloraLinear)}


def wrap_linears(model: nn.Module, paths: Iterable[str], context: StepContext | None = None) -> StepContext:
    """Replace the linear layers at `paths` with `MaloraLinear` (idempotent); returns the shared context."""
    existing = wrapped_layers(model)
    if context is None:
        context = next(iter(existing.values())).context if existing else StepContext()
    for path in paths:
        if path in existing:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, leaf)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path} is a {type(base).__name__}, not a linear layer")
        setattr(parent, leaf, MaloraLinear(base, path, context))
    return context


def target_paths(model_shapes: ModuleShapes, target_modules: Iterable[str]) -> list[str]:
    """Every linear path of the base model whose last component is one of `target_modules`."""
    targets = set(target_modules)
    return [path for path in model_shapes if path.rsplit(".", 1)[-1] in targets]


def set_adapter(model: nn.Module, adapter: MaloraAdapter | None, delta_dtype: torch.dtype | None = None) -> None:
    """Make `adapter` the one active adapter (reference path); `None` returns to the base model. The delta is
    computed in `delta_dtype` (default: the model's; float32 over a bfloat16 model is what the engine serves)."""
    if adapter is not None:
        wrap_linears(model, adapter.modules)
    layers = wrapped_layers(model)
    param = next(model.parameters())
    for path, layer in layers.items():
        weights = adapter.modules.get(path) if adapter is not None else None
        layer.adapter = None if weights is None else weights.to(param.device, delta_dtype or param.dtype)
