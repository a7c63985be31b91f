from hypothesis import given, settings
from hypothesis import strategies as st

from malora_runtime.engine.kv_cache import BlockManager, kv_index
from malora_runtime.engine.sequence import Sequence

BS = 4


def make_seq(tokens, adapter=None, rid="r"):
    return Sequence(rid, list(tokens), adapter_name=adapter)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model wrote K/V for every current token."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(seq.block_table) == len(set(seq.block_table))
        for b in seq.block_table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm._free) == {i for i, r in enumerate(refs) if r == 0}
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


def test_allocate_free_round_trip():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    assert bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    check_invariants(bm, [seq])
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    check_invariants(bm, [])


def test_kv_index_follows_block_table():
    table = [5, 2]
    assert [kv_index(table, p, BS) for p in range(6)] == [20, 21, 22, 23, 8, 9]


def test_allocate_fails_without_side_effects():
    bm = BlockManager(2, BS)
    seq = make_seq(range(9))  # needs 3 blocks
    assert not bm.can_allocate(seq)
    assert not bm.allocate(seq)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_append_slots_grows_at_block_boundary():
    bm = BlockManager(3, BS)
    seq = make_seq(range(4))
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    seq.append_token(99)  # 5 tokens -> 2 blocks
    assert bm.can_extend(seq)
    assert bm.extend(seq) and len(seq.block_table) == 2
    assert bm.extend(seq) and len(seq.block_table) == 2  # idempotent
    assert not bm.can_extend(seq, 13) and not bm.extend(seq, 13)
    assert len(seq.block_table) == 2


def test_prefix_hit_same_adapter_only():
    bm = BlockManager(16, BS)
    first = make_seq(range(10), adapter="a")
    bm.allocate(first)
    compute_all(bm, first)
    for adapter, expected in [("a", 8), ("b", 0), (None, 0)]:
        seq = make_seq(range(10), adapter=adapter)
        assert bm.allocate(seq)
        assert seq.num_computed_tokens == expected
        assert seq.num_cached_tokens == expected
        if expected:
            assert seq.block_table[:2] == first.block_table[:2]
            assert bm.blocks[first.block_table[0]].ref_count == 2
        else:
            assert not set(seq.block_table) & set(first.block_table)
        bm.free(seq)
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 40


def test_hit_needs_identical_prefix_chain():
    bm = BlockManager(16, BS)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(first)
    compute_all(bm, first)
    # Same second block, different first block: the chain hash must not match.
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(other)
    assert other.num_computed_tokens == 0


def test_no_hit_before_kv_is_computed():
    bm = BlockManager(16, BS)
    first = make_seq(range(10))
    bm.allocate(first)
    first.num_computed_tokens = 4  # chunked prefill wrote only the first block so far
    bm.commit_computed(first)
    second = make_seq(range(10))
    bm.allocate(second)
    assert second.num_computed_tokens == 4


def test_full_prompt_hit_still_recomputes_last_token():
    bm = BlockManager(16, BS)
    first = make_seq(range(8))
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(range(8))
    bm.allocate(second)
    # Both blocks are cached, but the last token's logits are needed: only the first block is reused.
    assert second.num_computed_tokens == 4
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]


def test_freed_cached_blocks_stay_hittable_until_evicted():
    bm = BlockManager(4, BS)
    first = make_seq(range(9))  # 3 blocks, 2 full ones get cached
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 4
    again = make_seq(range(9))
    assert bm.allocate(again) and again.num_computed_tokens == 8
    check_invariants(bm, [again])
    bm.free(again)
    # Filling the pool with unrelated tokens evicts them.
    filler = make_seq(range(100, 116))
    bm.allocate(filler)
    bm.free(filler)
    assert not bm.cached
    third = make_seq(range(9))
    bm.allocate(third)
    assert third.num_computed_tokens == 0


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, BS)
    cached = make_seq(range(5))  # block 0 full and cached, block 1 partial
    bm.allocate(cached)
    compute_all(bm, cached)
    filler = make_seq(range(20, 28))  # two full blocks, never computed: no hash
    bm.allocate(filler)
    bm.free(cached)
    bm.free(filler)  # freed last, but unhashed: reused first
    # Needs 3 of the 4 free blocks: the cached block must survive.
    other = make_seq(range(50, 62))
    bm.allocate(other)
    assert cached.block_table == [] and len(bm.cached) == 1
    bm.free(other)
    again = make_seq(range(5))
    bm.allocate(again)
    assert again.num_computed_tokens == 4


def test_drop_adapter_forgets_its_blocks():
    bm = BlockManager(16, BS)
    for adapter in ("a", "b"):
        seq = make_seq(range(9), adapter=adapter)
        bm.allocate(seq)
        compute_all(bm, seq)
        bm.free(seq)
    bm.drop_adapter("a")
    seq_a, seq_b = make_seq(range(9), adapter="a"), make_seq(range(9), adapter="b")
    bm.allocate(seq_a)
    bm.allocate(seq_b)
    assert seq_a.num_computed_tokens == 0 and seq_b.num_computed_tokens == 8


def test_prefix_caching_disabled():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    first = make_seq(range(9))
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(range(9))
    bm.allocate(second)
    assert second.num_computed_tokens == 0 and not bm.cached


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["alloc", "grow", "compute", "free"]),
            st.lists(st.integers(0, 2), min_size=1, max_size=14),
            st.sampled_from([None, "a"]),
            st.integers(0, 10),
        ),
        max_size=40,
    )
)
def test_random_operations_keep_refcounts_consistent(ops):
    bm = BlockManager(10, BS)
    live: list[Sequence] = []
    for op, tokens, adapter, pick in ops:
        if op == "alloc":
            seq = make_seq(tokens, adapter)
            if bm.allocate(seq):
                live.append(seq)
                # Reused blocks really hold this sequence's own prefix.
                assert seq.num_computed_tokens % BS == 0 and seq.num_computed_tokens < seq.num_tokens
                for i in range(seq.num_computed_tokens // BS):
                    block = bm.blocks[seq.block_table[i]]
                    assert block.key[1] == adapter and list(block.key[2]) == seq.token_ids[i * BS : (i + 1) * BS]
            else:
                assert seq.block_table == []
        elif live:
            seq = live[pick % len(live)]
            if op == "grow":
                seq.append_token(tokens[0])
                if not bm.extend(seq):
                    seq.token_ids.pop()
            elif op == "compute":
                compute_all(bm, seq)
            else:
                bm.free(seq)
                live.remove(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
