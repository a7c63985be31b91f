"""The GGUF block kernels (kernels/native/blocks_cpu.cpp) against a float64 reference: the weights de-quantized by
gguf-py's own numpy code (an implementation independent of ours), fresh random blocks every run, outputs poisoned
with NaN first. Every format, odd shapes, one row to many (the few-row path and the tiled one), both row dtypes, a
bias, an output that is a column range of a wider tensor; a row's result does not depend on the batch it is in or
the thread count; lookups of rows; bad input refused before any pointer is read. Run at every instruction-set
level this CPU has (tests/isa_levels.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from malora_runtime.kernels.native.block_ops import FORMATS, BlockFormat, BlockWeight, block_matmul, block_rows
from malora_runtime.models.block_linear import WIDE_MIN_ROWS, BlockLinear

pytestmark = pytest.mark.isa

DTYPES = [torch.float32, torch.bfloat16]
# Relative to the largest sum of absolute terms (a dot product near zero by cancellation has no relative accuracy
# to give): float32 sums in another order; bfloat16 rows one rounding of the result.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
# Where each format keeps its fp16 scales (d, and m / dmin): random bytes there could be infinities or NaNs.
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(fmt: BlockFormat, out: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """[out, row bytes] of random blocks: every bit pattern of the quants, finite scales of both signs."""
    count = in_features // fmt.values
    raw = rng.integers(0, 256, size=(out, count, fmt.bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[fmt.name]:
        scales = rng.uniform(-0.05, 0.05, size=(out, count)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(out, count, 2)
    return raw.reshape(out, count * fmt.bytes)


def reference(raw: np.ndarray, fmt: BlockFormat) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[fmt.name]).astype(np.float64))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
    """`scale`: the sums of absolute terms behind `want` (default: |want|)."""
    assert not got.isnan().any(), "unwritten (poisoned) elements"
    scale = want.abs() if scale is None else scale
    error = float((got.double() - want).abs().max() / scale.max().clamp_min(1e-6))
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g}"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rows,out", [(1, 1), (1, 37), (2, 9), (3, 19), (4, 8), (5, 13), (64, 8), (70, 21)])
def test_block_matmul_matches_float64(name, dtype, rows, out, rng):
    fmt = FORMATS[name]
    in_features = 2 * 256 + fmt.values * (fmt.values == 32)  # a partial last tile for the 32-value formats
    raw = random_blocks(fmt, out, in_features, rng)
    bias = torch.randn(out) if rows % 2 else None
    weight = BlockWeight(torch.from_numpy(raw), fmt, in_features, bias)
    x = torch.randn(rows, in_features).to(dtype)
    y = torch.full((rows, out), float("nan"), dtype=dtype)
    block_matmul(x, weight, y, threads=2)
    w = reference(raw, fmt)
    want = x.double() @ w.T + (0 if bias is None else bias.double())
    assert_close(y, want, dtype, x.double().abs() @ w.abs().T + (0 if bias is None else bias.double().abs()))


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_a_row_is_the_same_in_every_batch_and_thread_count(name, rng):
    """Seeded sampling needs a row's logits not to depend on what else is in the step: the few-row path and the
    tiled one sum in one order, at any thread count."""
    fmt = FORMATS[name]
    weight = BlockWeight(torch.from_numpy(random_blocks(fmt, 24, 768, rng)), fmt, 768)
    x = torch.randn(70, 768)
    results = []
    for rows, threads in ((1, 1), (3, 2), (5, 1), (70, 2)):
        y = torch.full((rows, 24), float("nan"))
        block_matmul(x[:rows], weight, y, threads)
        results.append(y[0])
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_out_may_be_columns_of_a_wider_tensor(rng):
    fmt = FORMATS["Q8_0"]
    raw = random_blocks(fmt, 10, 64, rng)
    x = torch.randn(3, 64)
    wide = torch.full((3, 30), float("nan"))
    block_matmul(x, BlockWeight(torch.from_numpy(raw), fmt, 64), wide[:, 7:17], threads=2)
    w = reference(raw, fmt)
    assert_close(wide[:, 7:17], x.double() @ w.T, torch.float32, x.double().abs() @ w.abs().T)
    assert wide[:, :7].isnan().all() and wide[:, 17:].isnan().all(), "wrote outside its columns"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_block_rows_looks_up_rows(name, dtype, rng):
    fmt = FORMATS[name]
    raw = random_blocks(fmt, 11, 256, rng)
    weight = BlockWeight(torch.from_numpy(raw), fmt, 256)
    ids = torch.tensor([[10, 0], [3, 3]])
    got = block_rows(weight, ids, dtype)
    assert got.shape == (2, 2, 256) and got.dtype == dtype
    assert_close(got, reference(raw, fmt)[ids], dtype)


def test_quantized_real_weights_match_gguf_quantization(rng):
    """Blocks made by gguf-py's quantizer (real rounding, not random bytes) read back as its de-quantization."""
    values = rng.standard_normal((16, 96)).astype(np.float32)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        fmt = FORMATS[name]
        raw = quantize(values, GGMLQuantizationType[name])
        x = torch.randn(2, 96)
        y = torch.full((2, 16), float("nan"))
        block_matmul(x, BlockWeight(torch.from_numpy(raw), fmt, 96), y, threads=1)
        w = reference(raw, fmt)
        assert_close(y, x.double() @ w.T, torch.float32, x.double().abs() @ w.abs().T)


def test_bad_input_is_refused(rng):
    fmt = FORMATS["Q4_0"]
    raw = torch.from_numpy(random_blocks(fmt, 4, 64, rng))
    with pytest.raises(ValueError, match="multiples of 32"):
        BlockWeight(raw, fmt, 48)
    with pytest.raises(ValueError, match="uint8"):
        BlockWeight(raw[:, :-1], fmt, 64)  # a row one byte short
    with pytest.raises(ValueError, match="bias"):
        BlockWeight(raw, fmt, 64, torch.zeros(5))
    weight = BlockWeight(raw, fmt, 64)
    with pytest.raises(ValueError, match="one dtype"):
        block_matmul(torch.zeros(1, 64), weight, torch.zeros(1, 4, dtype=torch.bfloat16), threads=1)
    with pytest.raises(ValueError, match=r"\[rows, 64\]"):
        block_matmul(torch.zeros(1, 63), weight, torch.zeros(1, 4), threads=1)
    with pytest.raises(ValueError, match="rows"):
        block_matmul(torch.zeros(2, 64), weight, torch.zeros(1, 4), threads=1)
    with pytest.raises(IndexError):
        block_rows(weight, torch.tensor([4]), torch.float32)
    with pytest.raises(IndexError):
        block_rows(weight, torch.tensor([-1]), torch.float32)


@pytest.mark.parametrize("rows", [3, WIDE_MIN_ROWS, 40])
def test_block_linear_at_every_width(rows, rng):
    """BlockLinear in bfloat16: the block kernels for few rows, and from WIDE_MIN_ROWS on CPUs with native bfloat16
    a transient bfloat16 copy through torch: both the de-quantized weight's product, bias included."""
    fmt = FORMATS["Q4_K"]
    raw = random_blocks(fmt, 48, 512, rng)
    bias = torch.randn(48)
    linear = BlockLinear(BlockWeight(torch.from_numpy(raw), fmt, 512, bias))
    x = torch.randn(2, rows, 512).bfloat16()
    y = linear(x)
    assert y.shape == (2, rows, 48) and y.dtype == torch.bfloat16
    w = reference(raw, fmt)
    flat = x.reshape(-1, 512).double()
    assert_close(y.reshape(-1, 48), flat @ w.T + bias.double(), torch.bfloat16, flat.abs() @ w.abs().T)
