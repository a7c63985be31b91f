"""Reading and writing MALoRA adapter directories, with full validation.

Only safetensors is ever read: pickle-based files are refused, never opened. Files are opened and written
through `files.py` (checked before they are opened, read into memory, directories replaced atomically).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import (
    AdapterNotFoundError,
    MissingTensorError,
    NonFiniteTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownModuleError,
    UnsafeFormatError,
)
from .files import MAX_WEIGHTS_BYTES, atomic_directory, read_json, read_safetensors
from .format import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, MaloraAdapter, ModuleWeights, expected_shapes

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# (d_in, d_out) of every linear module of the base model, by module path.
ModuleShapes = Mapping[str, tuple[int, int]]
def refuse_pickles(directory: Path) -> None:
    """Raise if the directory offers weights only in a pickle-based format."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormatError(
            f"{directory / pickles[0]}: pickle-based weight files are refused (they can run code when "
            "loaded); convert the adapter to safetensors"
        )


# ---- reading ----
def write_adapter_files(adapter: MaloraAdapter, directory: Path) -> None:
    """Write the config and the weights (in the config's dtype) into `directory`, as they are: writers use
    `save_adapter`, or this inside their own `atomic_directory` when they add files of their own."""
    dtype = adapter.config.torch_dtype
    tensors = {
        f"{path}.{name}": tensor.detach().to(dtype=dtype, device="cpu").contiguous()
        for path, weights in adapter.modules.items()
        for name, tensor in weights.tensors().items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "malora"})
    adapter.config.save(directory)


def save_adapter(adapter: MaloraAdapter, directory: str | Path) -> Path:
    """Write `adapter` as a MALoRA directory (config + one safetensors file), atomically."""
    with atomic_directory(directory) as staging:
        write_adapter_files(adapter, staging)
    return Path(directory)


def load_malora_dir(
    directory: str | Path,
    module_shapes: ModuleShapes | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int = MAX_WEIGHTS_BYTES,
) -> MaloraAdapter:
    """Load and validate a MALoRA adapter directory.

    With `module_shapes` (from `patching.linear_shapes(model)`), every tensor is also checked against
    the base model's modules. Raises a subclass of `AdapterError` naming the file, tensor and shapes.
    """
    root = Path(directory)
    if not root.is_dir():
        raise AdapterNotFoundError(f"{root}: adapter directory not found")
    refuse_pickles(root)
    config_path = root / CONFIG_FILE
    if not os.path.lexists(config_path):
        raise AdapterNotFoundError(f"{root}: no {CONFIG_FILE} (is this a MALoRA adapter directory?)")
    config = AdapterConfig.from_json(read_json(config_path, root), str(config_path))
    weights_path = root / WEIGHTS_FILE
    if not os.path.lexists(weights_path):
        raise AdapterNotFoundError(f"{weights_path}: weights file not found")
    tensors = read_safetensors(weights_path, root, max_bytes)
    modules = _group_and_validate(tensors, config, str(weights_path), module_shapes)
    adapter = MaloraAdapter(config, modules, source=str(root))
    return adapter.to(dtype=dtype) if dtype is not None else adapter


def _group_and_validate(
    tensors: dict[str, torch.Tensor],
    config: AdapterConfig,
    source: str,
    module_shapes: ModuleShapes | None,
) -> dict[str, ModuleWeights]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        spec = config.spec_for(path) if path else None
        if spec is None:
            raise UnexpectedTensorError(
                f"{source}: tensor {key!r} does not belong to a target module {config.target_modules}"
            )
        if name not in expected_shapes(spec, 1, 1):
            raise UnexpectedTensorError(f"{source}: unexpected tensor {key!r} (allowed: S, G, P, B"
                                        f"{', router_bias' if spec.router_bias else ''})")
        grouped.setdefault(path, {})[name] = tensor
    if not grouped:
        raise MissingTensorError(f"{source}: holds no adapter tensors")

    modules: dict[str, ModuleWeights] = {}
    for path in sorted(grouped):
        named = grouped[path]
        spec = config.spec_for(path)
        assert spec is not None
        if module_shapes is not None and path not in module_shapes:
            raise UnknownModuleError(f"{source}: module {path!r} does not exist in the base model "
                                     "(or is not a linear layer)")
        if module_shapes is not None:
            d_in, d_out = module_shapes[path]
        else:
            d_in, d_out = named["S"].shape[-1] if "S" in named else 0, named["B"].shape[1] if "B" in named else 0
        for name, shape in expected_shapes(spec, d_in, d_out).items():
            key = f"{path}.{name}"
            if name not in named:
                raise MissingTensorError(f"{source}: missing tensor {key!r} (expected shape {list(shape)})")
            found = tuple(named[name].shape)
            if found != shape:
                raise ShapeMismatchError(
                    f"{source}: tensor {key!r} has shape {list(found)}, expected {list(shape)}"
                )
            if not named[name].is_floating_point():
                raise ShapeMismatchError(f"{source}: tensor {key!r} has dtype {named[name].dtype}, "
                                         "expected a floating-point dtype")
        modules[path] = ModuleWeights(spec, named["S"], named["G"], named["P"], named["B"], named.get("router_bias"))
    non_finite = _first_non_finite(tensors)
    if non_finite is not None:
        raise NonFiniteTensorError(f"{source}: tensor {non_finite!r} contains NaN or Inf")
    _check_scale_is_finite(config, source)
    return modules


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The key of the first tensor holding NaN or Inf, else None.

    Fast path: a float32 sum per tensor, which is finite whenever every element is (it can only
    overflow for values near float32's limit). An adapter has hundreds of small tensors, and
    `isfinite` on half precision is slow on CPU: this was most of the read time. Only a non-finite
    sum leads to the exact per-tensor search, which also tells an overflow from a real NaN/Inf.
    """
    keys = sorted(tensors)
    sums = torch.stack([tensors[k].sum(dtype=torch.float32) for k in keys])
    if bool(torch.isfinite(sums).all()):
        return None
    return next((k for k in keys if not bool(torch.isfinite(tensors[k]).all())), None)


def _check_scale_is_finite(config: AdapterConfig, source: str) -> None:
    for name, spec in config.modules.items():
        if not math.isfinite(spec.scale):
            raise NonFiniteTensorError(f"{source}: modules.{name}.alpha gives a non-finite scale")
