"""A decode step for Llama-style models (Llama, Mistral, Qwen2) with one native call per small operation.

Why: at one row a decode step of the default model spent ~12 of its ~30 ms outside the linear layers, in ~35
small torch ops per layer (docs/BENCHMARKS.md, "Single-stream latency"). This path runs the same layers in
four native calls per layer beside the products (`kernels.native.decode_ops`: residual add + RMS norm, rotary +
KV write, paged attention read in place, SiLU * up), and calls the model's own projection modules for the
products, so packed, quantized and MALoRA-wrapped linears (every adapter, every kernel backend) work unchanged.

transformers' forward with the paged attention (`ModelRunner._forward`) stays the reference and the path for
every step with a prefill and every other model; the runner compares the two at start-up and uses this one only
where they agree (`ModelRunner.probe`). Rounding follows the eager modules step by step, so in float32 they agree
to float error and in bfloat16 to a rounding step at near-ties.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..context import StepContext
from ..engine.attention import KVPool
from ..kernels.native import BLOCK, NativeKernel, bank_view_of, native_kernel, plan_for
from ..kernels.native.decode_ops import (
    DTYPES,
    MAX_GROUP,
    MAX_HEAD_DIM,
    PROJECTIONS,
    DecodeBatch,
    GemvWeight,
    LayerArgs,
    LayerDeltas,
    StepArgs,
    add_rms_norm,
    decode_attention,
    decode_layer,
    rope_store,
    silu_mul,
)
from ..layers import MaloraLinear
from .block_linear import wide_product
from .fused_products import BlockProduct, FusedProduct

SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
DELTA_CALLS_CACHED = 16  # (slot generation, rows' slots) keys: a steady decode reuses one
GEMV_MAX_ROWS = 4
"""Steps of up to this many rows run the base products through the native GEMV (fused q/k/v and gate/up); larger
ones through the projections' packed oneDNN weights, whose cost grows little with rows (docs/BENCHMARKS.md). A model
served from GGUF blocks takes the fused block products at every row count, except the wide bfloat16 products
(`block_linear.WIDE_MIN_ROWS`), which go through its modules."""


@dataclass(frozen=True)
class LayerProducts:
    """A decoder layer's four native products."""

    qkv: FusedProduct
    o: FusedProduct
    gate_up: FusedProduct
    down: FusedProduct

    @classmethod
    def of(cls, layer: nn.Module) -> LayerProducts:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(FusedProduct.of(attn, ["q_proj", "k_proj", "v_proj"]), FusedProduct.of(attn, ["o_proj"]),
                   FusedProduct.of(mlp, ["gate_proj", "up_proj"]), FusedProduct.of(mlp, ["down_proj"]))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot decode through the fast path, or None when its structure fits."""
    config = model.config
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a decoder of the Llama form"
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in DTYPES:
        return f"the fast decode path runs on the CPU in float32 or bfloat16, not {param.device.type} {param.dtype}"
    names = {type(layer).__name__ for layer in layers}
    if not names <= set(SUPPORTED_LAYERS):
        return f"decoder layers {sorted(names)} (the fast decode path knows {', '.join(SUPPORTED_LAYERS)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (the fast decode path computes SiLU)"
    attn = layers[0].self_attn
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    if heads % kv_heads or heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM or head_dim % 2:
        return f"{heads} heads over {kv_heads} KV heads of width {head_dim}"
    return None


class FastDecoder:
    """Decode steps of one model over its runner's KV pool."""

    def __init__(self, model: nn.Module, pool: KVPool, context: StepContext,
                 slot_generation: Callable[[], int]) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.inner = model.model
        self.pool = pool
        self.context = context  # the runner's: which rows have adapters, the delta backend, the routing sink
        # Changes at every write into the adapter banks: the delta calls of one (generation, rows' slots) are the
        # same every step (their plans, descriptors and counters stay put), so they are built once.
        self.slot_generation = slot_generation
        self._delta_calls_cache: dict[tuple, list[ctypes.Array]] = {}
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = [(layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
                    for layer in self.inner.layers]
        self.final_eps = self.inner.norm.variance_epsilon
        self.windows = [self._window(layer) for layer in self.inner.layers]
        self.products = [LayerProducts.of(layer) for layer in self.inner.layers]
        self.block_weights = isinstance(self.products[0].qkv.weight, BlockProduct)
        # The output head (49152 x 576 on the default model, the step's largest weight) through the GEMV only where
        # that measured faster: int8 (1.0-1.5x torch's int8 kernel at 1-2 rows); in bfloat16 and float32 oneDNN's
        # packed product streams it ~1.6x faster (scripts/quant-linear-time.py).
        head = FusedProduct.of(model, ["lm_head"])
        self.head = head if isinstance(head.weight, GemvWeight) and head.weight.weight.dtype == torch.int8 else None
        self.q_width = self.heads * self.inner.layers[0].self_attn.head_dim
        self.kv_width = self.kv_heads * self.inner.layers[0].self_attn.head_dim
        self.layer_args = [self._layer_args(index, layer) for index, layer in enumerate(self.inner.layers)]
        intermediate = self.products[0].gate_up.weight.out_features // 2
        columns = (0, self.q_width, self.q_width + self.kv_width, 0, 0, intermediate, 0)
        # Per layer, each projection as (parent, attribute, first column of its product): the modules are looked up
        # per step, as adapters wrap their target modules when first loaded.
        self.projections = [[(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name, column)
                             for name, column in zip(PROJECTIONS, columns)] for layer in self.inner.layers]

    def _layer_args(self, index: int, layer: nn.Module) -> LayerArgs:
        products = self.products[index]
        for norm in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight):
            if not norm.is_contiguous():
                raise ValueError("the fast decode path reads the norms' weights in place: they must be contiguous")
        return LayerArgs(
            layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
            self.pool.keys[index].data_ptr(), self.pool.values[index].data_ptr(),
            *(p.args for p in (products.qkv, products.o, products.gate_up, products.down)),
            *self.eps[index], layer.self_attn.scaling, self.heads, self.kv_heads, layer.self_attn.head_dim,
            products.gate_up.weight.out_features // 2, self.windows[index] or 0)

    def _window(self, layer: nn.Module) -> int | None:
        # As each family's attention passes it to the attention function (Mistral: the config's for every layer;
        # Qwen2: per layer type).
        if type(layer).__name__ == "MistralDecoderLayer":
            return getattr(self.model.config, "sliding_window", None)
        return getattr(layer.self_attn, "sliding_window", None)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch,
                logit_rows: list[int] | None, row_slots: tuple[int, ...] = ()) -> torch.Tensor:
        """ids, positions [rows] int64 -> float32 logits of `logit_rows` (all rows when None) [n, vocab], the rows'
        adapters as the step context says. Few rows run each layer in one native call, adapters' deltas included
        (through the native delta kernel); more rows, or deltas on another backend, one op at a time. `row_slots`:
        each row's adapter slot, as the step context's TokenSlots holds them (the key of the cached delta calls)."""
        threads = torch.get_num_threads()
        hidden = self.inner.embed_tokens(ids).contiguous()  # [rows, D], a fresh tensor: updated in place below
        cos, sin = self.inner.rotary_emb(hidden, positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [rows, hd], in the model's dtype
        normed = torch.empty_like(hidden)
        native = ids.shape[0] <= GEMV_MAX_ROWS or (
            self.block_weights and not wide_product(ids.shape[0], hidden.dtype))
        deltas = self._delta_calls(row_slots) if native else None
        if native and deltas is not False:
            delta = self._whole_layers(hidden, cos, sin, batch, normed, deltas, threads)
        else:
            delta = self._layer_by_op(hidden, cos, sin, batch, normed, native, threads)
        add_rms_norm(hidden, delta, self.inner.norm.weight, normed, self.final_eps)
        rows = normed if logit_rows is None else normed[logit_rows]
        return (self.head(rows, threads) if native and self.head is not None else self.model.lm_head(rows)).float()

    def _delta_calls(self, row_slots: tuple[int, ...]) -> list[ctypes.Array] | None | bool:
        """Per layer, the native delta kernel's call for each adapted projection this step; None when no row has an
        adapter; False when the deltas run on another backend (then the layers run op by op)."""
        step = self.context
        slots = step.token_slots
        if slots is None or not slots.any_adapter:
            return None
        kernel = native_kernel() if step.backend == "native" else None
        if kernel is None:
            return False
        key = (self.slot_generation(), row_slots, step.routing is not None)
        cached = self._delta_calls_cache.get(key)
        if cached is None:
            if len(self._delta_calls_cache) >= DELTA_CALLS_CACHED:
                self._delta_calls_cache.clear()
            cached = self._delta_calls_cache[key] = self._build_delta_calls(kernel)
        return cached

    def _build_delta_calls(self, kernel: NativeKernel) -> list[ctypes.Array]:
        step = self.context
        slots = step.token_slots
        assert slots is not None
        address = ctypes.cast(kernel.delta, ctypes.c_void_p).value
        routing = step.routing
        layers: list[ctypes.Array] = []
        keep: list[object] = []
        for projections in self.projections:
            calls = LayerDeltas()
            calls.keep = keep
            for index, (parent, name, column) in enumerate(projections):
                module = parent._modules[name]
                if not isinstance(module, MaloraLinear) or module.bank is None:
                    continue
                bank = module.bank
                plan = plan_for(slots, bank)
                if plan.num_items == 0:
                    continue
                counts = routing.sink(module.path, "native") if routing is not None else None
                view = bank_view_of(bank)
                call = calls[index]
                call.kernel, call.bank, call.n_items, call.block = address, view.address, plan.num_items, BLOCK
                call.order, call.items = plan.pointers
                call.column = column
                if counts is not None:
                    call.counts, call.ld_counts = counts.data_ptr(), counts.stride(0)
                keep.extend((plan, view, counts))  # what the calls point into, alive as long as they are cached
            layers.append(calls)
        return layers

    def _whole_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: DecodeBatch,
                      normed: torch.Tensor, deltas: list[ctypes.Array] | None, threads: int) -> torch.Tensor:
        """Every layer in one native call each; returns the last layer's MLP output."""
        rows, dtype = hidden.shape[0], hidden.dtype
        first = self.products[0]
        scratch = {name: torch.empty(rows, width, dtype=dtype) for name, width in (
            ("qkv", first.qkv.weight.out_features), ("attended", self.q_width), ("o", hidden.shape[1]),
            ("gate_up", first.gate_up.weight.out_features), ("activated", first.gate_up.weight.out_features // 2))}
        step = StepArgs(hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), batch.kv_indices.data_ptr(),
                        batch.tables.data_ptr(), batch.lengths.data_ptr(), normed.data_ptr(),
                        *(scratch[name].data_ptr() for name in ("qkv", "attended", "o", "gate_up", "activated")),
                        rows, hidden.shape[1], batch.tables.stride(0), batch.block_size)
        outputs = (torch.empty_like(hidden), torch.empty_like(hidden))  # each layer reads one, writes the other
        delta = None
        for index, args in enumerate(self.layer_args):
            out = outputs[index % 2]
            decode_layer(args, step, delta, out, None if deltas is None else deltas[index], dtype, threads)
            delta = out
        return delta

    def _layer_by_op(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: DecodeBatch,
                     normed: torch.Tensor, native: bool, threads: int) -> torch.Tensor:
        """Every layer op by op, the products through the projections' modules (many rows) or the fused native
        products with each adapted projection's delta added (few rows); returns the last layer's MLP output."""
        delta: torch.Tensor | None = None
        for index, layer in enumerate(self.inner.layers):
            eps_in, eps_post = self.eps[index]
            k_cache, v_cache = self.pool.keys[index], self.pool.values[index]
            add_rms_norm(hidden, delta, layer.input_layernorm.weight, normed, eps_in)
            if native:
                products = self.products[index]
                qkv = products.qkv(normed, threads)
                q, k = qkv[:, :self.q_width], qkv[:, self.q_width:self.q_width + self.kv_width]
                v = qkv[:, self.q_width + self.kv_width:]
            else:
                attn = layer.self_attn
                q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
            rope_store(q, k, v, cos, sin, k_cache, v_cache, batch, self.heads, self.kv_heads)
            attended = torch.empty(q.shape, dtype=q.dtype)
            decode_attention(q, k_cache, v_cache, batch, layer.self_attn.scaling, self.windows[index], attended,
                             threads)
            out = products.o(attended, threads) if native else layer.self_attn.o_proj(attended)
            add_rms_norm(hidden, out, layer.post_attention_layernorm.weight, normed, eps_post)
            if native:
                gate_up = products.gate_up(normed, threads)
                width = gate_up.shape[1] // 2
                gate, up = gate_up[:, :width], gate_up[:, width:]
            else:
                gate, up = layer.mlp.gate_proj(normed), layer.mlp.up_proj(normed)
            activated = torch.empty(gate.shape, dtype=gate.dtype)
            silu_mul(gate, up, activated)
            delta = products.down(activated, threads) if native else layer.mlp.down_proj(activated)
        return delta
