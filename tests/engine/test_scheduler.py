import pytest

from malora_runtime.config import EngineConfig
from malora_runtime.engine.kv_cache import kv_index
from malora_runtime.engine.scheduler import Scheduler, SchedulerOutput
from malora_runtime.engine.sequence import Sequence, SequenceStatus
from malora_runtime.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks=64, max_model_len=64, **cfg) -> Scheduler:
    defaults = dict(max_num_seqs=8, max_num_batched_tokens=32, block_size=4)
    defaults.update(cfg)
    return Scheduler(EngineConfig(**defaults), num_blocks, max_model_len, eos_token_ids=[EOS])


def make_seq(rid, n_prompt, max_tokens=4, adapter=None, index=0, **params) -> Sequence:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    return Sequence(rid, [1 + (i % 7) for i in range(n_prompt)], sp, seq_index=index, adapter_name=adapter)


class FakeModel:
    """Writes (adapter, token prefix) into KV slots, checks them before sampling, returns a token that
    depends on the whole history: wrong block tables, bad prefix hits or lost KV all show up."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[int, tuple] = {}

    def step(self, out: SchedulerOutput) -> list[int]:
        bm = self.sched.block_manager
        tokens = []
        for s in out.scheduled:
            seq = s.seq
            assert s.start == seq.num_computed_tokens and 0 <= s.start < s.end <= seq.num_tokens
            assert s.sample == (s.end == seq.num_tokens)
            for pos in range(s.start, s.end):
                index = kv_index(seq.block_table, pos, bm.block_size)
                self.kv[index] = (seq.adapter_name, tuple(seq.token_ids[: pos + 1]))
            for pos in range(s.end):  # attention reads the prefix
                index = kv_index(seq.block_table, pos, bm.block_size)
                assert self.kv[index] == (seq.adapter_name, tuple(seq.token_ids[: pos + 1])), (seq.seq_id, pos)
            if s.sample:
                tokens.append(1 + hash((seq.adapter_name, tuple(seq.token_ids))) % 50)
        return tokens


def run(sched: Scheduler, max_steps=1000, on_step=None, model=None) -> list[SchedulerOutput]:
    model, outs = model or FakeModel(sched), []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out = sched.schedule()
        cfg = sched.config
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        if on_step:
            on_step(out)
        outs.append(out)
        sched.postprocess(out, model.step(out))
    raise AssertionError("did not finish")


def test_decodes_and_prefill_chunks_share_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    short = make_seq("short", 3, max_tokens=20)
    sched.add(short)
    sched.postprocess(sched.schedule(), [5])  # prefill + first token
    sched.add(make_seq("long", 30))
    out = sched.schedule()
    # The decode goes first and the long prompt only takes what is left.
    assert [(s.seq.request_id, s.start, s.end, s.sample) for s in out.scheduled] == [
        ("short", 3, 4, True),
        ("long", 0, 7, False),
    ]
    sched.postprocess(out, [6])
    out = sched.schedule()
    assert [(s.seq.request_id, s.start, s.end) for s in out.scheduled] == [("short", 4, 5), ("long", 7, 14)]


def test_chunked_prefill_finishes_with_a_sample():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("r", 20, max_tokens=2)
    sched.add(seq)
    outs = run(sched)
    prefill = [(s.start, s.end, s.sample) for o in outs for s in o.scheduled][:3]
    assert prefill == [(0, 8, False), (8, 16, False), (16, 20, True)]
    assert seq.num_output_tokens == 2 and seq.finish_reason == "length"


def test_without_chunked_prefill_a_prompt_is_never_split():
    sched = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)
    a, b = make_seq("a", 40), make_seq("b", 40)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.request_id, s.start, s.end) for s in out.scheduled] == [("a", 0, 40)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(EngineConfig(max_num_batched_tokens=16, enable_chunked_prefill=False), 64, max_model_len=64)


def test_seq_cap_and_fcfs():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 5, max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    admitted: list[str] = []

    def on_step(out):
        for s in out.scheduled:
            if s.seq.request_id not in admitted:
                admitted.append(s.seq.request_id)

    outs = run(sched, on_step=on_step)
    assert admitted == [s.request_id for s in seqs]
    assert max(len(o.scheduled) for o in outs) == 2
    assert all(s.num_output_tokens == 3 for s in seqs)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_with_a_tiny_pool_still_finishes_everything(prefix_caching):
    # 6 blocks of 4 tokens; each sequence grows to 5 + 12 = 17 tokens = 5 blocks.
    sched = make_scheduler(
        num_blocks=6, max_model_len=24, max_num_batched_tokens=16, enable_prefix_caching=prefix_caching
    )
    seqs = [make_seq(f"r{i}", 5, max_tokens=12) for i in range(4)]
    for s in seqs:
        sched.add(s)
    preempted, recomputes = set(), []

    def on_step(out):
        for victim in out.preempted:
            assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            assert victim in sched.waiting
            preempted.add(victim.seq_id)
        for s in out.scheduled:
            if s.seq.seq_id in preempted and s.seq.num_output_tokens and s.num_tokens > 1:
                # Recompute: generated tokens are part of the "prompt" and the chunk ends with a sample.
                recomputes.append((s.start, s.end == s.seq.num_tokens, s.sample))

    run(sched, on_step=on_step)
    assert sched.num_preemptions > 0 and preempted
    if not prefix_caching:
        assert recomputes and all(start == 0 and ends and sample for start, ends, sample in recomputes)
    assert all(s.num_output_tokens == 12 and s.finish_reason == "length" for s in seqs)
    assert sched.block_manager.num_free_blocks == 6

    # Same tokens as with a pool that never preempts.
    big = make_scheduler(num_blocks=64, max_model_len=24, max_num_batched_tokens=16)
    ref = [make_seq(f"r{i}", 5, max_tokens=12) for i in range(4)]
    for s in ref:
        big.add(s)
    run(big)
    assert big.num_preemptions == 0
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in ref]


def test_newest_sequence_is_preempted_and_requeued_first():
    sched = make_scheduler(num_blocks=4, max_model_len=16, max_num_batched_tokens=16)
    old, new = make_seq("old", 7, max_tokens=8), make_seq("new", 7, max_tokens=8)
    sched.add(old)
    sched.add(new)
    model = FakeModel(sched)
    while not sched.num_preemptions:
        out = sched.schedule()
        sched.postprocess(out, model.step(out))
    assert out.preempted == [new] and sched.waiting[0] is new
    assert old.status is SequenceStatus.RUNNING and new.num_computed_tokens == 0


def test_pool_too_small_for_one_sequence_is_rejected():
    with pytest.raises(ValueError, match="max_model_len"):
        make_scheduler(num_blocks=3, max_model_len=16)
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make_seq("r", 17))


def test_abort_frees_every_block():
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8, max_num_seqs=2)
    seqs = [make_seq(f"r{i}", 10, max_tokens=50) for i in range(3)]
    for s in seqs:
        sched.add(s)
    model = FakeModel(sched)
    for _ in range(3):
        out = sched.schedule()
        sched.postprocess(out, model.step(out))
    assert sched.running and sched.waiting
    for s in seqs:
        sched.abort(s.request_id)
    assert all(s.finish_reason == "abort" and s.block_table == [] for s in seqs)
    assert not sched.has_unfinished() and not sched.requests
    assert sched.block_manager.num_free_blocks == 16


def test_abort_during_the_step_is_ignored_by_postprocess():
    sched = make_scheduler()
    a, b = make_seq("a", 5), make_seq("b", 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.abort("a")
    finished = sched.postprocess(out, [7, 8])
    assert finished == [] and a.output_token_ids == [] and b.output_token_ids == [8]


def test_stop_conditions():
    sched = make_scheduler()
    cases = {
        "eos": (SamplingParams(max_tokens=10), [3, EOS], "stop"),
        "min_tokens": (SamplingParams(max_tokens=10, min_tokens=2), [EOS, EOS, EOS], "stop"),
        "ignore_eos": (SamplingParams(max_tokens=3, ignore_eos=True), [EOS, EOS, EOS], "length"),
        "stop_id": (SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[9]), [4, 9], "stop"),
        "length": (SamplingParams(max_tokens=2), [4, 5], "length"),
    }
    seqs = {}
    for rid, (params, _, _) in cases.items():
        seqs[rid] = Sequence(rid, [1, 2, 3], params)
        sched.add(seqs[rid])
    step = 0
    while sched.has_unfinished():
        out = sched.schedule()
        sched.postprocess(out, [cases[s.request_id][1][step] for s in out.sampled_seqs])
        step += 1
    for rid, (_, tokens, reason) in cases.items():
        assert seqs[rid].finish_reason == reason, rid
        assert seqs[rid].output_token_ids == tokens, rid
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_max_model_len_ends_generation():
    sched = make_scheduler(max_model_len=8)
    seq = make_seq("r", 6, max_tokens=100)
    sched.add(seq)
    run(sched)
    assert seq.num_tokens == 8 and seq.finish_reason == "length"


def test_external_finish_frees_blocks():
    sched = make_scheduler(num_blocks=16)
    seq = make_seq("r", 9, max_tokens=10)
    sched.add(seq)
    sched.postprocess(sched.schedule(), [3])
    assert sched.block_manager.num_free_blocks < 16
    sched.finish(seq, "stop")
    assert seq.finish_reason == "stop" and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 16


def test_prefix_cache_hit_only_with_same_adapter():
    sched = make_scheduler()
    first = make_seq("first", 13, max_tokens=1, adapter="x")
    sched.add(first)
    model = FakeModel(sched)
    run(sched, model=model)
    same, other, base = (make_seq(r, 13, max_tokens=2, adapter=a) for r, a in
                         [("same", "x"), ("other", "y"), ("base", None)])
    for s in (same, other, base):
        sched.add(s)
    outs = run(sched, model=model)
    first_chunk = {s.seq.request_id: s.start for s in outs[0].scheduled}
    assert first_chunk == {"same": 12, "other": 0, "base": 0}
    assert same.num_cached_tokens == 12 and other.num_cached_tokens == 0
    assert same.output_token_ids != other.output_token_ids  # FakeModel checked each one's KV


@pytest.mark.parametrize("budget", [8, 64])
def test_n_siblings_share_one_prefill(budget):
    sched = make_scheduler(max_num_batched_tokens=budget)
    siblings = [make_seq("req", 18, max_tokens=3, index=i) for i in range(3)]
    for s in siblings:
        sched.add(s)
    outs = run(sched)
    if budget == 64:  # siblings wait one step for the first one's prompt KV instead of duplicating it
        assert [s.seq.seq_index for s in outs[0].scheduled] == [0]
    prefill_tokens = sum(s.num_tokens for o in outs for s in o.scheduled if s.start < 18)
    assert prefill_tokens == 18 + 2 * (18 - 16)  # siblings recompute only the partial last block
    assert [s.num_cached_tokens for s in siblings] == [0, 16, 16]
    assert all(s.num_output_tokens == 3 for s in siblings)


def test_prefix_caching_disabled_recomputes_everything():
    sched = make_scheduler(max_num_batched_tokens=8, enable_prefix_caching=False)
    siblings = [make_seq("req", 18, max_tokens=3, index=i) for i in range(3)]
    for s in siblings:
        sched.add(s)
    outs = run(sched)
    assert sum(s.num_tokens for o in outs for s in o.scheduled if s.start < 18) == 3 * 18
