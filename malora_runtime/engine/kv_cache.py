"""Paged KV-cache bookkeeping: block pool, per-sequence block tables, prefix caching.

Semantics:
  token position p of a sequence lives at KV index  block_table[p // block_size] * block_size + p % block_size
  (`kv_index`; the model runner computes it for a whole step)
  a FULL block i has key  h_i = hash((h_{i-1}, adapter_key, tuple(tokens[i*bs:(i+1)*bs])))  (h_{-1} = None)
The adapter is part of the key because K/V depend on the adapter's weights: the same tokens under
another adapter must never hit. A block is registered under its key only once its K/V are computed
(`commit_computed`), so a hit never reads K/V that a chunked prefill has not written yet.
Freed blocks keep their key and stay hittable until the allocator reuses them (LRU from the free list).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from malora_runtime.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    key: tuple = field(default=())  # (parent_hash, adapter_key, tokens): verifies a hash hit exactly


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = next to reuse). Unhashed blocks go to the front so
        # cached ones survive longest; an OrderedDict makes "take a cached free block back" O(1).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block_id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens served from cache

    # ---- counters ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing ----
    def _block_key(self, seq: Sequence, i: int) -> tuple:
        bs = self.block_size
        parent = seq.block_hashes[i - 1] if i else None
        return (parent, _adapter_key(seq), tuple(seq.token_ids[i * bs : (i + 1) * bs]))

    def _extend_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_hashes to cover the full blocks in the first `num_tokens` tokens (incremental)."""
        for i in range(len(seq.block_hashes), num_tokens // self.block_size):
            seq.block_hashes.append(hash(self._block_key(seq, i)))

    def _lookup(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix; stops short of the last token (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        limit = seq.num_tokens - 1
        self._extend_hashes(seq, limit)
        hits: list[int] = []
        for i in range(limit // self.block_size):
            block_id = self.cached.get(seq.block_hashes[i])
            if block_id is None or self.blocks[block_id].key != self._block_key(seq, i):
                break
            hits.append(block_id)
        return hits

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens of `seq` that `allocate` would serve from the prefix cache right now."""
        return len(self._lookup(seq)) * self.block_size

    # ---- allocation ----
    def can_allocate(self, seq: Sequence) -> bool:
        return self._num_new_blocks(seq, self._lookup(seq)) <= len(self._free)

    def _num_new_blocks(self, seq: Sequence, hits: list[int]) -> int:
        # A hit that sits in the free list still consumes a free block.
        in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.blocks_needed(seq.num_tokens) - in_use

    def allocate(self, seq: Sequence) -> bool:
        """Give `seq` blocks for all its current tokens, reusing cached prefix blocks.

        Advances seq.num_computed_tokens past the hit. Returns False (and changes nothing) if the pool
        is short.
        """
        assert not seq.block_table, f"{seq.seq_id} already has blocks"
        hits = self._lookup(seq)
        if self._num_new_blocks(seq, hits) > len(self._free):
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        fresh = [self._take_free() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_committed_blocks = len(hits)
        num_hit_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        if seq.num_output_tokens == 0:  # count prompts only, not recomputes after preemption
            seq.num_cached_tokens = num_hit_tokens
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_hit_tokens
        return True

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached K/V
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.key = None, ()
        block.ref_count = 1
        return block_id

    def can_extend(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        need = self.blocks_needed(seq.num_tokens if num_tokens is None else num_tokens)
        return need - len(seq.block_table) <= len(self._free)

    def extend(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """Grow the block table to hold `num_tokens` (default: all current tokens). False if short."""
        need = self.blocks_needed(seq.num_tokens if num_tokens is None else num_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Register full blocks whose K/V are now written (call after num_computed_tokens advances)."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(seq, seq.num_computed_tokens)
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_committed_blocks, num_full):  # only the blocks completed since last call
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if h not in self.cached:  # first writer wins; a twin block stays private
                block.hash, block.key = h, self._block_key(seq, i)
                self.cached[h] = block.block_id
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so the first to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"double free of block {block_id}"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    def forget(self, block_ids: list[int]) -> None:
        """Take these blocks out of the prefix cache: their K/V must never be hit again."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.key = None, ()

    def drop_adapter(self, adapter_key: Hashable) -> None:
        """Forget cached blocks of one adapter activation (its slot is being reused)."""
        for h, block_id in list(self.cached.items()):
            block = self.blocks[block_id]
            if block.key[1] == adapter_key:
                del self.cached[h]
                block.hash, block.key = None, ()

def kv_index(block_table: list[int], position: int, block_size: int) -> int:
    """Where token `position` of a sequence with `block_table` lives in the flat KV pool."""
    return block_table[position // block_size] * block_size + position % block_size


def _adapter_key(seq: Sequence) -> Hashable:
    return seq.cache_key
