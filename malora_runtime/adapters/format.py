"""The MALoRA adapter format: a directory with `malora_config.json` and `malora_model.safetensors`.

`docs/adapter-format.md` is the user-facing description; this module is its executable form.
Tensor names are `<module path>.<tensor>` with the module path as in the base model's
`named_modules()` (for example `model.layers.0.self_attn.q_proj.S`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterConfigError, UnsupportedVersionError

FORMAT_NAME = "malora"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
CONFIG_FILE = "malora_config.json"
WEIGHTS_FILE = "malora_model.safetensors"

ROUTER_NORMS = ("topk_softmax", "softmax_topk")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Tensors every adapted module has; `router_bias` is present only when the config says so.
MODULE_TENSORS = ("S", "G", "P", "B")


@dataclass(frozen=True)
class ModuleSpec:
    """Hyper-parameters of one target module kind (for example every layer's `q_proj`)."""

    d: int
    """Rank of the shared subspace `S` (d x d_in)."""
    r: int
    """Rank of each expert (P_t: r x d, B_t: d_out x r)."""
    num_experts: int
    """N: experts per layer."""
    top_k: int
    """Experts used per token; top_k == num_experts is a dense mixture."""
    alpha: float
    """Scaling numerator: the delta is multiplied by alpha / r."""
    router_norm: str = "topk_softmax"
    """`topk_softmax`: softmax over the chosen k logits. `softmax_topk`: softmax over all N,
    the chosen k probabilities used as they are (not renormalised)."""
    router_temperature: float = 1.0
    """Router logits are divided by this before normalisation."""
    router_bias: bool = False
    """Whether a `router_bias` tensor (N) is stored and added to the router logits."""

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self, where: str) -> None:
        def fail(message: str) -> None:
            raise AdapterConfigError(f"{where}: {message}")

        for name in ("d", "r", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"'{name}' must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            fail(f"top_k ({self.top_k}) > num_experts N ({self.num_experts})")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            fail(f"'alpha' must be a number, got {self.alpha!r}")
        if self.router_norm not in ROUTER_NORMS:
            fail(f"'router_norm' must be one of {ROUTER_NORMS}, got {self.router_norm!r}")
        if not isinstance(self.router_temperature, (int, float)) or not self.router_temperature > 0:
            fail(f"'router_temperature' must be > 0, got {self.router_temperature!r}")
        if not isinstance(self.router_bias, bool):
            fail(f"'router_bias' must be true or false, got {self.router_bias!r}")


@dataclass
class AdapterConfig:
    """Contents of `malora_config.json`."""

    base_model: str
    target_modules: list[str]
    modules: dict[str, ModuleSpec]
    dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def spec_for(self, module_path: str) -> ModuleSpec | None:
        """The spec of the target that `module_path` (a full path) ends with, if any."""
        leaf = module_path.rsplit(".", 1)[-1]
        return self.modules.get(leaf)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "base_model": self.base_model,
            "dtype": self.dtype,
            "target_modules": list(self.target_modules),
            "modules": {name: asdict(spec) for name, spec in self.modules.items()},
            "description": self.description,
            "metadata": self.metadata,
        }

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Any, source: str) -> AdapterConfig:
        """Parse and validate; every error names `source` (the config file)."""
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{source}: the config must be a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise AdapterConfigError(f"{source}: 'format' must be {FORMAT_NAME!r}, got {data.get('format')!r}")
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"{source}: format_version {version!r} is not supported (this runtime reads {SUPPORTED_VERSIONS})"
            )
        known = {"format", "format_version", "base_model", "dtype", "target_modules", "modules",
                 "description", "metadata"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"{source}: unknown config keys {unknown}")
        for key in ("base_model", "target_modules", "modules"):
            if key not in data:
                raise AdapterConfigError(f"{source}: missing required key {key!r}")
        dtype = data.get("dtype", "float16")
        if dtype not in DTYPES:
            raise AdapterConfigError(f"{source}: 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
        targets = data["target_modules"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise AdapterConfigError(f"{source}: 'target_modules' must be a non-empty list of names")
        raw_modules = data["modules"]
        if not isinstance(raw_modules, dict) or set(raw_modules) != set(targets):
            found = sorted(raw_modules) if isinstance(raw_modules, dict) else raw_modules
            raise AdapterConfigError(
                f"{source}: 'modules' needs one entry per target module: expected {sorted(targets)}, found {found!r}"
            )
        modules: dict[str, ModuleSpec] = {}
        for name, raw in raw_modules.items():
            if not isinstance(raw, dict):
                raise AdapterConfigError(f"{source}: modules.{name} must be an object")
            try:
                spec = ModuleSpec(**raw)
            except TypeError as exc:
                raise AdapterConfigError(f"{source}: modules.{name}: {exc}") from None
            spec.validate(f"{source}: modules.{name}")
            modules[name] = spec
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise AdapterConfigError(f"{source}: 'metadata' must be an object")
        return cls(
            base_model=str(data["base_model"]),
            target_modules=list(targets),
            modules=modules,
            dtype=dtype,
            format_version=version,
            description=str(data.get("description", "")),
            metadata=metadata,
        )

    @classmethod
    def load(cls, directory: Path) -> AdapterConfig:
        path = directory / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterConfigError(f"{path}: invalid JSON: {exc}") from None
        except UnicodeDecodeError:
            raise AdapterConfigError(f"{path}: not UTF-8 text") from None
        return cls.from_json(data, str(path))


@dataclass
class ModuleWeights:
    """One adapted linear layer's tensors.

    Shapes: S [d, d_in], G [N, d_in], P [N, r, d], B [N, d_out, r], router_bias [N] or None.
    """

    spec: ModuleSpec
    S: torch.Tensor
    G: torch.Tensor
    P: torch.Tensor
    B: torch.Tensor
    router_bias: torch.Tensor | None = None
    packed: Any = field(default=None, compare=False, repr=False)
    """The kernels' packed buffer (`kernels.packed.PackedModule`) these tensors are views of, when packed."""

    @property
    def d_in(self) -> int:
        return self.S.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"S": self.S, "G": self.G, "P": self.P, "B": self.B}
        if self.router_bias is not None:
            named["router_bias"] = self.router_bias
        return named

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModuleWeights:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        if all(move(t) is t for t in self.tensors().values()):
            return self  # nothing to convert: keep the packed buffer these may be views of
        return ModuleWeights(self.spec, move(self.S), move(self.G), move(self.P), move(self.B),
                             move(self.router_bias))


def expected_shapes(spec: ModuleSpec, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """The shape every tensor of a module must have, given its spec and the base linear's sizes."""
    shapes = {
        "S": (spec.d, d_in),
        "G": (spec.num_experts, d_in),
        "P": (spec.num_experts, spec.r, spec.d),
        "B": (spec.num_experts, d_out, spec.r),
    }
    if spec.router_bias:
        shapes["router_bias"] = (spec.num_experts,)
    return shapes


@dataclass(eq=False)
class MaloraAdapter:
    """A parsed, validated adapter: its config and per module path its weights."""

    config: AdapterConfig
    modules: dict[str, ModuleWeights]
    source: str = ""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaloraAdapter:
        return MaloraAdapter(self.config, {p: w.to(device, dtype) for p, w in self.modules.items()}, self.source)

    def num_bytes(self) -> int:
        """Bytes of memory its weights hold: the packed buffers when packed, else the tensors."""
        total = 0
        for w in self.modules.values():
            if w.packed is not None:
                total += w.packed.num_bytes
            else:
                total += sum(t.numel() * t.element_size() for t in w.tensors().values())
        return total
