"""Trainable adapter layers wrapping a frozen `nn.Linear`: MALoRA, and the LoRA and MoLoRA baselines.

All three compute `y = W0 x + scale * delta(x)` with the routing of `kernels.reference.route`
(top-k, then softmax over the chosen, ties to the lower index); gradients reach the chosen experts and, through
the softmax, the router. Two ways to run the mixtures (`AdapterLinear.dispatch`):

- "sparse": tokens grouped by chosen expert, each expert's products run on its tokens only
  (grouped products, as FastMoE dispatches), the weighted results added back per token. MALoRA computes
  `[S; G] x` once for all tokens (one d_in-wide product) and dispatches only the d-wide `z`; MoLoRA dispatches
  `x` itself, so each expert pays its own d_in-wide product: the paper's baseline.
- "dense" (the default: faster on a CPU at N 4-8, `malora bench train`): every expert evaluated, the unchosen
  weighted 0 (MoLoRA's down-projection then one fused `[T, d_in] x [d_in, N r]` product). The reference the
  sparse form is tested against (values and gradients).

Each exports exactly to the MALoRA format (`ModuleWeights`): LoRA as N = 1, MoLoRA by the SVD conversion with
d = N r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.convert import MoloraModule, molora_module_to_malora
from ..adapters.format import ModuleSpec, ModuleWeights
from ..kernels.reference import route
from ..layers import MaloraLinear

METHODS = ("malora", "molora", "lora")
INIT_S = ("random", "svd")
DISPATCH = ("sparse", "dense")


@dataclass
class RouterRecord:
    """What the router did in the last forward, for the load-balancing loss."""

    probs: torch.Tensor  # [T, N] softmax over all N logits
    chosen: torch.Tensor  # [T, N] 1 where the expert is in the token's top-k


def _uniform(*shape: int, bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class AdapterLinear(nn.Module):
    """A frozen base linear plus a trainable delta; subclasses define `delta` and `export`."""

    def __init__(self, base: nn.Linear, spec: ModuleSpec) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.record_router = False
        self.last_router: RouterRecord | None = None
        self.dispatch = "dense"  # or "sparse"; the trainer sets it (TrainConfig.dispatch)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        return y + self.delta(flat).reshape(y.shape).to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export(self) -> ModuleWeights:
        raise NotImplementedError

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [T, k], weights [T, k]); records the router for the load-balancing loss when asked."""
        spec = self.spec
        chosen, weights = route(logits, spec.top_k, spec.router_norm, spec.router_temperature)
        if self.record_router:
            probs = torch.softmax(logits / spec.router_temperature, dim=-1)
            mask = torch.zeros_like(logits).scatter(-1, chosen, 1.0)
            self.last_router = RouterRecord(probs, mask)
        return chosen, weights

    def _routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Dense routing weights [T, N]: the chosen experts' weights, 0 elsewhere."""
        chosen, weights = self._route(logits)
        return torch.zeros_like(logits).scatter(-1, chosen, weights)

    def _dispatch(self, inputs: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, d_out: int,
                  expert) -> torch.Tensor:
        """scale * sum over each token's chosen experts t of w_t expert(t, its input rows), expert by expert on
        the tokens that chose it (grouped products); `inputs` [T, width] are gathered per expert."""
        num_tokens, k = chosen.shape
        if num_tokens == 0:
            return inputs.new_zeros(0, d_out)
        flat_expert = chosen.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        tokens = torch.arange(num_tokens, device=inputs.device).repeat_interleave(k)[order]
        routed = weights.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.spec.num_experts).tolist()
        outputs = []
        start = 0
        for t, count in enumerate(counts):
            if count:
                rows = tokens[start:start + count]
                outputs.append(expert(t, inputs[rows]) * routed[start:start + count, None])
                start += count
        out = inputs.new_zeros(num_tokens, d_out)
        return self.spec.scale * out.index_add(0, tokens, torch.cat(outputs))

    def _mix(self, expert_in: torch.Tensor, routing: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """scale * sum_t w_t B_t u_t as one matmul. expert_in [T, N, r], routing [T, N], B [N, d_out, r]."""
        n, d_out, r = B.shape
        weighted = (expert_in * routing.unsqueeze(-1)).reshape(-1, n * r)  # [T, N r]
        return self.spec.scale * weighted @ B.permute(1, 0, 2).reshape(d_out, n * r).T


class MaloraTrainLinear(AdapterLinear):
    """S [d, d_in] shared, G [N, d_in] router, P [N, r, d], B [N, d_out, r] (zero at start)."""

    def __init__(self, base: nn.Linear, spec: ModuleSpec, init_s: str = "random") -> None:
        super().__init__(base, spec)
        d_in, d_out, n = base.in_features, base.out_features, spec.num_experts
        if init_s == "svd":  # the top-d right singular vectors of W0: the base layer's most used input directions
            _, _, vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
            self.S = nn.Parameter(vh[: spec.d].clone().contiguous())
        elif init_s == "random":
            self.S = _uniform(spec.d, d_in, bound=1 / math.sqrt(d_in))
        else:
            raise ValueError(f"init_s must be one of {INIT_S}, got {init_s!r}")
        self.G = _uniform(n, d_in, bound=1 / math.sqrt(d_in))
        self.P = nn.Parameter(torch.randn(n, spec.r, spec.d) / math.sqrt(spec.d))  # A_t = P_t S like LoRA's A
        self.B = nn.Parameter(torch.zeros(n, d_out, spec.r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "dense":
            z = x @ self.S.T  # [T, d]
            routing = self._routing_weights(x @ self.G.T)  # [T, N]
            expert_in = torch.einsum("nrd,td->tnr", self.P, z)  # [T, N, r]
            return self._mix(expert_in, routing, self.B)
        # [S; G] x once, the only d_in-wide product; then only the d-wide z travels to the experts.
        z, logits = (x @ torch.cat([self.S, self.G]).T).split([self.spec.d, self.spec.num_experts], dim=-1)
        chosen, weights = self._route(logits)
        return self._dispatch(z, chosen, weights, self.out_features,
                              lambda t, zt: (zt @ self.P[t].T) @ self.B[t].T)

    def export(self) -> ModuleWeights:
        return ModuleWeights(self.spec, self.S.detach().clone(), self.G.detach().clone(),
                             self.P.detach().clone(), self.B.detach().clone())


class MoloraTrainLinear(AdapterLinear):
    """A [N, r, d_in] per expert, B [N, d_out, r] (zero at start), router [N, d_in]."""

    def __init__(self, base: nn.Linear, spec: ModuleSpec) -> None:
        super().__init__(base, spec)
        d_in, d_out, n = base.in_features, base.out_features, spec.num_experts
        self.A = _uniform(n, spec.r, d_in, bound=1 / math.sqrt(d_in))
        self.G = _uniform(n, d_in, bound=1 / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(n, d_out, spec.r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        n, r, d_in = self.A.shape
        if self.dispatch == "dense":  # one fused product over all experts (ours)
            expert_in = (x @ self.A.reshape(n * r, d_in).T).reshape(-1, n, r)  # [T, N, r]
            return self._mix(expert_in, self._routing_weights(x @ self.G.T), self.B)
        # Per-expert dispatch (the paper's baseline): each expert's own d_in-wide product on its tokens.
        chosen, weights = self._route(x @ self.G.T)
        return self._dispatch(x, chosen, weights, self.out_features,
                              lambda t, xt: (xt @ self.A[t].T) @ self.B[t].T)

    def export(self) -> ModuleWeights:
        """Exact SVD conversion with d = N r (S = V^T of the stacked A, P_t = A_t V)."""
        module = MoloraModule(self.spec, self.A.detach().float(), self.B.detach().float(), self.G.detach().float())
        weights, _ = molora_module_to_malora(module, self.spec.num_experts * self.spec.r)
        return weights


class LoraTrainLinear(AdapterLinear):
    """Plain LoRA of rank R = spec.r: A [R, d_in], B [d_out, R] (zero at start); R (d_in + d_out) parameters."""

    def __init__(self, base: nn.Linear, spec: ModuleSpec) -> None:
        super().__init__(base, spec)
        self.A = _uniform(spec.r, base.in_features, bound=1 / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, spec.r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.scale * (x @ self.A.T) @ self.B.T

    def export(self) -> ModuleWeights:
        rank = self.spec.r
        return ModuleWeights(self.spec, self.A.detach().clone(), torch.zeros(1, self.in_features),
                             torch.eye(rank).unsqueeze(0), self.B.detach().clone().unsqueeze(0))


def make_spec(method: str, num_experts: int, rank: int, subspace_rank: int, top_k: int,
              alpha: float | None) -> ModuleSpec:
    """The per-module spec a method trains with (LoRA: N = k = 1, d = r)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lora":
        num_experts, top_k, subspace_rank = 1, 1, rank
    elif method == "molora":
        subspace_rank = rank
    spec = ModuleSpec(d=subspace_rank, r=rank, num_experts=num_experts, top_k=top_k,
                      alpha=float(alpha if alpha is not None else 2 * rank))
    spec.validate(f"--method {method}")
    return spec


def attach(model: nn.Module, method: str, targets: list[str], spec: ModuleSpec,
           init_s: str = "random") -> dict[str, AdapterLinear]:
    """Replace every linear whose leaf name is in `targets` by a trainable layer; returns them by path.

    A linear already wrapped for serving (`MaloraLinear`, as `set_adapter` leaves it) is unwrapped first.
    """
    found = [(p, m.base if isinstance(m, MaloraLinear) else m) for p, m in model.named_modules()
             if isinstance(m, nn.Linear | MaloraLinear) and p.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no linear layer of the model is named one of {targets}")
    layers: dict[str, AdapterLinear] = {}
    for path, base in found:
        base.requires_grad_(False)
        if method == "malora":
            layer: AdapterLinear = MaloraTrainLinear(base, spec, init_s)
        elif method == "molora":
            layer = MoloraTrainLinear(base, spec)
        else:
            layer = LoraTrainLinear(base, spec)
        layer.to(device=base.weight.device)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, layer)
        layers[path] = layer
    return layers


def detach(model: nn.Module, layers: dict[str, AdapterLinear]) -> None:
    """Put the base linears back (the inverse of `attach`)."""
    for path, layer in layers.items():
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, layer.base)


def trainable_parameters(layers: dict[str, AdapterLinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for name, p in layer.named_parameters() if not name.startswith("base.")]


def load_balance_loss(layers: dict[str, AdapterLinear], token_mask: torch.Tensor) -> torch.Tensor | None:
    """Switch-style N * sum_t f_t p_t, averaged over routed layers (1 when perfectly balanced).

    f_t: share of the (unmasked) tokens' top-k choices that went to expert t; p_t: its mean router
    probability. token_mask [T] is 1 for real tokens. None when no layer recorded a router (N = 1).
    """
    mask = token_mask.reshape(-1, 1).float()
    count = mask.sum().clamp(min=1.0)
    losses = []
    for layer in layers.values():
        record = layer.last_router
        if record is None:
            continue
        n = record.probs.shape[-1]
        f = (record.chosen * mask).sum(0) / (count * layer.spec.top_k)
        p = (record.probs * mask).sum(0) / count
        losses.append(n * (f * p).sum())
        layer.last_router = None
    return torch.stack(losses).mean() if losses else None
