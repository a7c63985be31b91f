"""Parameter and per-token multiply-add counts, by the formulas of `docs/malora.md`."""

from __future__ import annotations

from dataclasses import dataclass

from .format import MaloraAdapter, ModuleSpec


def malora_params(spec: ModuleSpec, d_in: int, d_out: int) -> int:
    """d d_in + N d_in + N r (d + d_out), plus N for a router bias."""
    n = spec.num_experts
    bias = n if spec.router_bias else 0
    return spec.d * d_in + n * d_in + n * spec.r * (spec.d + d_out) + bias


def malora_macs_per_token(spec: ModuleSpec, d_in: int, d_out: int) -> int:
    """d d_in (shared S x) + N d_in (router) + k r (d + d_out) (chosen experts)."""
    return spec.d * d_in + spec.num_experts * d_in + spec.top_k * spec.r * (spec.d + d_out)


def molora_params(num_experts: int, r: int, d_in: int, d_out: int) -> int:
    return num_experts * r * (d_in + d_out) + num_experts * d_in


def molora_macs_per_token(num_experts: int, top_k: int, r: int, d_in: int, d_out: int) -> int:
    return top_k * r * (d_in + d_out) + num_experts * d_in


def lora_params(rank: int, d_in: int, d_out: int) -> int:
    return rank * (d_in + d_out)


@dataclass(frozen=True)
class AdapterCost:
    parameters: int
    macs_per_token: int
    num_modules: int


def adapter_cost(adapter: MaloraAdapter) -> AdapterCost:
    """Totals over every adapted module (a token passes through each once per forward)."""
    params = macs = 0
    for weights in adapter.modules.values():
        params += malora_params(weights.spec, weights.d_in, weights.d_out)
        macs += malora_macs_per_token(weights.spec, weights.d_in, weights.d_out)
    return AdapterCost(params, macs, len(adapter.modules))
