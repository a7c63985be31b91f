"""The native decode ops (kernels/native/decode_cpu.cpp) against float64 references on fresh random inputs: outputs
poisoned with NaN first, so an element the kernel does not write shows; odd sizes, one row and several, both row
dtypes, every weight format of the GEMV, grouped-query attention with sliding windows over scattered blocks; bad
shapes are ValueErrors before any pointer is read."""

from __future__ import annotations

import math

import pytest
import torch

from malora_runtime.kernels.native.decode_ops import (
    DecodeBatch,
    GemvWeight,
    add_rms_norm,
    decode_attention,
    gemv,
    rope_store,
    silu_mul,
)
from malora_runtime.models.quantized_linear import int8_per_channel

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)

DTYPES = [torch.float32, torch.bfloat16]
# Relative bounds: float32 sums in another order; bfloat16 rows hold 8 significant bits (one rounding of the
# result, and of the inputs for the references below).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, terms: torch.Tensor | None = None) -> None:
    """`terms`: the sums of absolute terms behind `want` (default |want|): a sum that cancels to near zero has no
    relative accuracy to give (a 1 x 1 product plus a bias of the opposite sign failed at 1e-4 here)."""
    assert not got.isnan().any(), "unwritten (poisoned) elements"
    scale = (want.abs() if terms is None else terms).max().clamp_min(1e-6)
    error = float((got.double() - want).abs().max() / scale)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_format", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rows,d_in,d_out", [(1, 1, 1), (1, 33, 7), (2, 31, 9), (3, 576, 65), (4, 64, 8),
                                             (5, 577, 130), (1, 1536, 576)])
def test_gemv_matches_float64(dtype, weight_format, rows, d_in, d_out):
    x = torch.randn(rows, d_in).to(dtype)
    raw = torch.randn(d_out, d_in)
    bias = torch.randn(d_out) if d_out % 2 else None
    if weight_format == "int8":
        q, scales = int8_per_channel(raw)
        weight = GemvWeight(q, scales, bias)
        dense = q.double() * scales.double()[:, None]
    else:
        w = raw.to(getattr(torch, weight_format))
        weight = GemvWeight(w, None, bias)
        dense = w.double()
    want = x.double() @ dense.T + (0 if bias is None else bias.double())
    # The output as a column range of a wider tensor (the fused q/k/v case): the columns around it stay poisoned.
    wide = poisoned(rows, d_out + 5, dtype=dtype)
    gemv(x, weight, wide[:, 2:2 + d_out], threads=2)
    terms = x.double().abs() @ dense.abs().T + (0 if bias is None else bias.double().abs())
    assert_close(wide[:, 2:2 + d_out], want, dtype, terms)
    assert wide[:, :2].isnan().all() and wide[:, 2 + d_out:].isnan().all()


def test_gemv_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="scales"):
        GemvWeight(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="scales"):
        GemvWeight(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        GemvWeight(torch.zeros(4, 8)[:, ::2])
    weight = GemvWeight(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="x"):
        gemv(torch.zeros(1, 7), weight, torch.zeros(1, 4), 1)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(2, 8), weight, torch.zeros(1, 4), 1)
    with pytest.raises(ValueError, match="one dtype"):
        gemv(torch.zeros(1, 8), weight, torch.zeros(1, 4, dtype=torch.bfloat16), 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("dim", [576, 577])  # vectors of 16, and the scalar path
def test_add_rms_norm_matches_the_models_norm(dtype, with_delta, dim):
    rows, eps = 3, 1e-5
    hidden = torch.randn(rows, dim).to(dtype)
    delta = torch.randn(rows, dim).to(dtype) if with_delta else None
    weight = (torch.rand(dim) + 0.5).to(dtype)
    # transformers' LlamaRMSNorm after `residual + hidden`, in the rows' dtype.
    summed = hidden + delta if with_delta else hidden.clone()
    h32 = summed.float()
    want = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    out = poisoned(rows, dim, dtype=dtype)
    add_rms_norm(hidden, delta, weight, out, eps)
    assert torch.equal(hidden, summed)
    assert_close(out, want.double(), dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def random_batch(lengths: list[int], block_size: int, num_blocks: int) -> DecodeBatch:
    """Each row's blocks scattered over the pool (no two rows share one); the new token at position length - 1."""
    order = torch.randperm(num_blocks).tolist()
    width = max(-(-n // block_size) for n in lengths)
    tables, kv_indices = [], []
    for n in lengths:
        blocks = [order.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks + [0] * (width - len(blocks)))
        kv_indices.append(blocks[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    return DecodeBatch.checked(torch.tensor(kv_indices), torch.tensor(tables, dtype=torch.int32),
                               torch.tensor(lengths), block_size, num_blocks * block_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 24])  # halves of 16 lanes, and the scalar path
def test_rope_store_rotates_q_and_k_and_writes_k_and_v(dtype, head_dim):
    heads, kv_heads, block_size = 6, 2, 4
    batch = random_batch([1, 7, 13], block_size, 12)
    rows, kv_width = 3, kv_heads * head_dim
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim).to(dtype)  # one fused product's output
    q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:heads * head_dim + kv_width]
    v = qkv[:, heads * head_dim + kv_width:]
    angles = torch.rand(rows, head_dim // 2) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)

    def rotated(x: torch.Tensor, n: int) -> torch.Tensor:  # transformers' apply_rotary_pos_emb, in the rows' dtype
        x = x.reshape(rows, n, head_dim)
        return (x * cos[:, None] + rotate_half(x) * sin[:, None]).reshape(rows, -1)

    want_q, want_k, want_v = rotated(q, heads), rotated(k, kv_heads), v.clone()
    k_cache, v_cache = (poisoned(12 * block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    rope_store(q, k, v, cos, sin, k_cache, v_cache, batch, heads, kv_heads)
    assert_close(q, want_q.double(), dtype)
    assert_close(k, want_k.double(), dtype)
    written = batch.kv_indices
    assert torch.equal(k_cache[written].reshape(rows, -1), k)
    assert torch.equal(v_cache[written].reshape(rows, -1), want_v)
    untouched = torch.ones(k_cache.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (9, 3, 64), (8, 1, 40)])
def test_decode_attention_matches_float64(dtype, window, heads, kv_heads, head_dim):
    block_size, num_blocks = 4, 40
    lengths = [1, 5, 17, 33]
    batch = random_batch(lengths, block_size, num_blocks)
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(len(lengths), heads * head_dim).to(dtype)
    scale = head_dim ** -0.5
    out = poisoned(len(lengths), heads * head_dim, dtype=dtype)
    decode_attention(q, k_cache, v_cache, batch, scale, window, out, threads=2)
    group = heads // kv_heads
    for row, n in enumerate(lengths):
        positions = torch.arange(n)
        indices = batch.tables[row].long()[positions // block_size] * block_size + positions % block_size
        first = 0 if window is None else max(0, n - window)
        keys, values = k_cache[indices[first:]].double(), v_cache[indices[first:]].double()  # [L, kv_heads, hd]
        query = q[row].double().view(heads, head_dim)
        scores = torch.einsum("hd,lhd->hl", query, keys.repeat_interleave(group, dim=1)) * scale
        want = torch.einsum("hl,lhd->hd", scores.softmax(-1), values.repeat_interleave(group, dim=1))
        assert_close(out[row].view(heads, head_dim), want, dtype)


def test_decode_batch_and_attention_refuse_bad_input():
    with pytest.raises(ValueError, match="blocks"):
        DecodeBatch.checked(torch.tensor([0]), torch.tensor([[99]], dtype=torch.int32), torch.tensor([1]), 4, 16)
    with pytest.raises(ValueError, match="lengths"):
        DecodeBatch.checked(torch.tensor([0]), torch.tensor([[0]], dtype=torch.int32), torch.tensor([5]), 4, 16)
    with pytest.raises(ValueError, match="kv_indices"):
        DecodeBatch.checked(torch.tensor([16]), torch.tensor([[0]], dtype=torch.int32), torch.tensor([1]), 4, 16)
    with pytest.raises(ValueError, match="int32"):
        DecodeBatch.checked(torch.tensor([0]), torch.tensor([[0]]), torch.tensor([1]), 4, 16)
    batch = DecodeBatch.checked(torch.tensor([0]), torch.tensor([[0]], dtype=torch.int32), torch.tensor([1]), 4, 16)
    cache = torch.zeros(16, 2, 8)
    with pytest.raises(ValueError, match="query heads per KV head"):
        decode_attention(torch.zeros(1, 18 * 8), cache, cache, batch, 1.0, None, torch.zeros(1, 18 * 8), 1)
    with pytest.raises(ValueError, match="rows"):
        decode_attention(torch.zeros(2, 16), cache, cache, batch, 1.0, None, torch.zeros(2, 16), 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_models_mlp(dtype):
    rows, width = 3, 131
    gate_up = torch.randn(rows, 2 * width).to(dtype) * 4
    gate, up = gate_up[:, :width], gate_up[:, width:]
    want = torch.nn.functional.silu(gate) * up  # in the rows' dtype, as transformers' MLP computes it
    out = poisoned(rows, width, dtype=dtype)
    silu_mul(gate, up, out)
    assert_close(out, want.double(), dtype)
    assert math.isfinite(float(out.float().sum()))
