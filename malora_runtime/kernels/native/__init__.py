"""The MALoRA delta on CPU through a native kernel (`malora_cpu.cpp` beside this file), computed in float32.

It reads each slot's packed module (`kernels/packed.py`) where it lies, through the bank's table of
addresses, in the adapter's own dtype (float32, bfloat16 or float16, converted as it is loaded).

Why: per adapter the delta is a few small products over a few dozen tokens. Through torch that is a
dozen batched ops per module, each gathering, padding or scattering a copy of the tokens; the native
kernel makes one pass per block of an adapter's tokens: [S; G] x register-blocked over the gathered
rows of x, routing and P z in a per-thread buffer, and the chosen experts' rows of B^T added straight
into y. `malora bench kernels` compares it with the torch path (`kernels.cpu`) and the base linear.

Build (`build.py`): the source is compiled once per machine by the system's C++ compiler and cached, then
loaded with ctypes. Its OpenMP
threads are torch's own (one libgomp per process); it uses as many as torch does on the calling
thread (or runs single-threaded where torch's runtime is not libgomp.so.1). Where no compiler works,
`native_kernel()` returns None once, with the reason logged, and the dispatch falls back to the
torch path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..slot_bank import SlotBank
from ..token_slots import TokenSlots
from .build import NativeKernelError, build_native_kernel, load_or_error, loaded_or_raise

log = logging.getLogger(__name__)

ABI_VERSION = 6
LANES = 16  # the kernel's vector width in floats: padded widths are multiples of it
# Tokens per work item: a block of one adapter's tokens shares every weight it reads. 64 measured
# best at T = 2048 over 32 adapters (32: 1.13x slower, 128: 1.03x; docs/BENCHMARKS.md).
BLOCK = 64
ROWS_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # activation dtypes the kernel reads and writes itself


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


class _BankDescriptor(ctypes.Structure):
    """Mirrors `struct Bank` in malora_cpu.cpp."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("addresses", "meta", "fmeta")] + [
        (name, ctypes.c_int64) for name in ("d_in", "d_out", "n_max", "r_max", "dp", "up")]


@dataclass(frozen=True)
class NativeKernel:
    """The loaded library's entry point."""

    library: ctypes.CDLL
    delta: ctypes._CFuncPtr  # type: ignore[name-defined]

    @classmethod
    def load(cls, path: Path) -> NativeKernel:
        library = ctypes.CDLL(str(path))
        if library.malora_kernel_abi_version() != ABI_VERSION:
            raise NativeKernelError(f"{path}: ABI version {library.malora_kernel_abi_version()}, want {ABI_VERSION}")
        function = library.malora_delta
        c_ptr, c_long = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [c_ptr, c_ptr, c_long, c_ptr, c_long, ctypes.c_int, c_ptr, c_ptr, c_long, c_long,
                             c_ptr, c_long, ctypes.c_int]
        function.restype = ctypes.c_int
        return cls(library, function)


@functools.cache
def _load(level: str | None = None) -> NativeKernel | NativeKernelError:
    return load_or_error(lambda: NativeKernel.load(build_native_kernel(level=level)))  # an error: serve without it


def native_kernel() -> NativeKernel | None:
    """The kernel, built and loaded on first call; None (logged once) where it cannot be."""
    loaded = _load()
    if isinstance(loaded, NativeKernelError):
        if not getattr(loaded, "logged", False):
            log.warning("native MALoRA kernel unavailable, using the torch CPU path: %s", loaded)
            loaded.logged = True  # type: ignore[attr-defined]
        return None
    return loaded


def require_native_kernel(level: str | None = None) -> NativeKernel:
    """The kernel built for instruction-set `level` (default: the served one), or NativeKernelError saying why it
    cannot be built or loaded."""
    return loaded_or_raise(_load(level))


@dataclass(frozen=True)
class NativeBankView:
    """The ctypes descriptor of a bank's slot table (the tables themselves stay the bank's); rebuilt after
    a slot write, once, by `SlotBank.derived`."""

    struct: _BankDescriptor
    address: int  # of `struct`, for the kernel call
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # kept alive for the pointers in `struct`
    n_max: int

    @classmethod
    def build(cls, bank: SlotBank) -> NativeBankView:
        if bank.device.type != "cpu":
            raise ValueError(f"the native kernel reads CPU banks, this one is on {bank.device}")
        infos = [i for i in bank.infos if i is not None]
        d_max, r_max, n_max = bank.maxima
        dp = _round_up(max((i.d + i.num_experts for i in infos), default=0))
        up = _round_up(max((i.num_experts * i.r for i in infos), default=0))
        tables = bank.table_tensors()
        struct = _BankDescriptor(*(t.data_ptr() for t in tables), bank.d_in, bank.d_out, n_max, r_max, dp, up)
        return cls(struct, ctypes.addressof(struct), tables, n_max)


def bank_view_of(bank: SlotBank) -> NativeBankView:
    """The bank's descriptor for the kernel, rebuilt after a slot write."""
    return bank.derived("native", lambda: NativeBankView.build(bank))


MIN_BLOCK = 8


def item_block(num_tokens: int, num_segments: int, num_threads: int) -> int:
    """Tokens per work item: BLOCK, or fewer when the batch would otherwise leave threads idle (one adapter's 32
    tokens were one item on one thread: 1.16x two plain GEMMs' time; split, every thread works)."""
    if num_threads <= 1 or num_segments >= num_threads or num_tokens <= MIN_BLOCK:
        return BLOCK
    return max(MIN_BLOCK, min(BLOCK, -(-num_tokens // num_threads)))


@dataclass(frozen=True)
class NativePlan:
    """A step's work items for one set of active slots: blocks of at most BLOCK tokens of one slot."""

    items: torch.Tensor  # [n_items, 3] int64: slot, start, end over TokenSlots.order
    num_items: int
    order: torch.Tensor  # TokenSlots.order, kept alive for the pointer below
    pointers: tuple[int, int]  # (order, items) data pointers
    num_tokens: int  # rows the batch must have

    @classmethod
    def build(cls, token_slots: TokenSlots, bank: SlotBank) -> NativePlan:
        segments = [(slot, start, end) for slot, start, end in token_slots.segments if bank.infos[slot] is not None]
        block = item_block(sum(end - start for _, start, end in segments), len(segments), torch.get_num_threads())
        items = torch.tensor([(slot, first, min(first + block, end)) for slot, start, end in segments
                              for first in range(start, end, block)], dtype=torch.int64).view(-1, 3)
        order = token_slots.order.contiguous()
        return cls(items, items.shape[0], order, (order.data_ptr(), items.data_ptr()), token_slots.num_tokens)


def plan_for(token_slots: TokenSlots, bank: SlotBank) -> NativePlan:
    """The step's work items for `bank`, built once per step and set of active slots."""
    key = ("native", bank.active_slots)
    plan = token_slots.plans.get(key)
    if plan is None:
        plan = token_slots.plans[key] = NativePlan.build(token_slots, bank)
    return plan


@torch.no_grad()
def add_malora_delta_native(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    expert_counts: torch.Tensor | None = None,
    kernel: NativeKernel | None = None,
) -> None:
    """Semantics (as `dispatch.add_malora_delta`):
      y[i] += scale[s] * sum_{t in T_i} w_it B[s, t] (P[s, t] (S[s] x[i]))   for s = slots[i] != -1
      expert_counts[s, t] += 1 for t in T_i                                 when expert_counts is given
    y [T, d_out] (in place), x [T, d_in], both on the CPU; computed in float32 with float32 or bfloat16 rows read
    and written in place (other dtypes are converted on the way in and out). expert_counts: [num_slots, >= n_max]
    int64, counted by the kernel itself (a few atomic adds per token: no cost worth deferring, unlike the torch
    path).
    The kernel reads through raw pointers, so every shape is checked first (on cached ints: this
    runs for every adapted module of every step).
    """
    if not (x.is_cpu and y.is_cpu and bank.device.type == "cpu"):
        raise ValueError(f"the native kernel runs on CPU tensors: x on {x.device}, y on {y.device}, "
                         f"the bank on {bank.device}")
    kernel = kernel or require_native_kernel()
    plan = plan_for(token_slots, bank)
    if plan.num_items == 0:
        return
    bank_view = bank_view_of(bank)
    if not (x.dim() == 2 and y.dim() == 2 and x.shape[1] == bank.d_in and y.shape[1] == bank.d_out
            and x.shape[0] == y.shape[0] == plan.num_tokens):
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit the bank "
                         f"({bank.d_in} -> {bank.d_out}) and {plan.num_tokens} tokens")
    counts, ld_counts = None, 0
    if expert_counts is not None:
        if not (isinstance(expert_counts, torch.Tensor) and expert_counts.dtype == torch.int64 and expert_counts.is_cpu
                and expert_counts.dim() == 2 and expert_counts.stride(1) == 1
                and expert_counts.shape[0] == bank.num_slots and expert_counts.shape[1] >= bank_view.n_max):
            raise TypeError("the native kernel counts into an int64 CPU tensor [num_slots, >= n_max]")
        counts, ld_counts = expert_counts.data_ptr(), expert_counts.stride(0)
    # float32 and bfloat16 rows are read and written where they lie (bfloat16: widened per token in the kernel,
    # the delta added with one rounding per element); other dtypes or layouts go through a float32 copy.
    rows_dtype = ROWS_DTYPES.get(x.dtype) if x.dtype == y.dtype else None
    direct = rows_dtype is not None and y.stride(1) == 1 and y.stride(0) >= y.shape[1]  # rows do not overlap
    if direct:
        xs = x if x.stride(1) == 1 else x.contiguous()
    else:
        xs = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.to(torch.float32).contiguous()
    out = y if direct else torch.zeros(y.shape, dtype=torch.float32)
    order, items = plan.pointers
    status = kernel.delta(bank_view.address, xs.data_ptr(), xs.stride(0), out.data_ptr(), out.stride(0),
                          ROWS_DTYPES[out.dtype], order, items, plan.num_items, BLOCK, counts, ld_counts,
                          torch.get_num_threads())
    if status != 0:
        raise ValueError("the native kernel found a slot of a weight dtype it does not read")
    if not direct:
        y.add_(out.to(y.dtype))
