"""The reference layer against a direct float64 evaluation of MALoRA's formula."""

from __future__ import annotations

import math

import pytest
import torch

from malora_runtime.adapters.format import AdapterConfig, MaloraAdapter, ModuleSpec, ModuleWeights
from malora_runtime.kernels.reference import malora_delta_dense, malora_delta_reference, route, stable_topk
from malora_runtime.patching import linear_shapes, set_adapter


def direct_formula(x, S, G, P, B, scale, k, bias=None, norm="topk_softmax", temperature=1.0):
    """docs/malora.md written out with Python numbers, one token at a time (no torch routing helpers)."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for i in range(x.shape[0]):
        logits = [float(G[t] @ x[i]) + (float(bias[t]) if bias is not None else 0.0) for t in range(G.shape[0])]
        logits = [value / temperature for value in logits]
        chosen = sorted(range(len(logits)), key=lambda t: (-logits[t], t))[:k]
        if norm == "topk_softmax":
            m = max(logits[t] for t in chosen)
            exps = {t: math.exp(logits[t] - m) for t in chosen}
            weights = {t: exps[t] / sum(exps.values()) for t in chosen}
        else:
            m = max(logits)
            total = sum(math.exp(v - m) for v in logits)
            weights = {t: math.exp(logits[t] - m) / total for t in chosen}
        z = S @ x[i]
        for t in chosen:
            out[i] += weights[t] * (B[t] @ (P[t] @ z))
    return scale * out


def random_weights(n, r, d, d_in, d_out, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    f64 = dict(dtype=torch.float64, generator=g)
    return (torch.randn(d, d_in, **f64), torch.randn(n, d_in, **f64), torch.randn(n, r, d, **f64),
            torch.randn(n, d_out, r, **f64))


@pytest.mark.parametrize("n,k", [(1, 1), (4, 1), (4, 2), (4, 4), (7, 3)])
@pytest.mark.parametrize("norm", ["topk_softmax", "softmax_topk"])
def test_reference_paths_equal_the_formula(n: int, k: int, norm: str) -> None:
    S, G, P, B = random_weights(n, r=3, d=5, d_in=11, d_out=13)
    x = torch.randn(9, 11, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    expected = direct_formula(x, S, G, P, B, 0.7, k, bias, norm, 1.5)
    for fn in (malora_delta_reference, malora_delta_dense):
        got = fn(x, S, G, P, B, 0.7, k, bias, norm, 1.5)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_router_ties_choose_the_lower_index() -> None:
    S, G, P, B = random_weights(4, r=2, d=3, d_in=6, d_out=5)
    G[2] = G[1]  # experts 1 and 2 always tie
    G[3] = G[1]
    x = torch.randn(8, 6, dtype=torch.float64)
    logits = x @ G.T
    chosen = stable_topk(logits, 2)
    for i in range(8):
        tied_best = (logits[i, 1] > logits[i, 0]).item()
        assert chosen[i].tolist() == ([1, 2] if tied_best else [0, 1])
    expected = direct_formula(x, S, G, P, B, 1.0, 2)
    torch.testing.assert_close(malora_delta_dense(x, S, G, P, B, 1.0, 2), expected, rtol=1e-12, atol=1e-12)


def test_dense_mixture_k_equals_n_uses_every_expert() -> None:
    _, weights = route(torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64), 3)
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3, dtype=torch.float64))


def test_n1_is_plain_lora() -> None:
    d_in, d_out, rank = 10, 7, 4
    A = torch.randn(rank, d_in, dtype=torch.float64)
    Bm = torch.randn(d_out, rank, dtype=torch.float64)
    x = torch.randn(5, d_in, dtype=torch.float64)
    got = malora_delta_dense(x, A, torch.zeros(1, d_in, dtype=torch.float64),
                             torch.eye(rank, dtype=torch.float64)[None], Bm[None], 2.0, 1)
    torch.testing.assert_close(got, 2.0 * (x @ A.T @ Bm.T), rtol=1e-12, atol=1e-12)


def test_wrapped_model_in_float64_adds_exactly_the_delta(tiny_llama) -> None:
    model = tiny_llama.double()
    shapes = linear_shapes(model)
    path = "model.layers.1.mlp.down_proj"
    d_in, d_out = shapes[path]
    spec = ModuleSpec(d=4, r=2, num_experts=3, top_k=2, alpha=4.0)
    S, G, P, B = random_weights(3, 2, 4, d_in, d_out)
    adapter = MaloraAdapter(AdapterConfig("tiny", ["down_proj"], {"down_proj": spec}),
                            {path: ModuleWeights(spec, S, G, P, B)})
    captured = {}
    base_layer = model.get_submodule(path)
    hook = base_layer.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    ids = torch.tensor([[5, 17, 3, 250, 9]])
    model(ids)
    hook.remove()
    set_adapter(model, adapter)
    wrapped = model.get_submodule(path)
    y = wrapped(captured["x"])
    expected = captured["y"][0] + direct_formula(captured["x"][0], S, G, P, B, spec.scale, 2)
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-10)
    set_adapter(model, None)
    torch.testing.assert_close(model.get_submodule(path)(captured["x"]), captured["y"])
