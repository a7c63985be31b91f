"""One adapter module's weights in the one layout every kernel reads, in one buffer of exactly its own size.

Why: a slot bank used to copy each adapter into tensors padded to the largest d, r and N ever loaded, for
every slot, plus a copy per kernel layout; one wide adapter inflated every slot of every layer it touched
(150x the adapters' bytes). Now an adapter is packed once, when it is read, and a bank only points at it:
activating a loaded adapter on the CPU writes a row of addresses, not weights.

Layout of the buffer (elements of the adapter's own dtype, row-major, unpadded):

    sgt   [d_in, d + n]   [S; G]^T: column j < d is row j of S, column d + t is the router row of expert t
    pt    [d, n r]        P^T: column t r + rho is row rho of P_t
    bias  [n]             router bias (zeros when the adapter has none)
    bt    [n r, d_out]    B^T: row t r + rho is column rho of B_t
    tail  [TAIL]          room for the native kernel's whole-vector reads past a row's end

`ModuleWeights` views of S, G, P and B into the buffer keep the reference paths and the format's own code
working on the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..adapters.format import MaloraAdapter, ModuleSpec, ModuleWeights
from .reference import ROUTER_SOFTMAX_TOPK

TAIL = 16  # elements: the native kernel reads whole vectors of 16 from a row's start
# Weight dtypes the kernels read, and the code the native kernel and Triton know each by.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class ModuleShape:
    d_in: int
    d_out: int
    d: int
    r: int
    n: int

    @property
    def sg_width(self) -> int:
        return self.d + self.n

    @property
    def offsets(self) -> tuple[int, int, int, int, int]:
        """Element offsets of sgt, pt, bias, bt and the tail."""
        pt = self.d_in * self.sg_width
        bias = pt + self.d * self.n * self.r
        bt = bias + self.n
        return 0, pt, bias, bt, bt + self.n * self.r * self.d_out


@dataclass(eq=False)
class PackedModule:
    """One adapter module, packed (see the module docstring); `buffer` is all of its memory."""

    buffer: torch.Tensor  # 1-D, the adapter's dtype
    shape: ModuleShape
    top_k: int
    scale: float
    router_temperature: float
    softmax_first: bool
    has_router_bias: bool
    _addresses: tuple[int, int, int, int] | None = field(default=None, repr=False)

    @classmethod
    @torch.no_grad()
    def from_weights(cls, weights: ModuleWeights, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> PackedModule:
        """Pack `weights` (a copy) in `dtype` (default: their own) on `device` (default: theirs)."""
        spec = weights.spec
        dtype = dtype or weights.S.dtype
        if dtype not in DTYPE_CODES:
            raise ValueError(f"adapter weights of dtype {dtype} cannot be packed (one of {list(DTYPE_CODES)})")
        shape = ModuleShape(weights.d_in, weights.d_out, spec.d, spec.r, spec.num_experts)
        sgt_at, pt_at, bias_at, bt_at, tail_at = shape.offsets
        buffer = torch.zeros(tail_at + TAIL, dtype=dtype, device=device or weights.S.device)
        packed = cls(buffer, shape, spec.top_k, spec.scale, spec.router_temperature,
                     spec.router_norm == ROUTER_SOFTMAX_TOPK, weights.router_bias is not None)
        packed.sgt[:, :spec.d].copy_(weights.S.T)
        packed.sgt[:, spec.d:].copy_(weights.G.T)
        packed.pt.copy_(weights.P.permute(2, 0, 1).reshape(spec.d, -1))
        if weights.router_bias is not None:
            packed.bias.copy_(weights.router_bias)
        packed.bt.copy_(weights.B.transpose(1, 2).reshape(-1, shape.d_out))
        return packed

    # ---- views ----
    def _part(self, index: int) -> torch.Tensor:
        offsets = self.shape.offsets
        return self.buffer[offsets[index]:offsets[index + 1]]

    @property
    def sgt(self) -> torch.Tensor:
        return self._part(0).view(self.shape.d_in, self.shape.sg_width)

    @property
    def pt(self) -> torch.Tensor:
        return self._part(1).view(self.shape.d, self.shape.n * self.shape.r)

    @property
    def bias(self) -> torch.Tensor:
        return self._part(2)

    @property
    def bt(self) -> torch.Tensor:
        return self._part(3).view(self.shape.n * self.shape.r, self.shape.d_out)

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def addresses(self) -> tuple[int, int, int, int]:
        """Data addresses of sgt, pt, bt and bias, as the kernels' slot tables hold them."""
        if self._addresses is None:
            base, size = self.buffer.data_ptr(), self.buffer.element_size()
            sgt_at, pt_at, bias_at, bt_at, _ = self.shape.offsets
            self._addresses = (base + sgt_at * size, base + pt_at * size, base + bt_at * size, base + bias_at * size)
        return self._addresses

    def weights(self, spec: ModuleSpec) -> ModuleWeights:
        """`spec`'s tensors as views into the buffer (no copy)."""
        s = self.shape
        sgt = self.sgt
        return ModuleWeights(
            spec,
            S=sgt[:, :s.d].T,
            G=sgt[:, s.d:].T,
            P=self.pt.view(s.d, s.n, s.r).permute(1, 2, 0),
            B=self.bt.view(s.n, s.r, s.d_out).transpose(1, 2),
            router_bias=self.bias if self.has_router_bias else None,
            packed=self,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedModule:
        """This module on `device` in `dtype`: itself when nothing changes, else a copy."""
        buffer = self.buffer.to(device=device, dtype=dtype)
        return self if buffer is self.buffer else replace(self, buffer=buffer, _addresses=None)


def packed(weights: ModuleWeights) -> PackedModule:
    """The packed form of `weights`: the one they are views of, else a packed copy."""
    existing = weights.packed
    return existing if isinstance(existing, PackedModule) else PackedModule.from_weights(weights)


def pack_adapter(adapter: MaloraAdapter) -> MaloraAdapter:
    """`adapter` with every module packed, its tensors views into the packed buffers (the unpacked tensors
    are dropped with the old adapter object). Already packed modules are kept as they are."""
    modules = {path: w if isinstance(w.packed, PackedModule) else packed(w).weights(w.spec)
               for path, w in adapter.modules.items()}
    return MaloraAdapter(adapter.config, modules, adapter.source)
