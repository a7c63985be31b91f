"""Random MALoRA adapters with non-zero weights, for tests and benchmarks."""

from __future__ import annotations

import math

import torch

from .format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights


def random_adapter(
    module_shapes: dict[str, tuple[int, int]],
    base_model: str,
    targets: list[str],
    num_experts: int,
    rank: int,
    subspace_rank: int,
    top_k: int,
    seed: int,
    alpha: float | None = None,
    dtype: str = "float16",
    output_scale: float = 0.5,
) -> MaloraAdapter:
    """An adapter over every base linear whose leaf name is in `targets`.

    Weights are Gaussian, scaled so the delta has roughly `output_scale` times the RMS of a
    unit-variance input's base output: visible in the logits without wrecking the model.
    """
    spec = ModuleSpec(d=subspace_rank, r=rank, num_experts=num_experts, top_k=top_k,
                      alpha=float(alpha if alpha is not None else rank))
    spec.validate("adapter init")
    config = AdapterConfig(base_model=base_model, target_modules=list(targets),
                           modules={t: spec for t in targets}, dtype=dtype,
                           description=f"random adapter, seed {seed}")
    generator = torch.Generator().manual_seed(seed)

    def gaussian(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    modules: dict[str, ModuleWeights] = {}
    for path in sorted(module_shapes):
        if path.rsplit(".", 1)[-1] not in targets:
            continue
        d_in, d_out = module_shapes[path]
        modules[path] = ModuleWeights(
            spec,
            S=gaussian(spec.d, d_in, std=1 / math.sqrt(d_in)),
            G=gaussian(spec.num_experts, d_in, std=1.0),
            P=gaussian(spec.num_experts, spec.r, spec.d, std=1 / math.sqrt(spec.d)),
            B=gaussian(spec.num_experts, d_out, spec.r, std=output_scale / math.sqrt(spec.r) / spec.scale),
        )
    if not modules:
        raise ValueError(f"no linear layer of the base model is named one of {targets}")
    return MaloraAdapter(config, modules)
