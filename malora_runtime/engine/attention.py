"""Paged attention for a flat packed batch, registered with transformers' attention interface.

The model runs on one packed sequence of T tokens (batch dimension 1) holding chunks of many
requests. Before every step the runner builds an `AttentionMetadata` and puts it in the step context
(`malora_runtime.context.StepContext`), which every attention module of the model holds as
`malora_context`; `paged_attention` reads it there, writes each token's K/V into the block pool at its
KV index and attends every chunk to its own request's cached context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "malora_paged"


@dataclass
class KVPool:
    """The KV block pool: per layer one flat [num_blocks * block_size, num_kv_heads, head_dim] tensor."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVPool:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)], block_size)


@dataclass
class PrefillSpan:
    """A chunk of more than one query token of one request."""

    start: int  # first row of the chunk in the packed batch
    length: int  # query tokens in the chunk
    context: torch.Tensor | None  # [context_len] KV indices to attend to, or None when the chunk is the whole context


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer.

    kv_indices:        [T] int64, KV index written by each token (`kv_cache.kv_index`)
    decode_rows:       [Bd] int64, rows of single-token chunks
    decode_kv_indices: [Bd, Lmax] int64, KV indices each decode row attends to (padded with 0)
    decode_mask:       [Bd, 1, 1, Lmax] bool, True where the index is real
    decode_lengths:    [Bd] int64, context length of each decode row (its query sits at length - 1)
    layers_seen:       when a set, every layer whose attention ran adds its index (the start-up probe)
    """

    pool: KVPool
    kv_indices: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_kv_indices: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    layers_seen: set[int] | None = None
    windowed_decode_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def decode_mask_within(self, window: int | None) -> torch.Tensor:
        """The decode mask, limited to each row's last `window` keys (transformers' sliding window: a query at
        position i sees keys j with i - window < j <= i); one per window size per step, shared by its layers."""
        assert self.decode_mask is not None and self.decode_lengths is not None
        if window is None:
            return self.decode_mask
        mask = self.windowed_decode_masks.get(window)
        if mask is None:
            keys = torch.arange(self.decode_mask.shape[-1], device=self.decode_mask.device)
            recent = keys[None, :] >= (self.decode_lengths - window)[:, None]  # [Bd, Lmax]
            mask = self.windowed_decode_masks[window] = self.decode_mask & recent[:, None, None, :]
        return mask


def span_mask(context_len: int, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, context_len] bool: query i of a chunk ending at the context's end sees keys up to its own
    position and, with a sliding window, only the last `window` of them."""
    query_pos = torch.arange(context_len - length, context_len, device=device)[:, None]
    keys = torch.arange(context_len, device=device)[None, :]
    mask = keys <= query_pos
    if window is not None:
        mask &= keys > query_pos - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
           softcap: float | None) -> torch.Tensor:
    """q [B, H, q, hd], k/v [B, Hkv, L, hd], mask broadcastable to [B, H, q, L] (True: attend) or None for causal.
    With `softcap` (Gemma 2) the scores go through cap * tanh(s / cap) before the softmax, as transformers'
    eager attention computes it; without, one fused SDPA call."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, hd], key/value [1, Hkv, T, hd] -> ([1, T, H, hd], None)."""
    step = getattr(module, "malora_context", None)
    paged = step.attention if step is not None else None
    if paged is None:
        raise RuntimeError("malora_paged attention runs inside a model runner's step (no step context here)")
    if kwargs.get("s_aux") is not None:  # attention sinks change the softmax; computing without them is wrong
        raise NotImplementedError("attention sinks (s_aux) are not supported by the paged attention")
    layer = module.layer_idx
    if paged.layers_seen is not None:
        paged.layers_seen.add(layer)
    k_cache, v_cache = paged.pool.keys[layer], paged.pool.values[layer]
    k_tokens = key[0].transpose(0, 1)  # [T, Hkv, hd]
    v_tokens = value[0].transpose(0, 1)
    k_cache.index_copy_(0, paged.kv_indices, k_tokens.to(k_cache.dtype))
    v_cache.index_copy_(0, paged.kv_indices, v_tokens.to(v_cache.dtype))

    q = query[0]  # [H, T, hd]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=query.dtype, device=query.device)  # [T, H, hd]
    if paged.decode_rows is not None:
        rows = paged.decode_rows
        q_dec = q[:, rows].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, hd]
        # index_select on the flat indices: one row copy per index (advanced indexing with the 2-D
        # index was ~6x slower here and a tenth of a decode step).
        flat, shape = paged.decode_kv_indices.view(-1), (*paged.decode_kv_indices.shape, *k_cache.shape[1:])
        k_dec = k_cache.index_select(0, flat).view(shape).transpose(1, 2)  # [Bd, Hkv, Lmax, hd]
        v_dec = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
        attended = attend(q_dec, k_dec, v_dec, paged.decode_mask_within(sliding_window), scaling, softcap)
        out[rows] = attended[:, :, 0]
    for span in paged.prefills:
        q_span = q[:, span.start:span.start + span.length].unsqueeze(0)  # [1, H, q, hd]
        if span.context is None:
            k_span = key[:, :, span.start:span.start + span.length]
            v_span = value[:, :, span.start:span.start + span.length]
            mask = None if sliding_window is None else span_mask(span.length, span.length, sliding_window, q.device)
        else:
            k_span = k_cache.index_select(0, span.context).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, hd]
            v_span = v_cache.index_select(0, span.context).transpose(0, 1).unsqueeze(0)
            mask = span_mask(span.context.shape[0], span.length, sliding_window, q.device)
        attended = attend(q_span, k_span, v_span, mask, scaling, softcap)
        out[span.start:span.start + span.length] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
