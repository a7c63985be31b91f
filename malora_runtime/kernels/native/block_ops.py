"""Products and embedding lookups over a GGUF file's quantized blocks, through a native library (`blocks_cpu.cpp`).

A `BlockWeight` is a weight [out, in] kept as the file stores it: each row a run of blocks (e.g. Q4_1: 32 values in
20 bytes), in a uint8 tensor [out, row_bytes] (a view of the file's memory map, or a copy of the rows). The
kernels de-quantize tiles of it into float32 inside the product (`block_matmul`) or per looked-up row
(`block_rows`): the model's float weights are never materialised.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import NativeKernelError, build_library, load_or_error, loaded_or_raise

SOURCE = Path(__file__).with_name("blocks_cpu.cpp")
ABI_VERSION = 2
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@dataclass(frozen=True)
class BlockFormat:
    """One of llama.cpp's block formats: its ggml type id, values and bytes per block."""

    name: str
    ggml_type: int
    values: int
    bytes: int


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 2, 32, 18), BlockFormat("Q4_1", 3, 32, 20), BlockFormat("Q5_0", 6, 32, 22),
    BlockFormat("Q5_1", 7, 32, 24), BlockFormat("Q8_0", 8, 32, 34), BlockFormat("Q4_K", 12, 256, 144),
    BlockFormat("Q5_K", 13, 256, 176), BlockFormat("Q6_K", 14, 256, 210),
)}


@dataclass(frozen=True)
class BlockOps:
    """The loaded library's entry points."""

    library: ctypes.CDLL

    @classmethod
    def load(cls, path: Path) -> BlockOps:
        library = ctypes.CDLL(str(path))
        if library.malora_blocks_abi_version() != ABI_VERSION:
            raise NativeKernelError(f"{path}: ABI version {library.malora_blocks_abi_version()}, want {ABI_VERSION}")
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {
            "malora_block_matmul": [p, i64, p, i64, p, p, i64, i64, i64, i64, i32, i32],
            "malora_block_rows": [p, i64, i64, i64, p, i64, p, i32, i32],
            "malora_block_format": [i64, p, p],
        }
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        for fmt in FORMATS.values():  # the library and this table must agree on every layout
            values, size = ctypes.c_int64(), ctypes.c_int64()
            library.malora_block_format(fmt.ggml_type, ctypes.byref(values), ctypes.byref(size))
            if (values.value, size.value) != (fmt.values, fmt.bytes):
                raise NativeKernelError(f"{path}: {fmt.name} has {values.value} values in {size.value} bytes there, "
                                        f"{fmt.values} in {fmt.bytes} here")
        return cls(library)

    @property
    def matmul_address(self) -> int:
        """`malora_block_matmul`'s address: the decode layer (`decode_cpu.cpp`) calls it for block products."""
        return ctypes.cast(self.library.malora_block_matmul, ctypes.c_void_p).value


@functools.cache
def _load(level: str | None = None) -> BlockOps | NativeKernelError:
    return load_or_error(lambda: BlockOps.load(build_library(SOURCE, level=level)))


def block_ops(level: str | None = None) -> BlockOps:
    """The library for instruction-set `level` (default: the served one), built and loaded on first call;
    NativeKernelError saying why where it cannot be."""
    return loaded_or_raise(_load(level))


@dataclass(frozen=True)
class BlockWeight:
    """A weight [out_features, in_features] as blocks of `format`: `blocks` uint8 [out, row bytes], contiguous,
    with an optional float32 bias [out]. Checked once, here."""

    blocks: torch.Tensor
    format: BlockFormat
    in_features: int
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        blocks, fmt, bias = self.blocks, self.format, self.bias
        if self.in_features < 1 or self.in_features % fmt.values:
            raise ValueError(f"{fmt.name} rows hold multiples of {fmt.values} values, not {self.in_features}")
        row_bytes = self.in_features // fmt.values * fmt.bytes
        if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes
                or not blocks.is_contiguous() or not blocks.is_cpu):
            raise ValueError(f"blocks: want a contiguous CPU uint8 tensor [out, {row_bytes}] ({self.in_features} "
                             f"{fmt.name} values a row), got {tuple(blocks.shape)} {blocks.dtype}")
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (blocks.shape[0],)
                                 or not bias.is_contiguous() or not bias.is_cpu):
            raise ValueError(f"bias: want contiguous [{blocks.shape[0]}] float32, got {tuple(bias.shape)} {bias.dtype}")

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]


def _rows(t: torch.Tensor, width: int, name: str) -> int:
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1 or not t.is_cpu:
        raise ValueError(f"{name}: want a CPU [rows, {width}] tensor with contiguous rows, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.shape[0]


def block_matmul(x: torch.Tensor, weight: BlockWeight, out: torch.Tensor, threads: int,
                 level: str | None = None) -> None:
    """out [rows, o] = x [rows, i] W^T (+ bias): x and out float32 or bfloat16 of one dtype, contiguous rows (out
    may be a column range of a wider tensor). Any row count: tiles of W are de-quantized once per 64 rows."""
    if x.dtype != out.dtype or x.dtype not in DTYPES:
        raise ValueError(f"x and out: want one dtype of float32 or bfloat16, got {x.dtype} and {out.dtype}")
    rows = _rows(x, weight.in_features, "x")
    if _rows(out, weight.out_features, "out") != rows:
        raise ValueError(f"out has {out.shape[0]} rows, x {rows}")
    bias = weight.bias
    status = block_ops(level).library.malora_block_matmul(
        x.data_ptr(), x.stride(0), weight.blocks.data_ptr(), weight.format.ggml_type,
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows, weight.in_features,
        weight.out_features, DTYPES[x.dtype], threads)
    if status != 0:
        raise ValueError(f"block_matmul refused {weight.format.name} [{weight.out_features}, {weight.in_features}]")


def block_rows(weight: BlockWeight, ids: torch.Tensor, dtype: torch.dtype, threads: int = 1,
               level: str | None = None) -> torch.Tensor:
    """The rows `ids` (any shape, int64) of W de-quantized: [*ids.shape, in] in `dtype` (an embedding lookup, or the
    whole weight for a wide product). IndexError for an id outside [0, out_features)."""
    if dtype not in DTYPES:
        raise ValueError(f"block_rows gives float32 or bfloat16, not {dtype}")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], weight.in_features, dtype=dtype)
    status = block_ops(level).library.malora_block_rows(
        weight.blocks.data_ptr(), weight.format.ggml_type, weight.in_features, weight.out_features, flat.data_ptr(),
        flat.shape[0], out.data_ptr(), DTYPES[dtype], threads)
    if status == -2:
        raise IndexError(f"an id outside the {weight.out_features} rows")
    if status != 0:
        raise ValueError(f"block_rows refused {weight.format.name} [{weight.out_features}, {weight.in_features}]")
    return out.view(*ids.shape, weight.in_features)
