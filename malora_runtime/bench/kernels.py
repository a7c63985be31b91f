"""`malora bench kernels`: the CPU MALoRA delta against a naive mixture-of-LoRA loop and the base linear.

Shapes are the default model's (d_in 576; d_out 192, 576, 1536) with 32 adapters of N = 8 experts,
top-k 2, r = 8, d = 32; tokens are spread evenly over the adapters (shuffled). Paths, per call:

  naive: per adapter, per expert, MoE-PEFT style: route the adapter's tokens, then for each expert
         gather the tokens routed there and apply its own full A_t (r x d_in, A_t = P_t S) and B_t
  cpu:   this project's CPU path as the engine runs it: the native kernel (`kernels.native`), or
         the torch path where the native kernel cannot be built
  cpu_torch: the torch CPU path (`kernels.cpu.add_malora_delta_cpu`), side by side
  base:  the base linear as the engine runs it: oneDNN on a packed weight (`models.packed_linear`)
         where torch has oneDNN, else torch's F.linear
  base_torch: the base linear through torch's F.linear (MKL here, 2.2-2.7x slower than `base`)

Several weight sets (and inputs) are rotated so that figures are not measured out of the cache. The
machine's matrix-product rate and copy bandwidth are measured in the same run, to put the delta's
achieved GFLOP/s and GB/s in proportion.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.format import ModuleSpec, ModuleWeights
from ..kernels.cpu import add_malora_delta_cpu
from ..kernels.native import add_malora_delta_native, native_kernel
from ..kernels.slot_bank import SlotBank
from ..kernels.token_slots import TokenSlots
from ..models.packed_linear import PackedLinear, onednn_linear_available

log = logging.getLogger(__name__)

D_IN = 576
SPEC = ModuleSpec(d=32, r=8, num_experts=8, top_k=2, alpha=16.0)
ROTATE_MIB = 96  # rotate at least this much weight data by default (L3 here is 32 MiB)
PATHS = ("naive", "cpu", "cpu_torch", "base", "base_torch")


def _positive(kind: type, value: str) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return number


def _positive_ints(value: str) -> list[int]:
    return [int(_positive(int, part)) for part in value.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=_positive_ints, default=[1, 32, 256, 2048],
                        help="comma-separated batch sizes T")
    parser.add_argument("--d-out", type=_positive_ints, default=[192, 576, 1536], help="comma-separated output widths")
    parser.add_argument("--adapters", type=lambda v: _positive(int, v), default=32)
    parser.add_argument("--min-time", type=lambda v: _positive(float, v), default=0.3,
                        help="seconds per measurement round")
    parser.add_argument("--rounds", type=lambda v: _positive(int, v), default=5,
                        help="rounds per figure; the best is kept")
    parser.add_argument("--rotate-mib", type=lambda v: _positive(int, v), default=ROTATE_MIB,
                        help="rotate weight sets (and inputs) of at least this many MiB, so figures are not "
                             "measured out of the cache")
    parser.add_argument("--json", metavar="FILE", help="write every figure (seconds per call) here")


def report(line: str = "") -> None:
    """The command's table goes to stdout."""
    sys.stdout.write(line + "\n")


@dataclass
class WeightSet:
    bank: SlotBank
    naive: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]  # per adapter (G, A_t, B_t)
    base: torch.Tensor  # [d_out, d_in]
    packed: nn.Linear | None  # the same weight as a PackedLinear, when oneDNN is available


def make_set(adapters: int, d_out: int, gen: torch.Generator) -> WeightSet:
    n = SPEC.num_experts
    bank = SlotBank.allocate(adapters, D_IN, d_out, SPEC.d, SPEC.r, n, torch.float32)
    naive = []
    for slot in range(adapters):
        w = ModuleWeights(SPEC, S=torch.randn(SPEC.d, D_IN, generator=gen) / D_IN**0.5,
                          G=torch.randn(n, D_IN, generator=gen) / D_IN**0.5,
                          P=torch.randn(n, SPEC.r, SPEC.d, generator=gen) / SPEC.d**0.5,
                          B=torch.randn(n, d_out, SPEC.r, generator=gen) / SPEC.r**0.5)
        bank.set_slot(slot, w)
        naive.append((w.G.clone(), [(w.P[t] @ w.S).contiguous() for t in range(n)],
                      [w.B[t].clone() for t in range(n)]))
    base = torch.randn(d_out, D_IN, generator=gen) / D_IN**0.5
    packed = None
    if onednn_linear_available():
        packed = nn.Linear(D_IN, d_out, bias=False).requires_grad_(False)
        packed.weight.copy_(base)
        packed = PackedLinear.convert(packed)
    return WeightSet(bank, naive, base, packed)


def naive_delta(y: torch.Tensor, x: torch.Tensor, ws: WeightSet, slots: torch.Tensor) -> None:
    """MoE-PEFT style mixture of LoRA: loops over adapters and experts, full A_t x per expert."""
    for adapter, (G, As, Bs) in enumerate(ws.naive):
        rows = torch.nonzero(slots == adapter).flatten()
        if rows.numel() == 0:
            continue
        xa = x[rows]
        weights, chosen = torch.topk(torch.softmax(xa @ G.T, dim=-1), SPEC.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        expert_mask = torch.nn.functional.one_hot(chosen, SPEC.num_experts).permute(2, 1, 0)
        for expert in range(SPEC.num_experts):
            position, token = torch.where(expert_mask[expert])
            if token.numel() == 0:
                continue
            h = (xa[token] @ As[expert].T) @ Bs[expert].T
            y.index_add_(0, rows[token], h * (weights[token, position, None] * SPEC.scale))


def per_call(fn: Callable[[int], None], min_time: float, rounds: int) -> float:
    """Best over rounds of the mean seconds per call (as `timeit`: the least disturbed round, which
    matters on a shared machine); fn(i) uses the i-th rotating input."""
    fn(0)
    start = time.perf_counter()
    fn(1)
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(3, math.ceil(min_time / once))
    figures = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            fn(r * calls + i)
        figures.append((time.perf_counter() - start) / calls)
    return min(figures)


def machine_rates(min_time: float) -> dict[str, float]:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = per_call(lambda i: torch.mm(a, b), min_time, 3)
    src = torch.randn(64 << 20 >> 2)  # 64 MiB, twice the L3
    dst = torch.empty_like(src)
    copy = per_call(lambda i: dst.copy_(src), min_time, 3)
    return {"matmul_gflops": 2 * 2048**3 / mm / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy / 1e9}


def delta_cost(tokens: int, d_out: int, adapters: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one delta call by the formula: MALoRA multiply-adds x 2, and the data that
    must move at least once: x, y read and written, every touched adapter's S, G, P, B (float32)."""
    d, r, n, k = SPEC.d, SPEC.r, SPEC.num_experts, SPEC.top_k
    flops = 2 * tokens * (D_IN * (d + n) + k * r * (d + d_out))
    touched = min(tokens, adapters)
    weights = touched * (d * D_IN + n * D_IN + n * r * d + n * d_out * r)
    return flops, 4 * (tokens * D_IN + 2 * tokens * d_out + weights)


def measure(args: argparse.Namespace, d_out: int, token_counts: list[int]) -> dict[str, dict[int, float]]:
    gen = torch.Generator().manual_seed(0)
    probe = make_set(args.adapters, d_out, gen)
    set_bytes = sum(t.numel() * 4 for t in (probe.bank.S, probe.bank.G, probe.bank.P, probe.bank.B))
    sets = [probe] + [make_set(args.adapters, d_out, gen) for _ in range(max(3, (args.rotate_mib << 20) // set_bytes))]
    figures: dict[str, dict[int, float]] = {path: {} for path in PATHS}
    kernel = native_kernel()
    cpu_delta = add_malora_delta_cpu if kernel is None else add_malora_delta_native
    shuffle = random.Random(0)
    for tokens in token_counts:
        slot_list = [i % args.adapters for i in range(tokens)]
        shuffle.shuffle(slot_list)
        token_slots = TokenSlots.from_list(slot_list)
        xs = [torch.randn(tokens, D_IN, generator=gen) for _ in range(len(sets))]
        y = torch.zeros(tokens, d_out)

        def pick(i: int) -> tuple[torch.Tensor, WeightSet]:
            return xs[i % len(sets)], sets[i % len(sets)]

        with torch.no_grad():
            figures["naive"][tokens] = per_call(
                lambda i: naive_delta(y, *pick(i), token_slots.slots), args.min_time, args.rounds)
            figures["cpu"][tokens] = per_call(
                lambda i: cpu_delta(y, pick(i)[0], pick(i)[1].bank, token_slots), args.min_time, args.rounds)
            figures["cpu_torch"][tokens] = per_call(
                lambda i: add_malora_delta_cpu(y, pick(i)[0], pick(i)[1].bank, token_slots),
                args.min_time, args.rounds)
            figures["base_torch"][tokens] = per_call(
                lambda i: torch.nn.functional.linear(pick(i)[0], pick(i)[1].base), args.min_time, args.rounds)
            if probe.packed is None:
                figures["base"][tokens] = figures["base_torch"][tokens]
            else:
                figures["base"][tokens] = per_call(lambda i: pick(i)[1].packed(pick(i)[0]), args.min_time, args.rounds)
    return figures


def run(args: argparse.Namespace) -> int:
    token_counts, widths = args.tokens, args.d_out
    rates = machine_rates(args.min_time)
    cpu_path = "torch (the native kernel is unavailable)" if native_kernel() is None else "native kernel"
    report(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads; matmul {rates['matmul_gflops']:.0f} GFLOP/s, "
           f"copy {rates['copy_gbps']:.1f} GB/s; cpu = {cpu_path}; base = "
           f"{'oneDNN packed' if onednn_linear_available() else 'F.linear'}")
    report(f"{'d_out':>5} {'T':>5} {'naive ms':>9} {'cpu ms':>8} {'torch ms':>8} {'base ms':>8} {'F.lin ms':>8} "
           f"{'naive/cpu':>9} {'torch/cpu':>9} {'cpu/base':>8} {'GFLOP/s':>8} {'GB/s':>6}")
    seconds: dict[str, dict[str, dict[str, float]]] = {path: {} for path in PATHS}
    for d_out in widths:
        figures = measure(args, d_out, token_counts)
        for path, by_tokens in figures.items():
            seconds[path][str(d_out)] = {str(t): s for t, s in by_tokens.items()}
        for t in token_counts:
            naive, cpu, torch_path, base, base_torch = (figures[p][t] for p in PATHS)
            flops, nbytes = delta_cost(t, d_out, args.adapters)
            report(f"{d_out:>5} {t:>5} {naive * 1e3:>9.3f} {cpu * 1e3:>8.3f} {torch_path * 1e3:>8.3f} "
                   f"{base * 1e3:>8.3f} {base_torch * 1e3:>8.3f} {naive / cpu:>9.1f} {torch_path / cpu:>9.2f} "
                   f"{cpu / base:>8.3f} {flops / cpu / 1e9:>8.1f} {nbytes / cpu / 1e9:>6.1f}")
    bars = check_bars(seconds)
    for line in bars:
        report(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seconds_per_call": seconds, "machine": rates, "adapters": args.adapters, "cpu_path": cpu_path,
                       "spec": {"d_in": D_IN, "d": SPEC.d, "r": SPEC.r, "N": SPEC.num_experts,
                                "top_k": SPEC.top_k}, "bars": bars}, handle, indent=2)
        log.info("wrote %s", args.json)
    return 0


def check_bars(seconds: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's bars, each as one line of text: naive/cpu at T=32 and 256, cpu/base at T=2048 against
    the base linear the engine runs (and, for the record, against torch's F.linear)."""
    lines = []
    for d_out, by_tokens in seconds["cpu"].items():
        for tokens, floor in (("32", 10.0), ("256", 4.0)):
            if tokens in by_tokens:
                ratio = seconds["naive"][d_out][tokens] / by_tokens[tokens]
                verdict = "ok" if ratio >= floor else "MISSED"
                lines.append(f"bar naive/cpu >= {floor:g} at T={tokens}, d_out={d_out}: {ratio:.1f} {verdict}")
    if "2048" in seconds["cpu"].get("576", {}):
        cpu = seconds["cpu"]["576"]["2048"]
        ratio = cpu / seconds["base"]["576"]["2048"]
        lines.append(f"bar cpu/base <= 0.35 at T=2048, d_out=576: {ratio:.3f} {'ok' if ratio <= 0.35 else 'MISSED'}")
        against_torch = cpu / seconds["base_torch"]["576"]["2048"]
        lines.append(f"(for the record) cpu/base_torch at T=2048, d_out=576: {against_torch:.3f}")
    return lines
