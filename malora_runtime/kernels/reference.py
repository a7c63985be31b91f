"""Reference MALoRA maths: plain torch, written for reading, run in float64 by the tests.

This is the oracle every fast path is compared against. It follows `docs/malora.md` line by line.
"""

from __future__ import annotations

import torch

ROUTER_TOPK_SOFTMAX = "topk_softmax"
ROUTER_SOFTMAX_TOPK = "softmax_topk"


def stable_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties broken by the lower index.

    `torch.topk` gives no order among equal values; a stable descending sort does.
    logits: [T, N] -> [T, k] int64
    """
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]


def route(
    logits: torch.Tensor,
    top_k: int,
    router_norm: str = ROUTER_TOPK_SOFTMAX,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts and their weights from router logits.

    Semantics:
      T = top-k indices of logits (ties to the lower index)
      topk_softmax: w = softmax(logits[T] / temperature)
      softmax_topk: w = softmax(logits / temperature)[T]   (not renormalised)
    logits: [T, N] -> (indices [T, k] int64, weights [T, k] same dtype as logits)
    """
    scaled = logits / temperature
    chosen = stable_topk(scaled, top_k)
    if router_norm == ROUTER_TOPK_SOFTMAX:
        weights = torch.softmax(scaled.gather(-1, chosen), dim=-1)
    elif router_norm == ROUTER_SOFTMAX_TOPK:
        weights = torch.softmax(scaled, dim=-1).gather(-1, chosen)
    else:
        raise ValueError(f"unknown router_norm {router_norm!r}")
    return chosen, weights


def project_and_route(
    x: torch.Tensor,
    S: torch.Tensor,
    G: torch.Tensor,
    top_k: int,
    router_bias: torch.Tensor | None = None,
    router_norm: str = ROUTER_TOPK_SOFTMAX,
    router_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = S x [T, d], and the chosen experts [T, k] with their weights [T, k] from G x (+ bias)."""
    logits = x @ G.T
    if router_bias is not None:
        logits = logits + router_bias
    chosen, weights = route(logits, top_k, router_norm, router_temperature)
    return x @ S.T, chosen, weights


def malora_delta_reference(
    x: torch.Tensor,
    S: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    top_k: int,
    router_bias: torch.Tensor | None = None,
    router_norm: str = ROUTER_TOPK_SOFTMAX,
    router_temperature: float = 1.0,
) -> torch.Tensor:
    """The MALoRA delta for tokens that all use one adapter.

    Semantics:
      z      = S x                                   # [d]
      logits = G x (+ router_bias)                   # [N]
      T, w   = route(logits, top_k, ...)
      delta  = scale * sum_{t in T} w_t * B_t (P_t z)  # [d_out]
    Shapes: x [T, d_in], S [d, d_in], G [N, d_in], P [N, r, d], B [N, d_out, r] -> [T, d_out].
    Computed in the dtype of the inputs, one token at a time, so it is obviously the formula.
    """
    z, chosen, weights = project_and_route(x, S, G, top_k, router_bias, router_norm, router_temperature)
    out = x.new_zeros(x.shape[0], B.shape[1])
    for i in range(x.shape[0]):
        for j in range(chosen.shape[1]):  # the j-th chosen expert
            t = int(chosen[i, j])
            out[i] += weights[i, j] * (B[t] @ (P[t] @ z[i]))
    return scale * out


def malora_delta_dense(
    x: torch.Tensor,
    S: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    top_k: int,
    router_bias: torch.Tensor | None = None,
    router_norm: str = ROUTER_TOPK_SOFTMAX,
    router_temperature: float = 1.0,
) -> torch.Tensor:
    """Same maths as `malora_delta_reference`, vectorised over tokens by evaluating every expert.

    Semantics:
      W[i, t] = w_t if t was chosen for token i else 0          # [T, N]
      delta   = scale * sum_t W[:, t] * (B_t (P_t (S x)))        # [T, d_out]
    Readable and exact (unchosen experts get weight 0); used by the single-adapter reference layer.
    """
    z, chosen, weights = project_and_route(x, S, G, top_k, router_bias, router_norm, router_temperature)
    dense_weights = torch.zeros(x.shape[0], G.shape[0], dtype=weights.dtype, device=x.device)
    dense_weights = dense_weights.scatter(-1, chosen, weights)  # [T, N]
    expert_in = torch.einsum("nrd,td->tnr", P, z)  # [T, N, r]
    expert_out = torch.einsum("nor,tnr->tno", B, expert_in)  # [T, N, d_out]
    return scale * torch.einsum("tn,tno->to", dense_weights, expert_out)
