"""Conversions into MALoRA: PEFT LoRA (exact, N = 1) and mixtures of LoRA experts (by SVD).

MoLoRA input layout (a directory, documented in docs/adapter-format.md):
  molora_config.json   {"format": "molora", "base_model", "target_modules", "dtype",
                        "modules": {leaf: {"r", "num_experts", "top_k", "alpha",
                                           optional "router_norm", "router_temperature", "router_bias"}}}
  molora_model.safetensors  per module path: `A` [N, r, d_in], `B` [N, d_out, r], `router` [N, d_in],
                            and `router_bias` [N] when the config says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterConfigError, AdapterNotFoundError, MissingTensorError, ShapeMismatchError
from .format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights
from .io import _read_tensors, refuse_pickles

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MOLORA_CONFIG = "molora_config.json"
MOLORA_WEIGHTS = "molora_model.safetensors"


def is_peft_dir(directory: str | Path) -> bool:
    return (Path(directory) / PEFT_CONFIG).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path}: must be a JSON object")
    return data


def peft_lora_to_malora(directory: str | Path, dtype: str = "float32") -> MaloraAdapter:
    """Convert a PEFT LoRA directory exactly: S = A, P = I, B = B, N = k = 1, no router.

    rsLoRA (scale alpha / sqrt(r)) is folded into alpha. DoRA and LoRA biases are refused.
    """
    root = Path(directory)
    config_path = root / PEFT_CONFIG
    if not config_path.is_file():
        raise AdapterNotFoundError(f"{config_path}: not found (is this a PEFT LoRA directory?)")
    refuse_pickles(root)
    cfg = _read_json(config_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterConfigError(f"{config_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise AdapterConfigError(f"{config_path}: {flag} adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterConfigError(f"{config_path}: LoRA bias {cfg.get('bias')!r} is not supported")
    weights_path = root / PEFT_WEIGHTS
    if not weights_path.is_file():
        raise AdapterNotFoundError(f"{weights_path}: weights file not found")
    tensors = _read_tensors(weights_path)

    default_rank = int(cfg.get("r", 8))
    default_alpha = float(cfg.get("lora_alpha", default_rank))
    rank_pattern: dict = cfg.get("rank_pattern") or {}
    alpha_pattern: dict = cfg.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                path = name.split(marker)[0]
                pairs.setdefault(path, {})[part] = tensor
                break
        else:
            raise AdapterConfigError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")

    modules: dict[str, ModuleWeights] = {}
    specs: dict[str, ModuleSpec] = {}
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
        leaf = path.rsplit(".", 1)[-1]
        expected_rank = next((int(v) for k, v in rank_pattern.items() if path.endswith(k)), default_rank)
        if rank != expected_rank:
            raise ShapeMismatchError(f"{weights_path}: {path}: rank {rank}, config says {expected_rank}")
        alpha = next((float(v) for k, v in alpha_pattern.items() if path.endswith(k)), default_alpha)
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(rank)  # scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        spec = ModuleSpec(d=rank, r=rank, num_experts=1, top_k=1, alpha=alpha)
        if specs.setdefault(leaf, spec) != spec:
            raise AdapterConfigError(f"{config_path}: modules named {leaf!r} have different ranks or alphas; "
                                     "the MALoRA format keys them by name")
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


def read_molora(directory: str | Path) -> tuple[AdapterConfig, dict[str, MoloraModule]]:
    root = Path(directory)
    config_path = root / MOLORA_CONFIG
    if not config_path.is_file():
        raise AdapterNotFoundError(f"{config_path}: not found (is this a MoLoRA directory?)")
    refuse_pickles(root)
    raw = _read_json(config_path)
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
    tensors = _read_tensors(weights_path)
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
