"""The MALoRA delta on CPU through a native kernel (`malora_cpu.cpp` beside this file), computed in float32.

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
from .build import NativeKernelError, build_native_kernel

log = logging.getLogger(__name__)

ABI_VERSION = 4
LANES = 16  # the kernel's vector width in floats: padded widths are multiples of it
# Tokens per work item: a block of one adapter's tokens shares every weight it reads. 64 measured
# best at T = 2048 over 32 adapters (32: 1.13x slower, 128: 1.03x; docs/BENCHMARKS.md).
BLOCK = 64


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


class _BankDescriptor(ctypes.Structure):
    """Mirrors `struct Bank` in malora_cpu.cpp."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("sgt", "pt", "bt", "bias", "meta", "fmeta")] + [
        (name, ctypes.c_int64) for name in ("d_in", "d_out", "d_max", "r_max", "n_max", "dp", "up")]


@dataclass(frozen=True)
class NativeKernel:
    """The loaded library's entry point."""

    library: ctypes.CDLL
    delta_f32: ctypes._CFuncPtr  # type: ignore[name-defined]
    pack_slot_f32: ctypes._CFuncPtr  # type: ignore[name-defined]

    @classmethod
    def load(cls, path: Path) -> NativeKernel:
        library = ctypes.CDLL(str(path))
        if library.malora_kernel_abi_version() != ABI_VERSION:
            raise NativeKernelError(f"{path}: ABI version {library.malora_kernel_abi_version()}, want {ABI_VERSION}")
        function = library.malora_delta_f32
        c_ptr, c_long = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [c_ptr, c_ptr, c_long, c_ptr, c_long, c_ptr, c_ptr, c_long, c_long, c_ptr, c_long,
                             ctypes.c_int]
        function.restype = ctypes.c_int
        pack = library.malora_pack_slot_f32
        c_float = ctypes.c_float
        pack.argtypes = [c_ptr] * 4 + [c_long] * 7 + [c_float] * 3 + [c_ptr] * 5
        pack.restype = ctypes.c_int
        return cls(library, function, pack)


@functools.cache
def _load() -> NativeKernel | NativeKernelError:
    try:
        return NativeKernel.load(build_native_kernel())
    except NativeKernelError as exc:
        return exc
    except Exception as exc:  # anything else the build or the loader raises: serve without the kernel
        return NativeKernelError(f"{type(exc).__name__}: {exc}")


def native_kernel() -> NativeKernel | None:
    """The kernel, built and loaded on first call; None (logged once) where it cannot be."""
    loaded = _load()
    if isinstance(loaded, NativeKernelError):
        if not getattr(loaded, "logged", False):
            log.warning("native MALoRA kernel unavailable, using the torch CPU path: %s", loaded)
            loaded.logged = True  # type: ignore[attr-defined]
        return None
    return loaded


def require_native_kernel() -> NativeKernel:
    """The kernel, or NativeKernelError saying why it cannot be built or loaded."""
    loaded = _load()
    if isinstance(loaded, NativeKernelError):
        raise loaded
    return loaded


@dataclass
class NativeWeights:
    """A bank as the kernel reads it (float32), kept in step per slot by `SlotBank`, with the ctypes
    descriptor that points into it: built once per bank, so a slot write rewrites one slot's rows
    and nothing has to be rebuilt in the step after it.

    [S; G]^T and P^T: one block per slot, starting with its own rows, row-major and as wide as the
    slot's real sizes, so the kernel reads exactly the adapter's weights (a small adapter in a bank
    sized for a large one reads no padding); the block is sized for the bank's maxima, which leaves
    room for the kernel's whole-vector reads past a row's end. B^T is the bank's own float32 layout.
    """

    sgt: torch.Tensor  # [num_slots, d_in * dp]: [S; G]^T, rows of d + n (unpadded)
    pt: torch.Tensor  # [num_slots, d_max * up]: P^T ([d, n r], column t r + rho), rows of n r
    bias: torch.Tensor  # [num_slots, n_max] float32
    meta: torch.Tensor  # [num_slots, 4] int32: d, r, n, top_k; all 0 for a cleared slot
    fmeta: torch.Tensor  # [num_slots, 3] float32: scale, 1 / temperature, softmax-then-top-k
    bt: torch.Tensor  # the bank's transposed_b(): [num_slots, n_max, r_max, d_out] float32
    struct: _BankDescriptor
    address: int  # of `struct`, for the kernel call
    d_in: int  # sizes a call checks, as plain ints
    d_out: int
    num_slots: int
    n_max: int

    @classmethod
    def build(cls, bank: SlotBank) -> NativeWeights:
        if not bank.S.is_cpu:
            raise ValueError(f"the native kernel's layout is for CPU banks, this one is on {bank.S.device}")
        d_max, r_max, n_max = bank.maxima
        dp, up = _round_up(d_max + n_max), _round_up(n_max * r_max)
        ns, f32 = bank.num_slots, torch.float32
        sgt, pt = torch.zeros(ns, bank.d_in * dp, dtype=f32), torch.zeros(ns, d_max * up, dtype=f32)
        bias, fmeta = torch.zeros(ns, n_max, dtype=f32), torch.zeros(ns, 3, dtype=f32)
        meta = torch.zeros(ns, 4, dtype=torch.int32)
        bt = bank.transposed_b()  # float32, contiguous, kept in step by the bank itself
        tensors = (sgt, pt, bt, bias, meta, fmeta)
        struct = _BankDescriptor(*(t.data_ptr() for t in tensors), bank.d_in, bank.d_out, d_max, r_max, n_max, dp, up)
        weights = cls(sgt, pt, bias, meta, fmeta, bt, struct, ctypes.addressof(struct), bank.d_in, bank.d_out, ns,
                      n_max)
        for slot, info in enumerate(bank.infos):
            if info is not None:
                weights.write_slot(bank, slot)
        return weights

    @torch.no_grad()
    def write_slot(self, bank: SlotBank, slot: int) -> None:
        """Rewrite the slot's rows, by the kernel library (`malora_pack_slot_f32`); the rest of the slot's
        block is never read. A cleared slot only gets its sizes zeroed (the kernel skips top_k 0)."""
        info = bank.infos[slot]
        if info is None:
            self.meta[slot].zero_()
            return
        d_max, r_max, _ = bank.maxima
        sources = (bank.S, bank.G, bank.P, bank.router_bias)
        if all(t.dtype == torch.float32 and t.is_contiguous() for t in sources):
            # The slot's rows by pointer arithmetic: no tensor ops (this runs for every module of a swap).
            pointers = [t.data_ptr() + slot * t.stride(0) * 4 for t in sources]
        else:
            copies = [t[slot].to(torch.float32).contiguous() for t in sources]
            pointers = [t.data_ptr() for t in copies]
        require_native_kernel().pack_slot_f32(
            *pointers, bank.d_in, d_max, r_max, info.d, info.r, info.num_experts, info.top_k, info.scale,
            1.0 / info.router_temperature, float(info.softmax_first),
            *(t.data_ptr() + slot * t.stride(0) * t.element_size() for t in (self.sgt, self.pt, self.bias, self.meta,
                                                                              self.fmeta)))


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
        items = torch.tensor([(slot, first, min(first + BLOCK, end)) for slot, start, end in token_slots.segments
                              if bank.infos[slot] is not None for first in range(start, end, BLOCK)],
                             dtype=torch.int64).view(-1, 3)
        order = token_slots.order.contiguous()
        return cls(items, items.shape[0], order, (order.data_ptr(), items.data_ptr()), token_slots.num_tokens)


def _plan(token_slots: TokenSlots, bank: SlotBank) -> NativePlan:
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
    y [T, d_out] (in place), x [T, d_in], both on the CPU; computed in float32 (other dtypes are
    converted on the way in and out). expert_counts: [num_slots, >= n_max] int64, counted by the
    kernel itself (a few atomic adds per token: no cost worth deferring, unlike the torch path).
    The kernel reads through raw pointers, so every shape is checked first (on cached ints: this
    runs for every adapted module of every step).
    """
    if not (x.is_cpu and y.is_cpu and bank.S.is_cpu):
        raise ValueError(f"the native kernel runs on CPU tensors: x on {x.device}, y on {y.device}, "
                         f"the bank on {bank.S.device}")
    kernel = kernel or require_native_kernel()
    plan = _plan(token_slots, bank)
    if plan.num_items == 0:
        return
    bank_view = bank.layout("native", NativeWeights.build)
    if not (x.dim() == 2 and y.dim() == 2 and x.shape[1] == bank_view.d_in and y.shape[1] == bank_view.d_out
            and x.shape[0] == y.shape[0] == plan.num_tokens):
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit the bank "
                         f"({bank_view.d_in} -> {bank_view.d_out}) and {plan.num_tokens} tokens")
    counts, ld_counts = None, 0
    if expert_counts is not None:
        if not (isinstance(expert_counts, torch.Tensor) and expert_counts.dtype == torch.int64 and expert_counts.is_cpu
                and expert_counts.dim() == 2 and expert_counts.stride(1) == 1
                and expert_counts.shape[0] == bank_view.num_slots and expert_counts.shape[1] >= bank_view.n_max):
            raise TypeError("the native kernel counts into an int64 CPU tensor [num_slots, >= n_max]")
        counts, ld_counts = expert_counts.data_ptr(), expert_counts.stride(0)
    xf = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.to(torch.float32).contiguous()
    direct = y.dtype == torch.float32 and y.stride(1) == 1 and y.stride(0) >= y.shape[1]  # rows do not overlap
    out = y if direct else torch.zeros(y.shape, dtype=torch.float32)
    order, items = plan.pointers
    kernel.delta_f32(bank_view.address, xf.data_ptr(), xf.stride(0), out.data_ptr(), out.stride(0), order, items,
                     plan.num_items, BLOCK, counts, ld_counts, torch.get_num_threads())
    if not direct:
        y.add_(out.to(y.dtype))
