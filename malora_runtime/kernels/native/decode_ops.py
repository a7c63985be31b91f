"""The decode step's small operations through a native library (`decode_cpu.cpp` beside this file).

Each function checks what the library will read through raw pointers (dtype, device, contiguity, shapes) and
raises ValueError before calling it; the checks are on tensor attributes only, as these run for every layer of
every decode step. `decode_ops()` builds and loads the library once; it raises NativeKernelError where it cannot.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_ops import BlockWeight, block_ops
from .build import NativeKernelError, build_library, load_or_error, loaded_or_raise

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
ABI_VERSION = 5
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_GROUP = 8  # query heads per KV head the attention takes
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class DecodeOps:
    """The loaded library's entry points."""

    library: ctypes.CDLL

    @classmethod
    def load(cls, path: Path) -> DecodeOps:
        library = ctypes.CDLL(str(path))
        if library.malora_decode_abi_version() != ABI_VERSION:
            raise NativeKernelError(f"{path}: ABI version {library.malora_decode_abi_version()}, want {ABI_VERSION}")
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        signatures = {
            "malora_add_rms_norm": [p, p, p, p, i64, i64, f32, i32],
            "malora_rope_store": [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32],
            "malora_decode_attention": [p, i64, p, p, p, i64, p, i64, i64, i64, i64, i64, i64, f32, p, i32, i32],
            "malora_silu_mul": [p, p, p, i64, i64, i64, i32],
            "malora_gemv": [p, i64, p, i32, p, p, p, i64, i64, i64, i64, i32, i32],
            "malora_decode_layer": [p, p, p, p, p, i32, i32],
        }
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        return cls(library)


@functools.cache
def _load(level: str | None = None) -> DecodeOps | NativeKernelError:
    return load_or_error(lambda: DecodeOps.load(build_library(SOURCE, level=level)))


def decode_ops(level: str | None = None) -> DecodeOps:
    """The library for instruction-set `level` (default: the served one; `cpu_features`), built and loaded on first
    call; NativeKernelError saying why where it cannot be."""
    return loaded_or_raise(_load(level))


@dataclass(frozen=True)
class DecodeBatch:
    """Where a decode step's rows write and read their K/V, checked once per step against the pool's size (the
    per-layer calls then only check their own tensors). kv_indices [rows] int64: the KV index each row writes; tables
    [rows, blocks] int32: each row's block table; lengths [rows] int64: each row's context with its new token."""

    kv_indices: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    block_size: int

    @classmethod
    def checked(cls, kv_indices: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                cache_entries: int) -> DecodeBatch:
        rows = kv_indices.shape[0] if kv_indices.dim() == 1 else -1
        if kv_indices.dtype != torch.int64 or rows < 1 or not kv_indices.is_contiguous():
            raise ValueError(f"kv_indices: want [rows >= 1] int64, got {tuple(kv_indices.shape)} {kv_indices.dtype}")
        if tables.dtype != torch.int32 or tables.dim() != 2 or tables.shape[0] != rows or tables.stride(1) != 1:
            raise ValueError(f"tables: want [{rows}, blocks] int32 with contiguous rows, got {tuple(tables.shape)} "
                             f"{tables.dtype}")
        if lengths.dtype != torch.int64 or lengths.shape != (rows,) or not lengths.is_contiguous():
            raise ValueError(f"lengths: want [{rows}] int64, got {tuple(lengths.shape)} {lengths.dtype}")
        if not (kv_indices.is_cpu and tables.is_cpu and lengths.is_cpu):
            raise ValueError("the decode batch's indices must be CPU tensors")
        if not (int(kv_indices.min()) >= 0 and int(kv_indices.max()) < cache_entries):
            raise ValueError(f"kv_indices outside the cache's {cache_entries} entries")
        shortest, longest = int(lengths.min()), int(lengths.max())
        if shortest < 1 or longest > tables.shape[1] * block_size:
            raise ValueError(f"lengths must be 1..{tables.shape[1] * block_size} (the tables' blocks), got "
                             f"{shortest}..{longest}")
        if int(tables.min()) < 0 or (int(tables.max()) + 1) * block_size > cache_entries:
            raise ValueError(f"block ids outside the cache's {cache_entries // block_size} blocks")
        return cls(kv_indices, tables, lengths, block_size)


def _dtype_code(*tensors: torch.Tensor) -> int:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            found = [(x.dtype, x.device.type) for x in tensors]
            raise ValueError(f"decode ops take CPU tensors of one dtype, got {found}")
    code = DTYPES.get(dtype)
    if code is None:
        raise ValueError(f"decode ops take float32 or bfloat16, not {dtype}")
    return code


def _rows(t: torch.Tensor, width: int, name: str) -> int:
    """Rows of a [rows, width] tensor whose rows are contiguous (any row stride); checks the layout."""
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1:
        raise ValueError(f"{name}: want [rows, {width}] with contiguous rows, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.shape[0]


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                 eps: float) -> None:
    """hidden += delta (when given, in place, rounded to hidden's dtype); out = RMSNorm(hidden) * weight.
    All [rows, dim] contiguous, weight [dim]."""
    code = _dtype_code(hidden, weight, out, *(() if delta is None else (delta,)))
    rows, dim = hidden.shape
    for t, name in ((hidden, "hidden"), (out, "out"), *(() if delta is None else ((delta, "delta"),))):
        if not t.is_contiguous() or t.shape != hidden.shape:
            raise ValueError(f"{name}: want contiguous {tuple(hidden.shape)}, got {tuple(t.shape)}")
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"weight: want contiguous [{dim}], got {tuple(weight.shape)}")
    decode_ops().library.malora_add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(),
                                             weight.data_ptr(), out.data_ptr(), rows, dim, eps, code)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch, heads: int, kv_heads: int) -> None:
    """Rotary on q [rows, heads * hd] and k [rows, kv_heads * hd] in place (transformers' rotate_half form, cos and
    sin [rows, hd]); then k and v written to the caches [N, kv_heads, hd] at the batch's kv_indices. The caches must be
    at least as large as the one the batch was checked against."""
    code = _dtype_code(q, k, v, cos, sin, k_cache, v_cache)
    head_dim = k_cache.shape[-1]
    rows = _rows(q, heads * head_dim, "q")
    if _rows(k, kv_heads * head_dim, "k") != rows or _rows(v, kv_heads * head_dim, "v") != rows \
            or k.stride(0) != v.stride(0):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q's {rows} rows and one stride")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.shape != (rows, head_dim) or not t.is_contiguous():
            raise ValueError(f"{name}: want contiguous [{rows}, {head_dim}], got {tuple(t.shape)}")
    for cache in (k_cache, v_cache):
        if cache.dim() != 3 or cache.shape[1:] != (kv_heads, head_dim) or not cache.is_contiguous():
            raise ValueError(f"cache: want contiguous [N, {kv_heads}, {head_dim}], got {tuple(cache.shape)}")
    if batch.kv_indices.shape[0] != rows:
        raise ValueError(f"q has {rows} rows, the batch {batch.kv_indices.shape[0]}")
    result = decode_ops().library.malora_rope_store(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), batch.kv_indices.data_ptr(), rows, heads, kv_heads, head_dim, q.stride(0), k.stride(0),
        code)
    if result != 0:
        raise ValueError(f"rope_store does not take head_dim {head_dim}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch,
                     scale: float, window: int | None, out: torch.Tensor, threads: int) -> None:
    """out [rows, heads * hd] = softmax(q K^T * scale) V per row and head, each row over the first lengths[i] keys
    of its context (the last `window` of them with a sliding window), read through its block table in the caches
    [N, kv_heads, hd] (at least as large as the one the batch was checked against). q [rows, heads * hd] with
    contiguous rows (a column range of a wider product is fine), out contiguous."""
    code = _dtype_code(q, k_cache, v_cache, out)
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    rows = q.shape[0]
    heads = q.shape[1] // head_dim if q.dim() == 2 else 0
    if not (q.stride(-1) == 1 and out.is_contiguous() and out.shape == q.shape and heads * head_dim == q.shape[1]):
        raise ValueError(f"q and out: want [rows, heads * {head_dim}] with contiguous rows, got {tuple(q.shape)}, "
                         f"{tuple(out.shape)}")
    if heads % kv_heads or heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention takes up to {MAX_GROUP} query heads per KV head and head_dim up to "
                         f"{MAX_HEAD_DIM}: got {heads} heads, {kv_heads} KV heads, head_dim {head_dim}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
        raise ValueError("the caches must be contiguous and of one shape")
    if batch.kv_indices.shape[0] != rows:
        raise ValueError(f"q has {rows} rows, the batch {batch.kv_indices.shape[0]}")
    decode_ops().library.malora_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), batch.tables.data_ptr(),
        batch.tables.stride(0),
        batch.lengths.data_ptr(), rows, heads, kv_heads, head_dim, batch.block_size, window or 0, scale,
        out.data_ptr(), code, threads)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """out [rows, width] = silu(gate) * up (gate and up [rows, width], contiguous rows, one row stride)."""
    code = _dtype_code(gate, up, out)
    rows, width = out.shape
    if not out.is_contiguous() or _rows(gate, width, "gate") != rows or _rows(up, width, "up") != rows \
            or gate.stride(0) != up.stride(0):
        raise ValueError(f"gate {tuple(gate.shape)}, up {tuple(up.shape)} and out {tuple(out.shape)} do not match")
    decode_ops().library.malora_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), rows, width,
                                         gate.stride(0), code)


WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


@dataclass(frozen=True)
class GemvWeight:
    """A weight for `gemv`, checked once: [out, in] contiguous float32, bfloat16 or int8 (int8 with float32 scales
    per output), with an optional float32 bias [out]."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        weight, scales, bias = self.weight, self.scales, self.bias
        if weight.dtype not in WEIGHT_DTYPES or weight.dim() != 2 or not weight.is_contiguous() or not weight.is_cpu:
            raise ValueError(f"weight: want a contiguous CPU [out, in] float32, bfloat16 or int8 tensor, got "
                             f"{tuple(weight.shape)} {weight.dtype}")
        if (weight.dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 weights take per-output scales; other weights none")
        for extra, name in ((scales, "scales"), (bias, "bias")):
            if extra is not None and (extra.dtype != torch.float32 or extra.shape != weight.shape[:1]
                                      or not extra.is_contiguous() or not extra.is_cpu):
                raise ValueError(f"{name}: want contiguous [{weight.shape[0]}] float32, got {tuple(extra.shape)} "
                                 f"{extra.dtype}")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def gemv(x: torch.Tensor, weight: GemvWeight, out: torch.Tensor, threads: int) -> None:
    """out [rows, o] = x [rows, i] W^T (* scales) (+ bias), W [o, i]: x and out float32 or bfloat16 of one dtype
    with contiguous rows (out may be a column range of a wider tensor). Meant for a few rows: each weight is read
    once per four rows, so from ~8 rows on oneDNN's packed product is the faster one."""
    code = _dtype_code(x, out)
    rows = _rows(x, weight.in_features, "x")
    if _rows(out, weight.out_features, "out") != rows:
        raise ValueError(f"out has {out.shape[0]} rows, x {rows}")
    scales, bias = weight.scales, weight.bias
    decode_ops().library.malora_gemv(x.data_ptr(), x.stride(0), weight.weight.data_ptr(),
                                     WEIGHT_DTYPES[weight.weight.dtype],
                                     None if scales is None else scales.data_ptr(),
                                     None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows,
                                     weight.in_features, weight.out_features, code, threads)


BLOCK_WEIGHTS = 16  # a block weight's weight_dtype in `struct Product`: this + its ggml type id


class ProductArgs(ctypes.Structure):
    """Mirrors `struct Product` in decode_cpu.cpp: a GemvWeight or a BlockWeight by address, or parts side by side
    (`parts`: the address of a ProductArgs array its owner keeps alive)."""

    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64), ("weight_dtype", ctypes.c_int64),
                ("block_kernel", ctypes.c_void_p), ("parts", ctypes.c_void_p), ("n_parts", ctypes.c_int64)]

    @classmethod
    def of(cls, weight: GemvWeight) -> ProductArgs:
        return cls(weight.weight.data_ptr(), None if weight.scales is None else weight.scales.data_ptr(),
                   None if weight.bias is None else weight.bias.data_ptr(), weight.in_features, weight.out_features,
                   WEIGHT_DTYPES[weight.weight.dtype], None, None, 0)

    @classmethod
    def of_blocks(cls, weight: BlockWeight) -> ProductArgs:
        return cls(weight.blocks.data_ptr(), None, None if weight.bias is None else weight.bias.data_ptr(),
                   weight.in_features, weight.out_features, BLOCK_WEIGHTS + weight.format.ggml_type,
                   block_ops().matmul_address, None, 0)


class LayerArgs(ctypes.Structure):
    """Mirrors `struct LayerArgs`: a decoder layer's weights, caches and shape, by address. Whoever builds one keeps
    the tensors it points at alive and unchanged (the fast decoder holds them for the model's life)."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("qkv", ProductArgs), ("o", ProductArgs), ("gate_up", ProductArgs),
                ("down", ProductArgs), ("eps_in", ctypes.c_double), ("eps_post", ctypes.c_double),
                ("scale", ctypes.c_double), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("window", ctypes.c_int64)]


class StepArgs(ctypes.Structure):
    """Mirrors `struct StepArgs`: one step's rows, the residual stream, rotary tables, KV indices and scratch."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("hidden", "cos", "sin", "kv_indices", "tables", "lengths",
                                                      "normed", "qkv", "attended", "o", "gate_up", "activated")] + [
        (name, ctypes.c_int64) for name in ("rows", "dim", "ld_table", "block_size")]


class DeltaCall(ctypes.Structure):
    """Mirrors `struct DeltaCall`: one adapted projection's MALoRA delta this step, through the delta kernel's
    entry point (`kernels.native`): its bank descriptor, the step's work items, where routing is counted, and the
    projection's first column in its (fused) product. A null `kernel`: no delta."""

    _fields_ = [("kernel", ctypes.c_void_p), ("bank", ctypes.c_void_p), ("order", ctypes.c_void_p),
                ("items", ctypes.c_void_p), ("n_items", ctypes.c_int64), ("block", ctypes.c_int64),
                ("counts", ctypes.c_void_p), ("ld_counts", ctypes.c_int64), ("column", ctypes.c_int64)]


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # `enum Projection`
LayerDeltas = DeltaCall * len(PROJECTIONS)


def decode_layer(layer: LayerArgs, step: StepArgs, delta: torch.Tensor | None, out_delta: torch.Tensor,
                 deltas: ctypes.Array | None, dtype: torch.dtype, threads: int) -> None:
    """One whole decoder layer in one native call (`decode_layer` in decode_cpu.cpp): hidden += delta (the
    previous layer's MLP output; None for the first layer), then attention and MLP as the per-op path runs them,
    each adapted projection's MALoRA delta (`deltas`, or None: no adapter token) added after its product, the MLP
    output written to out_delta. Unchecked: the caller (models.fast_decode) builds every tensor the structs point
    at with the shapes the structs say. Raises ValueError when the delta kernel meets a weight dtype it does not
    read."""
    status = decode_ops().library.malora_decode_layer(
        ctypes.byref(layer), ctypes.byref(step), None if delta is None else delta.data_ptr(), out_delta.data_ptr(),
        None if deltas is None else ctypes.byref(deltas), DTYPES[dtype], threads)
    if status != 0:
        raise ValueError(f"the native decode layer failed (status {status}): an adapter of a weight dtype the "
                         "delta kernel does not read")
