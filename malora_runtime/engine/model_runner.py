"""Runs the base model on one packed batch: builds the step's metadata, runs transformers' own
modeling code with our paged attention and wrapped linears, and returns the logits to sample from."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EngineConfig
from ..context import StepContext
from ..kernels.dispatch import choose_backend
from ..kernels.native.build import NativeKernelError
from ..kernels.native.decode_ops import DecodeBatch, decode_ops
from ..kernels.token_slots import NO_SLOT, TokenSlots
from ..models.block_linear import describe_weights
from ..models.compat import check_config, conv1d_to_linear, probe_failure, probe_tokens, reference_forward
from ..models.fast_decode import FastDecoder, unsupported_reason
from ..models.packed_linear import PACKABLE_DTYPES, pack_linears
from ..models.quantized_linear import check_quantization, quantize_linears
from ..patching import wrapped_layers
from .adapter_slots import AdapterSlots
from .allocator import keep_freed_memory
from .attention import ATTENTION_NAME, AttentionMetadata, KVPool, PrefillSpan
from .routing_stats import RoutingStats

log = logging.getLogger(__name__)

# How far the fast decode path's logits may be from transformers' forward at the start-up probe, relative to the
# logits' mean spread: float error in float32; in bfloat16 sums run in another order and --quantization int8's
# one-row product is torch's kernel in one path and the native GEMV in the other (measured 0 and 0.06-0.09 on the
# default model); a path that computes something else is refused (tests/engine/test_fast_decode.py: one that drops
# the residual adds).
FAST_DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.15}


@dataclass
class Chunk:
    """Tokens of one sequence computed in this step: positions [start, start + len(token_ids))."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    adapter_slot: int
    needs_logits: bool
    prompt: bool = False
    """Computes prompt tokens (a prefill chunk, however short). Such a step runs transformers' forward even for one
    token, so a prompt's first output token does not depend on how much of the prompt the prefix cache held."""


@dataclass(frozen=True)
class KVGeometry:
    """What one token's K/V holds per layer: heads and their width (GPT-2's config names no KV heads: as many as
    the query heads)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KVGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    kv = KVGeometry.of(model.config)
    per_token = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * torch.finfo(dtype).bits // 8
    return per_token * block_size


class ModelRunner:
    """Owns the model, its KV pool and its adapter slots; `run` executes one step."""

    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        check_config(model)
        conv1d_to_linear(model)
        model.set_attn_implementation(ATTENTION_NAME)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or max(
            2, config.kv_cache_memory // kv_bytes_per_block(model, self.block_size, self.dtype))
        kv = KVGeometry.of(model.config)
        self.pool = KVPool.allocate(kv.num_layers, self.num_blocks, self.block_size, kv.num_kv_heads, kv.head_dim,
                                    self.dtype, self.device)
        self.context = StepContext()
        self.routing = RoutingStats(enabled=config.count_expert_routing)
        # Layers wrapped earlier (offline generation) must read this runner's per-step context, and the paged
        # attention reads its metadata from it too.
        for layer in wrapped_layers(model).values():
            layer.context, layer.adapter = self.context, None
        for module in model.modules():
            if hasattr(module, "layer_idx"):
                module.malora_context = self.context
        self.adapters = AdapterSlots(model, self.context, self.routing, config.max_loaded_adapters,
                                     memory_budget=config.adapter_bank_memory)
        if config.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        if config.quantization == "int8":
            check_quantization(config.quantization, self.device, self.dtype)
        if config.pack_cpu_linears and self.device.type == "cpu" and self.dtype in PACKABLE_DTYPES:
            log.info("packed %d base linear layers for oneDNN", pack_linears(model))
            if config.quantization == "int8":
                log.info("%s copies of %d base linear layers for one-row decode", config.quantization,
                         quantize_linears(model, config.quantization))

        self.weights = describe_weights(model)
        log.info("base weights: %s", self.weights)
        # Resolved now, not at the first request: builds the native kernel once per machine (a second or
        # two) and refuses a bad MALORA_KERNEL_BACKEND at start-up.
        log.info("MALoRA delta kernels: %s", choose_backend(torch.empty(0, device=self.device)))
        log.info("KV pool: %d blocks of %d tokens (%.0f MiB)", self.num_blocks, self.block_size,
                 self.num_blocks * kv_bytes_per_block(model, self.block_size, self.dtype) / 2**20)
        self.fast_decoder = self._fast_decoder() if config.fast_decode else None
        self.probe()

    def _fast_decoder(self) -> FastDecoder | None:
        reason = unsupported_reason(self.model)
        if reason is None:
            try:
                decode_ops()  # built once per machine, like the delta kernel
            except NativeKernelError as exc:
                reason = f"the native decode library is unavailable: {exc}"
        if reason is not None:
            log.info("fast decode path off: %s", reason)
            return None
        return FastDecoder(self.model, self.pool, self.context, lambda: self.adapters.generation)

    def probe(self) -> None:
        """Before serving: prefill two tokens, decode a third, and compare with the model's own forward. A model
        whose layers do not all attend through the paged attention, that fails in it, or that keeps other state
        between steps is refused now (`UnsupportedModelError`) rather than wrong or failing per request."""
        tokens = probe_tokens(self.model)
        blocks = list(range(-(-len(tokens) // self.block_size)))
        layers_seen: set[int] = set()
        served = reference = error = None
        try:
            for chunk in (Chunk(tokens[:-1], 0, blocks, NO_SLOT, True), Chunk(tokens[-1:], len(tokens) - 1, blocks,
                                                                                 NO_SLOT, True)):
                ids, positions, meta, token_slots, logit_rows = self.prepare([chunk])
                meta.layers_seen = layers_seen
                served = self._forward(ids, positions, meta, token_slots, logit_rows)[0]
            reference = reference_forward(self.model, tokens, ATTENTION_NAME)
        except Exception as exc:  # any failure here is the model's: reported as the reason it is refused
            error = exc
        finally:
            self.clear_kv_blocks(blocks)
        refusal = probe_failure(self.model, error, layers_seen, served, reference)
        if refusal is not None:
            raise refusal from error
        if self.fast_decoder is not None:
            self._probe_fast_decoder(tokens, blocks, served)

    def _probe_fast_decoder(self, tokens: list[int], blocks: list[int], served: torch.Tensor) -> None:
        """The same two steps with the decode through the fast path: kept only when its logits are the reference
        path's (to float error in float32; bfloat16 rounds differently at near-ties only)."""
        fast = None
        try:
            self._forward(*self.prepare([Chunk(tokens[:-1], 0, blocks, NO_SLOT, True)]))
            fast = self._fast_forward([Chunk(tokens[-1:], len(tokens) - 1, blocks, NO_SLOT, True)])[0]
        except Exception:  # a failure here turns the fast path off; the reference path serves
            log.exception("fast decode path off: its start-up step failed")
        finally:
            self.clear_kv_blocks(blocks)
        if fast is None:
            self.fast_decoder = None
            return
        spread = (served - served.mean()).abs().mean().clamp_min(1e-6)
        distance = float((fast - served).abs().mean() / spread)
        if not distance <= FAST_DECODE_TOLERANCE[self.dtype]:
            log.warning("fast decode path off: its decode logits differ from transformers' forward by %.3g "
                        "(relative; allowed %g)", distance, FAST_DECODE_TOLERANCE[self.dtype])
            self.fast_decoder = None
        else:
            log.info("fast decode path on (decode logits within %.2g of transformers' forward)", distance)

    def _kv_indices_for(self, chunk: Chunk) -> list[int]:
        # kv_cache.kv_index, inlined: this runs for every token of every step.
        bs, table = self.block_size, chunk.block_table
        return [table[p // bs] * bs + p % bs for p in range(chunk.start, chunk.start + len(chunk.token_ids))]

    def _context_kv_indices(self, tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """KV indices of each sequence's first `length` tokens, padded: ([B, Lmax] int64, [B, Lmax] bool).
        (`kv_index` for whole block tables at once.)"""
        bs = self.block_size
        longest = max(lengths)
        num_blocks = -(-longest // bs)
        padded = [t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in tables]
        table = torch.tensor(padded, dtype=torch.int64)  # [B, num_blocks]
        indices = (table[:, :, None] * bs + torch.arange(bs)).reshape(len(tables), -1)[:, :longest]
        valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        return indices.masked_fill(~valid, 0).to(self.device), valid.to(self.device)

    def prepare(
        self, chunks: list[Chunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """(input ids [1, T], positions [1, T], attention metadata, adapter slot per token, rows to sample)."""
        input_ids: list[int] = []
        positions: list[int] = []
        kv_indices: list[int] = []
        token_slots: list[int] = []
        logit_rows: list[int] = []
        decode_rows: list[int] = []
        decode_chunks: list[Chunk] = []
        prefills: list[PrefillSpan] = []
        for chunk in chunks:
            row = len(input_ids)
            n = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            kv_indices.extend(self._kv_indices_for(chunk))
            token_slots.extend([chunk.adapter_slot] * n)
            if chunk.needs_logits:
                logit_rows.append(row + n - 1)
            if n == 1:
                decode_rows.append(row)
                decode_chunks.append(chunk)
            elif chunk.start == 0:
                prefills.append(PrefillSpan(row, n, None))
            else:
                context, _ = self._context_kv_indices([chunk.block_table], [chunk.start + n])
                prefills.append(PrefillSpan(row, n, context[0]))
        meta = AttentionMetadata(self.pool, torch.tensor(kv_indices, dtype=torch.int64, device=self.device),
                                 prefills=prefills)
        if decode_rows:
            indices, valid = self._context_kv_indices([c.block_table for c in decode_chunks],
                                                      [c.start + 1 for c in decode_chunks])
            meta.decode_rows = torch.tensor(decode_rows, dtype=torch.int64, device=self.device)
            meta.decode_kv_indices = indices
            meta.decode_mask = valid[:, None, None, :]
            meta.decode_lengths = torch.tensor([c.start + 1 for c in decode_chunks], dtype=torch.int64,
                                               device=self.device)
        ids = torch.tensor([input_ids], dtype=torch.int64, device=self.device)
        pos = torch.tensor([positions], dtype=torch.int64, device=self.device)
        return ids, pos, meta, token_slots, logit_rows

    @torch.inference_mode()
    def clear_kv_blocks(self, block_ids: list[int]) -> None:
        """Zero the K/V of these blocks in every layer."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for cache in (*self.pool.keys, *self.pool.values):
            cache.view(self.num_blocks, self.block_size, *cache.shape[1:]).index_fill_(0, index, 0)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Execute one step; returns float32 logits [number of chunks needing logits, vocab].

        With the fast decode path, a step's decode chunks run through it and its prompt chunks through transformers'
        forward, a step with both as two forwards: a sequence's decode then never depends on whether another
        request's prefill shared its step (the fast path gives each row the same result at 1 to 4 rows)."""
        if self.fast_decoder is None:
            return self._forward(*self.prepare(chunks))
        decoding = [len(chunk.token_ids) == 1 and not chunk.prompt for chunk in chunks]
        if all(decoding):
            return self._fast_forward(chunks)
        if not any(decoding):
            return self._forward(*self.prepare(chunks))
        decode_part = self._fast_forward([c for c, d in zip(chunks, decoding) if d])
        prompt_part = self._forward(*self.prepare([c for c, d in zip(chunks, decoding) if not d]))
        decode_rows, prompt_rows = iter(decode_part), iter(prompt_part)
        rows = [next(decode_rows if d else prompt_rows) for c, d in zip(chunks, decoding) if c.needs_logits]
        return torch.stack(rows) if rows else decode_part[:0]

    @torch.inference_mode()
    def _fast_forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """A step of single-token chunks through the fast decode path."""
        assert self.fast_decoder is not None
        bs = self.block_size
        positions = [chunk.start for chunk in chunks]
        longest = max(-(-(p + 1) // bs) for p in positions)
        tables = torch.tensor([c.block_table[:longest] + [0] * (longest - len(c.block_table[:longest]))
                               for c in chunks], dtype=torch.int32)
        kv_indices = torch.tensor([c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, positions)],
                                  dtype=torch.int64)
        position_tensor = torch.tensor(positions, dtype=torch.int64)
        batch = DecodeBatch.checked(kv_indices, tables, position_tensor + 1, bs, self.pool.keys[0].shape[0])
        logit_rows = [i for i, chunk in enumerate(chunks) if chunk.needs_logits]
        step = self.context
        row_slots = tuple(chunk.adapter_slot for chunk in chunks)
        step.token_slots = TokenSlots.from_list(list(row_slots), self.device)
        step.backend = choose_backend(position_tensor) if step.token_slots.any_adapter else None
        step.routing = self.routing if self.routing.enabled else None
        ids = torch.tensor([chunk.token_ids[0] for chunk in chunks], dtype=torch.int64)
        try:
            return self.fast_decoder.forward(ids, position_tensor, batch,
                                             None if len(logit_rows) == len(chunks) else logit_rows, row_slots)
        finally:
            step.clear()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, token_slots: list[int],
                 logit_rows: list[int]) -> torch.Tensor:
        step = self.context
        step.token_slots = TokenSlots.from_list(token_slots, self.device)
        step.attention = meta
        step.backend = choose_backend(ids) if step.token_slots.any_adapter else None
        step.routing = self.routing if self.routing.enabled else None
        try:
            # The whole causal-LM forward, with the rows to sample: the model's own head and what follows it
            # (Gemma's final softcapping, Granite's logit scaling) apply as in `generate`.
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False,
                             logits_to_keep=torch.tensor(logit_rows, dtype=torch.int64, device=self.device))
        finally:
            step.clear()
        return out.logits[0].float()  # [num_logits, vocab]
