"""Triton kernels for the MALoRA delta of a heterogeneous batch (CUDA; CPU tensors under TRITON_INTERPRET=1).

One kernel, two launch modes over the packed batch:

  per token  (decode):  one program per token; it reads its slot, exits at once for tokens
                        without an adapter (slot -1 or an inactive slot, top_k 0)
  per tile   (prefill): one program per tile of BLOCK_T tokens of one adapter segment (from
                        `TokenSlots.order` / `segments`); the products are `tl.dot`s

Each program does, for its tokens of slot s:

  [z | logits] = x [S; G]^T            one pass over x, d_in in BLOCK_K steps (fp32 accumulate)
  scaled       = (logits + bias) / temperature; experts past the slot's N are masked to -inf
  top-k        k rounds of (max, lowest index attaining it) -> ties to the lower index, exactly
  weights      exp(v - max) / (sum over chosen  |  sum over all N when softmax_first)
  u            = z P^T, all experts dense (N r d is tiny), weighted per column (expert, j)
  y[:, o]     += scale * u_w B^T        the only d_out-wide product, B read only for chosen experts

Adapters of different d, r, N and top_k share a launch: each program reads its slot's packed module
(`kernels.packed`) through the bank's table of addresses, with that slot's own sizes (masked loads), so
nothing is padded. `add_malora_delta_triton` picks the mode by shape (mean tokens per segment) and
launches once per weight dtype among the active slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import DTYPE_CODES
from .slot_bank import SlotBank
from .token_slots import TokenSlots

TILE_TOKENS = 16  # BLOCK_T of the per-tile mode; tl.dot needs >= 16
MIN_TOKENS_PER_SEGMENT = 8  # the per-tile mode pays off from about here


@triton.jit
def _matmul(a, b, MMA: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32; tl.dot for tiles, broadcast-and-sum for single tokens."""
    if MMA:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _weights(addresses_ptr, slot, part, W_CODE: tl.constexpr):
    """Pointer to part `part` (0 sgt, 1 pt, 2 bt, 3 bias) of the slot's packed module, typed by W_CODE."""
    address = tl.load(addresses_ptr + slot * 4 + part)
    if W_CODE == 1:
        return address.to(tl.pointer_type(tl.bfloat16))
    elif W_CODE == 2:
        return address.to(tl.pointer_type(tl.float16))
    else:
        return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _malora_kernel(
    x_ptr, y_ptr, slots_ptr, order_ptr, tiles_ptr,
    addresses_ptr, meta_ptr, fmeta_ptr, counts_ptr,
    d_in, d_out, stride_x, stride_y, stride_counts,
    PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_O: tl.constexpr, W_CODE: tl.constexpr,
    CAST_FP32: tl.constexpr, COUNT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    if PER_TOKEN:
        slot = tl.load(slots_ptr + pid)
        if slot < 0:
            return
        row_mask = offs_t < 1
        rows = pid + offs_t.to(tl.int64)
    else:
        slot = tl.load(tiles_ptr + 3 * pid)
        start = tl.load(tiles_ptr + 3 * pid + 1)
        end = tl.load(tiles_ptr + 3 * pid + 2)
        row_mask = start + offs_t < end
        rows = tl.load(order_ptr + start + offs_t, mask=row_mask, other=0)
    slot = slot.to(tl.int64)
    meta = meta_ptr + slot * 5  # d, r, N, top_k (0: inactive), dtype code
    if tl.load(meta + 3) == 0:
        return
    if tl.load(meta + 4) != W_CODE:  # another launch reads this slot's dtype
        return
    d = tl.load(meta)
    r = tl.load(meta + 1)
    n = tl.load(meta + 2)
    width = d + n
    sgt = _weights(addresses_ptr, slot, 0, W_CODE)
    MMA: tl.constexpr = BLOCK_T >= 16

    # [z | logits] = x [S; G]^T in one pass over x: columns 0..d-1 and d..d+N-1 of the slot's [S; G]^T.
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    logits = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < d_in
        xv = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0)
        rows_k = sgt + kk[:, None].to(tl.int64) * width
        sv = tl.load(rows_k + offs_d[None, :], mask=k_mask[:, None] & (offs_d < d)[None, :], other=0.0)
        gv = tl.load(rows_k + d + offs_n[None, :], mask=k_mask[:, None] & (offs_n < n)[None, :], other=0.0)
        if CAST_FP32:
            xv = xv.to(tl.float32)
            sv = sv.to(tl.float32)
            gv = gv.to(tl.float32)
        z += _matmul(xv, sv, MMA, "ieee")
        logits += _matmul(xv, gv, MMA, "ieee")

    # Routing, per row: k rounds of (max, lowest index attaining it).
    bias = tl.load(_weights(addresses_ptr, slot, 3, W_CODE) + offs_n, mask=offs_n < n,
                   other=float("-inf")).to(tl.float32)
    scaled = (logits + bias[None, :]) * tl.load(fmeta_ptr + slot * 3 + 1)
    top = tl.max(scaled, axis=1)
    denom_all = tl.sum(tl.exp(scaled - top[:, None]), axis=1)
    offs_c = tl.arange(0, BLOCK_NR)  # column c = expert * r + j of P^T, row c of B^T
    col_expert = offs_c // r
    col_mask = offs_c < n * r
    w_cols = tl.zeros([BLOCK_T, BLOCK_NR], dtype=tl.float32)
    denom_k = tl.zeros([BLOCK_T], dtype=tl.float32)
    remaining = scaled
    # top_k is read again, not kept live through the d_in loop: ptxas 13 spilled it there (sm_90 and sm_100,
    # float32 decode; tests/kernels/test_triton_compile.py).
    for _ in range(0, tl.load(meta + 3)):
        best = tl.max(remaining, axis=1)
        expert = tl.min(tl.where(remaining == best[:, None], offs_n[None, :], BLOCK_N), axis=1)
        remaining = tl.where(offs_n[None, :] == expert[:, None], float("-inf"), remaining)
        weight = tl.exp(best - top)
        denom_k += weight
        w_cols += tl.where(col_expert[None, :] == expert[:, None], weight[:, None], 0.0)
        if COUNT:
            tl.atomic_add(counts_ptr + slot * stride_counts + expert, tl.full([BLOCK_T], 1, tl.int64),
                          mask=row_mask & (offs_t * 0 + pid_o == 0))
    denom = tl.where(tl.load(fmeta_ptr + slot * 3 + 2) != 0, denom_all, denom_k)
    # The columns of chosen experts, from the routing weights (> 0) before the scale is folded in: a negative
    # alpha makes the folded weights negative, and a zero one makes them zero.
    used = col_mask & (tl.max(w_cols, axis=0) > 0)
    w_cols = w_cols * (tl.load(fmeta_ptr + slot * 3) / denom)[:, None]

    # u = z P^T over every (expert, j) column, weighted; then y += u_w B^T, d_out in blocks.
    pv = tl.load(_weights(addresses_ptr, slot, 1, W_CODE) + offs_d[:, None] * (n * r) + offs_c[None, :],
                 mask=(offs_d < d)[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    u = _matmul(z, pv, MMA, "ieee") * w_cols  # [BLOCK_T, BLOCK_NR]
    b_rows = _weights(addresses_ptr, slot, 2, W_CODE) + offs_c.to(tl.int64) * d_out  # [BLOCK_NR]
    offs_o0 = tl.arange(0, BLOCK_O)
    # The grid's second axis splits d_out; its size is not a constexpr, so batch sizes share one compile.
    for o0 in range(pid_o * BLOCK_O, d_out, tl.num_programs(1) * BLOCK_O):
        offs_o = o0 + offs_o0
        o_mask = offs_o < d_out
        bv = tl.load(b_rows[:, None] + offs_o[None, :], mask=used[:, None] & o_mask[None, :], other=0.0).to(tl.float32)
        delta = _matmul(u, bv, MMA, "ieee")  # [BLOCK_T, BLOCK_O]
        y_ptrs = y_ptr + rows[:, None] * stride_y + offs_o[None, :]
        io_mask = row_mask[:, None] & o_mask[None, :]
        yv = tl.load(y_ptrs, mask=io_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yv + delta).to(y_ptr.dtype.element_ty), mask=io_mask)


def _pow2(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


def launch_config(
    mode: str,
    x_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    maxima: tuple[int, int, int],
    count: bool,
    interpreted: bool = False,
) -> dict[str, int | bool]:
    """Everything `_malora_kernel` is launched with except its arguments and grid: the constexprs and
    num_warps, for mode `token` or `tile`, inputs of x_dtype, adapter weights of weight_dtype whose largest
    sizes are maxima (d_max, r_max, n_max), expert counting on or off. The launcher and the ahead-of-time
    compile test (tests/kernels/test_triton_compile.py) both call it, so the test compiles what runs."""
    if mode not in ("token", "tile"):
        raise ValueError(f"mode must be 'token' or 'tile', got {mode!r}")
    d_max, r_max, n_max = maxima
    block = 32 if interpreted else 64  # BLOCK_K and BLOCK_O; the interpreter is faster on small tiles
    return dict(
        PER_TOKEN=mode == "token", BLOCK_T=1 if mode == "token" else TILE_TOKENS, BLOCK_K=block,
        BLOCK_D=_pow2(d_max, 16), BLOCK_N=_pow2(n_max, 16), BLOCK_NR=_pow2(n_max * r_max, 16), BLOCK_O=block,
        W_CODE=DTYPE_CODES[weight_dtype],
        # The interpreter's tl.dot mishandles bfloat16 (numpy has none): it multiplies in float32.
        CAST_FP32=interpreted or x_dtype == torch.float32 or x_dtype != weight_dtype,
        COUNT=count, num_warps=4,
    )


def kernel_args(
    y: torch.Tensor, x: torch.Tensor, bank: SlotBank, token_slots: TokenSlots, tiles: torch.Tensor,
    counts: torch.Tensor,
) -> tuple:
    """The positional (non-constexpr) arguments of `_malora_kernel`, in its order."""
    addresses, meta, fmeta = bank.table_tensors()
    return (
        x, y, token_slots.slots, token_slots.order, tiles, addresses, meta, fmeta, counts,
        bank.d_in, bank.d_out, x.stride(0), y.stride(0), counts.stride(0) if counts.dim() == 2 else 0,
    )


def tile_table(token_slots: TokenSlots, bank: SlotBank, block_t: int = TILE_TOKENS) -> torch.Tensor:
    """[num_tiles, 3] int64 (slot, start, end) over `order`: active segments cut into block_t tokens."""
    tiles = [(slot, s0, end) for slot, start, end in token_slots.segments if bank.infos[slot] is not None
             for s0 in range(start, end, block_t)]
    return torch.tensor(tiles, dtype=torch.int64).reshape(-1, 3).to(token_slots.order.device)


def choose_mode(token_slots: TokenSlots) -> str:
    """`tile` when segments hold MIN_TOKENS_PER_SEGMENT tokens or more on average, else `token`."""
    segments = token_slots.segments
    tokens = sum(end - start for _, start, end in segments)
    return "tile" if tokens >= MIN_TOKENS_PER_SEGMENT * max(1, len(segments)) else "token"


@torch.no_grad()
def add_malora_delta_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    expert_counts: torch.Tensor | None = None,
    mode: str = "auto",
) -> None:
    """Semantics (as `dispatch.add_malora_delta`):
      y[i] += scale[s] * sum_{t in T_i} w_it B[s, t] (P[s, t] (S[s] x[i]))   for s = slots[i] != -1
    y [T, d_out] and x [T, d_in] with unit column stride; expert_counts [num_slots, n_max] int64.
    mode: `token`, `tile` or `auto` (`choose_mode`).
    """
    if not token_slots.any_adapter:
        return
    if y.stride(1) != 1:
        raise ValueError("y must have unit column stride (it is updated in place)")
    x = x if x.stride(1) == 1 else x.contiguous()
    if mode == "auto":
        mode = choose_mode(token_slots)
    interpreted = not x.is_cuda
    if mode == "token":
        grid_rows, tiles = token_slots.num_tokens, token_slots.slots
    else:
        tiles = tile_table(token_slots, bank)
        grid_rows = tiles.shape[0]
    if grid_rows == 0:
        return
    counts = expert_counts if expert_counts is not None else y.new_zeros(1, dtype=torch.int64)
    args = kernel_args(y, x, bank, token_slots, tiles, counts)
    # One launch per weight dtype among the active slots (one, unless a CPU bank reads mixed adapters in place).
    for dtype in bank.derived("dtypes", lambda: sorted({i.dtype for i in bank.infos if i}, key=str)):
        config = launch_config(mode, x.dtype, dtype, bank.maxima, expert_counts is not None, interpreted)
        # Split d_out over a second grid axis when there are few programs (132 SMs on an H100, 4 programs each).
        o_blocks = triton.cdiv(bank.d_out, config["BLOCK_O"])
        o_split = 1 if interpreted else min(o_blocks, max(1, 4 * 132 // grid_rows))
        _malora_kernel[(grid_rows, o_split)](*args, **config)


def malora_delta_triton(
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    out: torch.Tensor | None = None,
    expert_counts: torch.Tensor | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """out [T, d_out] = the scaled MALoRA delta of every token (0 for tokens without an adapter)."""
    if out is None:
        out = torch.zeros(x.shape[0], bank.d_out, dtype=x.dtype, device=x.device)
    else:
        out.zero_()
    add_malora_delta_triton(out, x, bank, token_slots, expert_counts, mode)
    return out
