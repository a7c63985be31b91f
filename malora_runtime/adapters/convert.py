"""Conversions into MALoRA: PEFT LoRA (exact, N = 1) and mixtures of LoRA experts (by SVD).

MoLoRA input layout (a directory, documented in docs/adapter-format.md):
  molora_config.json   {"format": "molora", "base_model", "target_modules", "dtype",
                        "modules": {leaf: {"r", "num_experts", "top_k", "alpha",
                                           optional "router_norm", "router_temperature", "router_bias"}}}
  molora_model.safetensors  per module path: `A` [N, r, d_in], `B` [N, d_out, r], `router` [N, d_in],
                            and `router_bias` [N] when the config says so.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterConfigError, AdapterNotFoundError, MissingTensorError, ShapeMismatchError
from .files import MAX_WEIGHTS_BYTES, read_json, read_safetensors
from .format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights
from .io import refuse_pickles

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults, for a config that leaves them out
# PEFT options that change what an adapted layer computes and that the MALoRA format cannot express.
PEFT_REFUSED = ("use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication", "target_parameters")
MOLORA_CONFIG = "molora_config.json"
MOLORA_WEIGHTS = "molora_model.safetensors"


def is_peft_dir(directory: str | Path) -> bool:
    # lexists, not is_file: a FIFO or a bad symlink under this name is then refused by name, not ignored.
    return os.path.lexists(Path(directory) / PEFT_CONFIG)


def _read_json(path: Path, root: Path) -> dict:
    data = read_json(path, root)
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path}: must be a JSON object")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _peft_pattern(cfg: dict, key: str, valid: Any, what: str, where: Path) -> dict[str, Any]:
    """`rank_pattern` or `alpha_pattern`, checked: regular expressions as keys, valid values."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterConfigError(f"{where}: {key} must be an object, got {patterns!r}")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterConfigError(f"{where}: {key} key {pattern!r} is not a regular expression ({exc})") from None
        if not valid(value):
            raise AdapterConfigError(f"{where}: {key}[{pattern!r}] must be {what}, got {value!r}")
    return patterns


def peft_pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (`peft.utils.other.get_pattern_key`): the value of the first key, in order, that as a
    regular expression matches the whole module name or its end after a '.'; else the default."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return patterns.get(module, default)


def peft_lora_to_malora(directory: str | Path, dtype: str = "float32",
                        max_bytes: int = MAX_WEIGHTS_BYTES) -> MaloraAdapter:
    """Convert a PEFT LoRA directory exactly: S = A, P = I, B = B, N = k = 1, no router.

    rsLoRA (scale alpha / sqrt(r)) is folded into alpha. `rank_pattern` and `alpha_pattern` are applied per
    module as PEFT does; a result that differs between layers of one module name cannot be expressed (the
    format has one spec per name) and is refused, as are DoRA, LoRA biases and other options that change
    the computation. Anything not understood is refused rather than converted approximately.
    """
    root = Path(directory)
    config_path = root / PEFT_CONFIG
    if not os.path.lexists(config_path):
        raise AdapterNotFoundError(f"{config_path}: not found (is this a PEFT LoRA directory?)")
    refuse_pickles(root)
    cfg = _read_json(config_path, root)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterConfigError(f"{config_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in PEFT_REFUSED:
        if cfg.get(flag):
            raise AdapterConfigError(f"{config_path}: {flag}={cfg[flag]!r} is not supported (it has no exact "
                                     "MALoRA form)")
    if cfg.get("bias", "none") != "none":
        raise AdapterConfigError(f"{config_path}: LoRA bias {cfg.get('bias')!r} is not supported")
    default_rank = cfg.get("r", PEFT_DEFAULT_R)
    if not _is_rank(default_rank):
        raise AdapterConfigError(f"{config_path}: 'r' must be a positive integer, got {default_rank!r}")
    default_alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _is_number(default_alpha):
        raise AdapterConfigError(f"{config_path}: 'lora_alpha' must be a finite number, got {default_alpha!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterConfigError(f"{config_path}: 'use_rslora' must be true or false, got {rslora!r}")
    rank_pattern = _peft_pattern(cfg, "rank_pattern", _is_rank, "a positive integer", config_path)
    alpha_pattern = _peft_pattern(cfg, "alpha_pattern", _is_number, "a finite number", config_path)

    weights_path = root / PEFT_WEIGHTS
    if not os.path.lexists(weights_path):
        raise AdapterNotFoundError(f"{weights_path}: weights file not found")
    tensors = read_safetensors(weights_path, root, max_bytes)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        # Only `<module>.lora_A.weight` / `.lora_B.weight`: a `lora_B.bias` or a DoRA magnitude is refused.
        path, _, part = name.removesuffix(".weight").rpartition(".")
        if not name.endswith(".weight") or part not in ("lora_A", "lora_B") or not path:
            raise AdapterConfigError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")
        if tensor.dim() != 2:
            raise ShapeMismatchError(f"{weights_path}: {key} is {list(tensor.shape)}, expected a matrix "
                                     "(only linear layers are supported)")
        pairs.setdefault(path, {})[part] = tensor

    modules: dict[str, ModuleWeights] = {}
    specs: dict[str, ModuleSpec] = {}
    first_of: dict[str, str] = {}  # leaf name -> the first module path that set its spec
    for path in sorted(pairs):
        pair = pairs[path]
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise MissingTensorError(f"{weights_path}: missing {part} for module {path!r}")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ShapeMismatchError(f"{weights_path}: {path}: lora_B is {list(b.shape)}, lora_A is "
                                     f"{list(a.shape)}: ranks differ")
        expected_rank = peft_pattern_value(rank_pattern, path, default_rank)
        if rank != expected_rank:
            raise ShapeMismatchError(f"{weights_path}: {path}: rank {rank}, config says {expected_rank}")
        alpha = float(peft_pattern_value(alpha_pattern, path, default_alpha))
        if rslora:
            alpha = alpha * math.sqrt(rank)  # scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        spec = ModuleSpec(d=rank, r=rank, num_experts=1, top_k=1, alpha=alpha)
        leaf = path.rsplit(".", 1)[-1]
        first_of.setdefault(leaf, path)
        if specs.setdefault(leaf, spec) != spec:
            other = specs[leaf]
            raise AdapterConfigError(
                f"{config_path}: rank_pattern/alpha_pattern give layers named {leaf!r} different values "
                f"({first_of[leaf]}: r={other.r}, alpha={other.alpha:g}; {path}: r={rank}, alpha={alpha:g}); "
                "the MALoRA format has one rank and alpha per module name, so this adapter cannot be converted"
            )
        modules[path] = ModuleWeights(
            spec, S=a, G=torch.zeros(1, a.shape[1]), P=torch.eye(rank).unsqueeze(0), B=b.unsqueeze(0)
        )
    if not modules:
        raise MissingTensorError(f"{weights_path}: holds no LoRA weights")
    config = AdapterConfig(
        base_model=str(cfg.get("base_model_name_or_path") or "unknown"),
        target_modules=sorted(specs), modules=specs, dtype=dtype,
        description=f"converted from PEFT LoRA {root.name}",
    )
    return MaloraAdapter(config, modules, source=str(root))


@dataclass
class MoloraModule:
    """One layer of a mixture of LoRA experts. A [N, r, d_in], B [N, d_out, r], router [N, d_in]."""

    spec: ModuleSpec
    A: torch.Tensor
    B: torch.Tensor
    router: torch.Tensor
    router_bias: torch.Tensor | None = None


def read_molora(directory: str | Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> tuple[AdapterConfig,
                                                                                    dict[str, MoloraModule]]:
    root = Path(directory)
    config_path = root / MOLORA_CONFIG
    if not os.path.lexists(config_path):
        raise AdapterNotFoundError(f"{config_path}: not found (is this a MoLoRA directory?)")
    refuse_pickles(root)
    raw = _read_json(config_path, root)
    if raw.get("format") != "molora":
        raise AdapterConfigError(f"{config_path}: 'format' must be 'molora'")
    module_raw = raw.get("modules")
    if not isinstance(module_raw, dict) or not module_raw:
        raise AdapterConfigError(f"{config_path}: 'modules' must be a non-empty object")
    specs: dict[str, ModuleSpec] = {}
    for leaf, fields in module_raw.items():
        fields = dict(fields)
        r = fields.pop("r", None)
        if not isinstance(r, int):
            raise AdapterConfigError(f"{config_path}: modules.{leaf}.r must be an integer")
        try:
            specs[leaf] = ModuleSpec(d=r, r=r, **fields)
        except TypeError as exc:
            raise AdapterConfigError(f"{config_path}: modules.{leaf}: {exc}") from None
        specs[leaf].validate(f"{config_path}: modules.{leaf}")
    weights_path = root / MOLORA_WEIGHTS
    tensors = read_safetensors(weights_path, root, max_bytes)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        if path.rsplit(".", 1)[-1] not in specs or name not in ("A", "B", "router", "router_bias"):
            raise AdapterConfigError(f"{weights_path}: unexpected tensor {key!r}")
        grouped.setdefault(path, {})[name] = tensor.float()
    modules: dict[str, MoloraModule] = {}
    for path, named in sorted(grouped.items()):
        spec = specs[path.rsplit(".", 1)[-1]]
        for name in ("A", "B", "router") + (("router_bias",) if spec.router_bias else ()):
            if name not in named:
                raise MissingTensorError(f"{weights_path}: missing tensor {path}.{name}")
        n, r = spec.num_experts, spec.r
        a, b, router = named["A"], named["B"], named["router"]
        d_in = a.shape[-1]
        for name, found, want in (("A", a.shape, (n, r, d_in)), ("B", b.shape, (n, b.shape[1], r)),
                                  ("router", router.shape, (n, d_in))):
            if tuple(found) != want:
                raise ShapeMismatchError(f"{weights_path}: {path}.{name} is {list(found)}, expected {list(want)}")
        modules[path] = MoloraModule(spec, a, b, router, named.get("router_bias"))
    config = AdapterConfig(base_model=str(raw.get("base_model", "unknown")), target_modules=sorted(specs),
                           modules=specs, dtype=str(raw.get("dtype", "float32")))
    return config, modules


def molora_module_to_malora(module: MoloraModule, subspace_rank: int) -> tuple[ModuleWeights, float]:
    """SVD of the stacked A (N*r x d_in): S = V_d^T, P_t = A_t V_d. Returns the weights and the energy kept.

    When `subspace_rank` exceeds the stack's dimensions, S and P are zero-padded, which is exact.
    """
    spec = module.spec
    n, r, d_in = module.A.shape
    stack = module.A.reshape(n * r, d_in).double()
    _, sigma, vh = torch.linalg.svd(stack, full_matrices=False)
    kept = min(subspace_rank, vh.shape[0])
    total = float((sigma**2).sum())
    energy = 1.0 if total == 0.0 else float((sigma[:kept] ** 2).sum()) / total
    basis = vh[:kept]  # [kept, d_in]
    S = torch.zeros(subspace_rank, d_in, dtype=torch.float64)
    S[:kept] = basis
    P = torch.einsum("nri,di->nrd", module.A.double(), S)  # [N, r, d]
    new_spec = ModuleSpec(d=subspace_rank, r=r, num_experts=n, top_k=spec.top_k, alpha=spec.alpha,
                          router_norm=spec.router_norm, router_temperature=spec.router_temperature,
                          router_bias=spec.router_bias)
    weights = ModuleWeights(new_spec, S.float(), module.router.float(), P.float(), module.B.float(),
                            None if module.router_bias is None else module.router_bias.float())
    return weights, energy


def molora_to_malora(directory: str | Path, subspace_rank: int) -> tuple[MaloraAdapter, dict[str, float]]:
    """Convert a MoLoRA directory; returns the adapter and the spectral energy kept per module path."""
    if subspace_rank < 1:
        raise AdapterConfigError(f"--subspace-rank must be >= 1, got {subspace_rank}")
    config, molora = read_molora(directory)
    modules: dict[str, ModuleWeights] = {}
    energies: dict[str, float] = {}
    specs: dict[str, ModuleSpec] = {}
    for path, module in molora.items():
        modules[path], energies[path] = molora_module_to_malora(module, subspace_rank)
        specs[path.rsplit(".", 1)[-1]] = modules[path].spec
    config = AdapterConfig(base_model=config.base_model, target_modules=sorted(specs), modules=specs,
                           dtype=config.dtype, description=f"converted from MoLoRA with d={subspace_rank}")
    return MaloraAdapter(config, modules, source=str(directory)), energies
