"""The one facade the engine calls for the MALoRA delta: picks the native CPU kernel, the torch CPU
path, Triton or the reference.

`MALORA_KERNEL_BACKEND` overrides the choice: `auto` (default: Triton for CUDA tensors; on the CPU the
native kernel, or the torch path where it cannot be built), `native` (an error where it cannot be
built), `cpu` (the torch path), `triton` (CPU tensors only under `TRITON_INTERPRET=1`), or `reference`
(slow and obviously correct: one call of `reference.malora_delta_reference` per adapter segment).
"""

from __future__ import annotations

import os

import torch

from .cpu import add_malora_delta_cpu
from .native import add_malora_delta_native, native_kernel, require_native_kernel
from .reference import malora_delta_reference, route
from .routing_log import RoutingLog
from .slot_bank import SlotBank
from .token_slots import TokenSlots

BACKEND_ENV = "MALORA_KERNEL_BACKEND"
BACKENDS = ("auto", "native", "cpu", "triton", "reference")


def choose_backend(x: torch.Tensor) -> str:
    """The backend for `x` after the environment override; `auto` resolves by device. An explicit
    `native` is refused for tensors off the CPU, or where the kernel cannot be built (NativeKernelError
    says why), so the engine fails at start-up rather than at its first adapter request."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        if x.is_cuda:
            return "triton"
        return "native" if x.is_cpu and native_kernel() is not None else "cpu"
    if backend == "native":
        if not x.is_cpu:
            raise ValueError(f"{BACKEND_ENV}=native runs on the CPU; the model is on {x.device}")
        require_native_kernel()
    return backend


def add_malora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    expert_counts: torch.Tensor | RoutingLog | None = None,
    backend: str | None = None,
) -> None:
    """Add every token's MALoRA delta, from its own adapter slot, into the base layer's output.

    Semantics:
      for each token i with s = slots[i] != -1 and bank.infos[s] active:
        z      = S[s] x[i]                                   # [d]
        logits = G[s] x[i] + router_bias[s]                  # [N]
        T, w   = route(logits, top_k[s], norm[s], temperature[s])  (ties to the lower index)
        y[i]  += scale[s] * sum_{t in T} w_t B[s, t] (P[s, t] z)   # [d_out]
        expert_counts[s, t] += 1 for t in T                  # when expert_counts is given
    y [T, d_out] (in place), x [T, d_in], expert_counts [num_slots, n_max] int64, or a `RoutingLog`
    (the torch CPU path only: choices recorded now, counted when drained), or None.
    Tokens without an adapter are untouched; a batch with no adapter token returns at once.
    `backend`: one already chosen by `choose_backend` (the engine resolves it once per step).
    """
    if not token_slots.any_adapter:
        return
    backend = backend or choose_backend(x)
    if backend == "cpu":
        add_malora_delta_cpu(y, x, bank, token_slots, expert_counts)
        return
    if isinstance(expert_counts, RoutingLog):
        raise TypeError(f"the {backend} backend counts into a tensor, not a RoutingLog")
    if backend == "native":
        add_malora_delta_native(y, x, bank, token_slots, expert_counts)
    elif backend == "triton":
        from .triton_malora import add_malora_delta_triton

        add_malora_delta_triton(y, x, bank, token_slots, expert_counts)
    else:
        add_malora_delta_reference(y, x, bank, token_slots, expert_counts)


@torch.no_grad()
def add_malora_delta_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    expert_counts: torch.Tensor | None = None,
) -> None:
    """Same semantics as `add_malora_delta`: one float64 reference call per segment, on the real sizes."""
    for slot, start, end in token_slots.segments:
        info = bank.infos[slot]
        if info is None:
            continue
        n = info.num_experts
        rows = token_slots.order[start:end]
        xs = x[rows].double()
        module = bank.module(slot)
        sgt, dt = module.sgt.to(xs.dtype), xs.dtype
        S, G = sgt[:, :info.d].T, sgt[:, info.d:].T
        P = module.pt.to(dt).view(info.d, n, info.r).permute(1, 2, 0)
        B = module.bt.to(dt).view(n, info.r, bank.d_out).transpose(1, 2)
        bias = module.bias.to(dt)
        norm = "softmax_topk" if info.softmax_first else "topk_softmax"
        delta = malora_delta_reference(xs, S, G, P, B, info.scale, info.top_k, bias, norm, info.router_temperature)
        y.index_add_(0, rows, delta.to(y.dtype))
        if expert_counts is not None:
            chosen, _ = route(xs @ G.T + bias, info.top_k, norm, info.router_temperature)
            expert_counts[slot, :n] += torch.bincount(chosen.flatten(), minlength=n).to(expert_counts.dtype)
