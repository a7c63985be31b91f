"""`malora bench kernels`: the MALoRA delta against a naive mixture-of-LoRA loop and the base linear.

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

With `--device cuda` the paths are naive, `triton` (the Triton kernel, `kernels.triton_malora`, as the
engine runs it on a GPU) and base (F.linear, cuBLAS), all on the GPU, timed with a synchronize at each end.

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
from ..kernels.packed import PackedModule
from ..kernels.slot_bank import SlotBank
from ..kernels.token_slots import TokenSlots
from ..models.packed_linear import PackedLinear, onednn_linear_available

log = logging.getLogger(__name__)

D_IN = 576
SPEC = ModuleSpec(d=32, r=8, num_experts=8, top_k=2, alpha=16.0)
ROTATE_MIB = 96  # rotate at least this much weight data by default (L3 here is 32 MiB)
PATHS = ("naive", "cpu", "cpu_torch", "base", "base_torch")
CUDA_PATHS = ("naive", "triton", "base")


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
    parser.add_argument("--matched", action="store_true",
                        help="instead: one adapter's serving delta, MALoRA against LoRA with the same number of "
                        "parameters (and, separately, LoRA of the same rank budget k r), d_out 576")
    parser.add_argument("--weight-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the adapters' weights are stored and read in (x and y stay float32)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the Triton kernel against naive and base, on the GPU")


def report(line: str = "") -> None:
    """The command's table goes to stdout."""
    sys.stdout.write(line + "\n")


@dataclass
class WeightSet:
    bank: SlotBank
    naive: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]  # per adapter (G, A_t, B_t)
    base: torch.Tensor  # [d_out, d_in]
    packed: nn.Linear | None  # the same weight as a PackedLinear, when oneDNN is available


def make_set(adapters: int, d_out: int, gen: torch.Generator, device: str = "cpu",
             weight_dtype: torch.dtype = torch.float32) -> WeightSet:
    n = SPEC.num_experts
    # Packed adapters in weight_dtype: on the CPU the bank reads them in place, on a GPU it copies them there.
    bank = SlotBank(D_IN, d_out, adapters, torch.device(device), None if device == "cpu" else weight_dtype)
    naive = []
    for slot in range(adapters):
        w = ModuleWeights(SPEC, S=torch.randn(SPEC.d, D_IN, generator=gen) / D_IN**0.5,
                          G=torch.randn(n, D_IN, generator=gen) / D_IN**0.5,
                          P=torch.randn(n, SPEC.r, SPEC.d, generator=gen) / SPEC.d**0.5,
                          B=torch.randn(n, d_out, SPEC.r, generator=gen) / SPEC.r**0.5)
        bank.set_slot(slot, PackedModule.from_weights(w, weight_dtype).weights(SPEC))
        naive.append((w.G.to(device), [(w.P[t] @ w.S).to(device) for t in range(n)],
                      [w.B[t].to(device, copy=True) for t in range(n)]))
    base = (torch.randn(d_out, D_IN, generator=gen) / D_IN**0.5).to(device)
    packed = None
    if device == "cpu" and onednn_linear_available():
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


def _no_sync() -> None:
    pass


def per_call(fn: Callable[[int], None], min_time: float, rounds: int, sync: Callable[[], None] = _no_sync) -> float:
    """Best over rounds of the mean seconds per call (as `timeit`: the least disturbed round, which
    matters on a shared machine); fn(i) uses the i-th rotating input. `sync` waits for queued work
    (torch.cuda.synchronize on a GPU) before each clock reading."""
    fn(0)
    sync()
    start = time.perf_counter()
    fn(1)
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(3, math.ceil(min_time / once))
    figures = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            fn(r * calls + i)
        sync()
        figures.append((time.perf_counter() - start) / calls)
    return min(figures)


def _sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else _no_sync


def machine_rates(min_time: float, device: str = "cpu") -> dict[str, float]:
    sync = _sync_for(device)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    mm = per_call(lambda i: torch.mm(a, b), min_time, 3, sync)
    src = torch.randn(64 << 20 >> 2, device=device)  # 64 MiB, twice the L3
    dst = torch.empty_like(src)
    copy = per_call(lambda i: dst.copy_(src), min_time, 3, sync)
    return {"matmul_gflops": 2 * 2048**3 / mm / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy / 1e9}


def delta_cost(tokens: int, d_out: int, adapters: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one delta call by the formula: MALoRA multiply-adds x 2, and the data that
    must move at least once: x, y read and written, every touched adapter's S, G, P, B (float32)."""
    d, r, n, k = SPEC.d, SPEC.r, SPEC.num_experts, SPEC.top_k
    flops = 2 * tokens * (D_IN * (d + n) + k * r * (d + d_out))
    touched = min(tokens, adapters)
    weights = touched * (d * D_IN + n * D_IN + n * r * d + n * d_out * r)
    return flops, 4 * (tokens * D_IN + 2 * tokens * d_out + weights)


def _calls(device: str, y: torch.Tensor, pick: Callable[[int], tuple[torch.Tensor, WeightSet]],
           token_slots: TokenSlots, packed: bool) -> dict[str, Callable[[int], None]]:
    """The timed paths of `device`, by name (without `base` on a CPU without oneDNN: it is `base_torch`)."""

    def naive(i: int) -> None:
        naive_delta(y, *pick(i), token_slots.slots)

    def base_torch(i: int) -> None:
        torch.nn.functional.linear(pick(i)[0], pick(i)[1].base)

    if device == "cuda":
        from ..kernels.triton_malora import add_malora_delta_triton

        def triton(i: int) -> None:
            add_malora_delta_triton(y, pick(i)[0], pick(i)[1].bank, token_slots)

        return {"naive": naive, "triton": triton, "base": base_torch}
    cpu_delta = add_malora_delta_cpu if native_kernel() is None else add_malora_delta_native

    def cpu(i: int) -> None:
        cpu_delta(y, pick(i)[0], pick(i)[1].bank, token_slots)

    def cpu_torch(i: int) -> None:
        add_malora_delta_cpu(y, pick(i)[0], pick(i)[1].bank, token_slots)

    def base(i: int) -> None:
        pick(i)[1].packed(pick(i)[0])

    return {"naive": naive, "cpu": cpu, "cpu_torch": cpu_torch, "base_torch": base_torch} | (
        {"base": base} if packed else {})


def measure(args: argparse.Namespace, d_out: int, token_counts: list[int]) -> dict[str, dict[int, float]]:
    device, sync = args.device, _sync_for(args.device)
    gen = torch.Generator().manual_seed(0)
    weight_dtype = getattr(torch, args.weight_dtype)
    probe = make_set(args.adapters, d_out, gen, device, weight_dtype)
    set_bytes = sum(m.num_bytes for m in probe.bank.modules if m is not None)
    sets = [probe] + [make_set(args.adapters, d_out, gen, device, weight_dtype)
                      for _ in range(max(3, (args.rotate_mib << 20) // set_bytes))]
    figures: dict[str, dict[int, float]] = {path: {} for path in (CUDA_PATHS if device == "cuda" else PATHS)}
    shuffle = random.Random(0)
    for tokens in token_counts:
        slot_list = [i % args.adapters for i in range(tokens)]
        shuffle.shuffle(slot_list)
        token_slots = TokenSlots.from_list(slot_list, device)
        xs = [torch.randn(tokens, D_IN, generator=gen).to(device) for _ in range(len(sets))]
        y = torch.zeros(tokens, d_out, device=device)

        def pick(i: int) -> tuple[torch.Tensor, WeightSet]:
            return xs[i % len(sets)], sets[i % len(sets)]

        with torch.no_grad():
            for path, call in _calls(device, y, pick, token_slots, probe.packed is not None).items():
                figures[path][tokens] = per_call(call, args.min_time, args.rounds, sync)
        if probe.packed is None and device == "cpu":
            figures["base"][tokens] = figures["base_torch"][tokens]
    return figures


MATCHED_D_OUT = 576


def lora_ranks(spec: ModuleSpec, d_in: int, d_out: int) -> dict[str, int]:
    """LoRA ranks to compare one MALoRA module with: the same parameters (R (d_in + d_out) = MALoRA's count) and
    the same rank budget (R = k r: the rank of the update one token receives)."""
    from ..adapters.cost import malora_params

    return {"matched": max(1, round(malora_params(spec, d_in, d_out) / (d_in + d_out))),
            "matched_rank": spec.top_k * spec.r}


def measure_matched(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per call of one adapter's delta on all T tokens: MALoRA (SPEC) through the engine's CPU path, LoRA
    as the engine serves it (N = 1 through the same path) and as two plain products (x A^T) B^T; `lora` is the
    faster of the two LoRA forms."""
    gen = torch.Generator().manual_seed(0)
    d_out, cpu_delta = MATCHED_D_OUT, (add_malora_delta_cpu if native_kernel() is None else add_malora_delta_native)

    def bank_of(w: ModuleWeights) -> SlotBank:
        bank = SlotBank(D_IN, d_out, 1)
        bank.set_slot(0, PackedModule.from_weights(w, torch.float32).weights(w.spec))
        return bank

    n = SPEC.num_experts
    malora = bank_of(ModuleWeights(SPEC, S=torch.randn(SPEC.d, D_IN, generator=gen) / D_IN**0.5,
                                   G=torch.randn(n, D_IN, generator=gen) / D_IN**0.5,
                                   P=torch.randn(n, SPEC.r, SPEC.d, generator=gen) / SPEC.d**0.5,
                                   B=torch.randn(n, d_out, SPEC.r, generator=gen) / SPEC.r**0.5))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, rank in lora_ranks(SPEC, D_IN, d_out).items():
        a = torch.randn(rank, D_IN, generator=gen) / D_IN**0.5
        b = torch.randn(d_out, rank, generator=gen) / rank**0.5
        lora_spec = ModuleSpec(d=rank, r=rank, num_experts=1, top_k=1, alpha=float(rank))
        lora = bank_of(ModuleWeights(lora_spec, S=a, G=torch.zeros(1, D_IN), P=torch.eye(rank).unsqueeze(0),
                                     B=b.unsqueeze(0)))
        figures: dict[str, dict[str, float]] = {}
        for tokens in args.tokens:
            xs = [torch.randn(tokens, D_IN, generator=gen) for _ in range(4)]
            y = torch.zeros(tokens, d_out)
            slots = TokenSlots.from_list([0] * tokens)
            with torch.no_grad():
                timed = {
                    "malora": per_call(lambda i: cpu_delta(y, xs[i % 4], malora, slots), args.min_time, args.rounds),
                    "lora_kernel": per_call(lambda i: cpu_delta(y, xs[i % 4], lora, slots), args.min_time,
                                            args.rounds),
                    "lora_torch": per_call(lambda i: y.addmm_(xs[i % 4] @ a.T, b.T), args.min_time, args.rounds),
                }
            timed["lora"] = min(timed["lora_kernel"], timed["lora_torch"])
            figures[str(tokens)] = timed
            report(f"{label:>12} R={rank:<3} T={tokens:<5} malora {timed['malora'] * 1e3:8.3f} ms  lora "
                   f"{timed['lora'] * 1e3:8.3f} ms (kernel {timed['lora_kernel'] * 1e3:.3f}, torch "
                   f"{timed['lora_torch'] * 1e3:.3f})  malora/lora {timed['malora'] / timed['lora']:.2f}")
        out[label] = figures
    return out


def run_matched(args: argparse.Namespace) -> int:
    ranks = lora_ranks(SPEC, D_IN, MATCHED_D_OUT)
    report(f"one adapter, d_in {D_IN}, d_out {MATCHED_D_OUT}: MALoRA N {SPEC.num_experts} k {SPEC.top_k} r {SPEC.r} "
           f"d {SPEC.d} against LoRA R {ranks['matched']} (same parameters) and R {ranks['matched_rank']} (rank "
           f"budget k r); {torch.get_num_threads()} threads")
    figures = measure_matched(args)
    worst = max(f["malora"] / f["lora"] for f in figures["matched"].values())
    verdict = "ok" if worst <= 1.1 else "MISSED"
    report(f"bar malora/lora <= 1.1 at equal parameters, every T: worst {worst:.2f} {verdict}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**figures, "lora_ranks": ranks, "spec": {"d_in": D_IN, "d_out": MATCHED_D_OUT, "d": SPEC.d,
                       "r": SPEC.r, "N": SPEC.num_experts, "top_k": SPEC.top_k}}, handle, indent=2)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.matched:
        return run_matched(args)
    token_counts, widths = args.tokens, args.d_out
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        log.error("--device cuda: torch sees no GPU here")
        return 1
    paths = CUDA_PATHS if on_gpu else PATHS
    fast = paths[1]  # the project's path on this device: cpu (native kernel or torch) or triton
    rates = machine_rates(args.min_time, args.device)
    cpu_path = "torch (the native kernel is unavailable)" if native_kernel() is None else "native kernel"
    rate_text = f"matmul {rates['matmul_gflops']:.0f} GFLOP/s, copy {rates['copy_gbps']:.1f} GB/s"
    if on_gpu:
        report(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {rate_text}; "
               f"triton = the Triton kernel; base = F.linear")
        report(f"{'d_out':>5} {'T':>5} {'naive ms':>9} {'triton ms':>9} {'base ms':>8} {'naive/triton':>12} "
               f"{'triton/base':>11} {'GFLOP/s':>8} {'GB/s':>6}")
    else:
        report(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; {rate_text}; cpu = {cpu_path}; base = "
               f"{'oneDNN packed' if onednn_linear_available() else 'F.linear'}")
        report(f"{'d_out':>5} {'T':>5} {'naive ms':>9} {'cpu ms':>8} {'torch ms':>8} {'base ms':>8} {'F.lin ms':>8} "
               f"{'naive/cpu':>9} {'torch/cpu':>9} {'cpu/base':>8} {'GFLOP/s':>8} {'GB/s':>6}")
    seconds: dict[str, dict[str, dict[str, float]]] = {path: {} for path in paths}
    for d_out in widths:
        figures = measure(args, d_out, token_counts)
        for path, by_tokens in figures.items():
            seconds[path][str(d_out)] = {str(t): s for t, s in by_tokens.items()}
        for t in token_counts:
            flops, nbytes = delta_cost(t, d_out, args.adapters)
            naive, delta, base = figures["naive"][t], figures[fast][t], figures["base"][t]
            rate = f"{flops / delta / 1e9:>8.1f} {nbytes / delta / 1e9:>6.1f}"
            if on_gpu:
                report(f"{d_out:>5} {t:>5} {naive * 1e3:>9.3f} {delta * 1e3:>9.3f} {base * 1e3:>8.3f} "
                       f"{naive / delta:>12.1f} {delta / base:>11.3f} {rate}")
            else:
                torch_path, base_torch = figures["cpu_torch"][t], figures["base_torch"][t]
                report(f"{d_out:>5} {t:>5} {naive * 1e3:>9.3f} {delta * 1e3:>8.3f} {torch_path * 1e3:>8.3f} "
                       f"{base * 1e3:>8.3f} {base_torch * 1e3:>8.3f} {naive / delta:>9.1f} {torch_path / delta:>9.2f} "
                       f"{delta / base:>8.3f} {rate}")
    bars = check_bars(seconds, fast)
    for line in bars:
        report(line)
    if args.json:
        where = {"device": torch.cuda.get_device_name()} if on_gpu else {"cpu_path": cpu_path}
        with open(args.json, "w") as handle:
            json.dump({"seconds_per_call": seconds, "machine": rates, "adapters": args.adapters, **where,
                       "spec": {"d_in": D_IN, "d": SPEC.d, "r": SPEC.r, "N": SPEC.num_experts,
                                "top_k": SPEC.top_k}, "bars": bars}, handle, indent=2)
        log.info("wrote %s", args.json)
    return 0


def check_bars(seconds: dict[str, dict[str, dict[str, float]]], fast: str = "cpu") -> list[str]:
    """The issue's bars, each as one line of text: naive/fast at T=32 and 256, fast/base at T=2048 against
    the base linear the engine runs (and, on the CPU, for the record, against torch's F.linear); `fast` is
    the project's path of the run (cpu or triton)."""
    lines = []
    for d_out, by_tokens in seconds[fast].items():
        for tokens, floor in (("32", 10.0), ("256", 4.0)):
            if tokens in by_tokens:
                ratio = seconds["naive"][d_out][tokens] / by_tokens[tokens]
                verdict = "ok" if ratio >= floor else "MISSED"
                lines.append(f"bar naive/{fast} >= {floor:g} at T={tokens}, d_out={d_out}: {ratio:.1f} {verdict}")
    if "2048" in seconds[fast].get("576", {}):
        delta = seconds[fast]["576"]["2048"]
        ratio = delta / seconds["base"]["576"]["2048"]
        lines.append(f"bar {fast}/base <= 0.35 at T=2048, d_out=576: {ratio:.3f} {'ok' if ratio <= 0.35 else 'MISSED'}")
        if "base_torch" in seconds:
            against_torch = delta / seconds["base_torch"]["576"]["2048"]
            lines.append(f"(for the record) {fast}/base_torch at T=2048, d_out=576: {against_torch:.3f}")
    return lines
