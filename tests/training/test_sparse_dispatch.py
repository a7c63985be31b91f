"""Sparse top-k dispatch in the training layers against the dense form (every expert evaluated, unchosen weighted
0), in float64: the same outputs and the same gradients for the input, every parameter and, through the routing
weights and the load-balancing loss, the router. Fresh random weights each run; ties, k = N, N = 1, both norms."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import nn

from malora_runtime.adapters.format import ModuleSpec
from malora_runtime.training.layers import MaloraTrainLinear, MoloraTrainLinear, load_balance_loss

CASES = [
    dict(d=6, r=3, num_experts=4, top_k=2),
    dict(d=5, r=2, num_experts=6, top_k=6, router_norm="softmax_topk", router_temperature=0.7),  # k = N
    dict(d=4, r=4, num_experts=1, top_k=1),  # N = 1
    dict(d=9, r=2, num_experts=8, top_k=3, router_temperature=1.5),  # d > d_in below
]


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("MALORA_TEST_SEED", random.randrange(2**31)))


def layer_pair(kind: str, spec: ModuleSpec, d_in: int, d_out: int, seed: int, ties: bool):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False).double().requires_grad_(False)
    cls = MaloraTrainLinear if kind == "malora" else MoloraTrainLinear
    dense = cls(base, spec).double()
    with torch.no_grad():
        for p in dense.parameters():
            if p.requires_grad:
                p.normal_()  # B is zero at start: make every product count
        if ties and spec.num_experts > 2:
            dense.G[1] = dense.G[0]  # experts 0 and 1 always tie: the lower index must win in both forms
    sparse = cls(base, spec).double()
    sparse.load_state_dict(dense.state_dict())
    dense.dispatch, sparse.dispatch = "dense", "sparse"
    return dense, sparse


def run(layer, x: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    layer.record_router = True
    y = layer(x)
    loss = (y * probe).sum()
    balance = load_balance_loss({"l": layer}, torch.ones(x.shape[0]))
    if balance is not None:
        loss = loss + balance
    loss.backward()
    grads = {"x": x.grad} | {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), grads


@pytest.mark.parametrize("kind", ["malora", "molora"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_dispatch_equals_the_dense_form(kind, case, ties, seed):
    spec = ModuleSpec(alpha=3.0, **CASES[case])
    d_in, d_out, tokens = 7, 11, 37
    dense, sparse = layer_pair(kind, spec, d_in, d_out, seed, ties)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    probe = torch.randn(tokens, d_out, generator=gen, dtype=torch.float64)
    y_dense, g_dense = run(dense, x, probe)
    y_sparse, g_sparse = run(sparse, x, probe)
    where = f"{kind} {CASES[case]} ties={ties} seed={seed}"
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-10, atol=1e-10, msg=where)
    assert g_sparse.keys() == g_dense.keys()
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-9, atol=1e-10, msg=f"{name}: {where}")
    assert g_dense["G"].abs().sum() > 0 or spec.num_experts == 1  # the router does learn


def test_an_empty_batch_gives_an_empty_delta():
    spec = ModuleSpec(d=4, r=2, num_experts=3, top_k=2, alpha=1.0)
    layer = MaloraTrainLinear(nn.Linear(5, 6), spec)
    assert layer(torch.zeros(0, 5)).shape == (0, 6)
