"""The slot banks never grow past their memory budget: an adapter that would push them past it is refused
before anything is written, and the adapters already active keep serving (tiny model)."""

from __future__ import annotations

import pytest

from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.errors import SlotMemoryError
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.patching import linear_shapes
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama


class Tokenizer:  # the engine only decodes; these tests read token ids
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def adapter(experts: int, rank: int, subspace: int, seed: int = 0):
    shapes = linear_shapes(make_tiny_llama())
    return random_adapter(shapes, "tiny", ["q_proj", "up_proj"], experts, rank, subspace, 1, seed=seed,
                          dtype="float32")


def engine(budget: int | None) -> LLMEngine:
    return LLMEngine(make_tiny_llama(), Tokenizer(), EngineConfig(max_loaded_adapters=4, num_kv_blocks=32,
                                                                  block_size=4, max_model_len=64,
                                                                  adapter_bank_memory=budget), "tiny")


def bank_tensor_bytes(core: LLMEngine) -> int:
    banks = [layer.bank for layer in core.runner.adapters.layers().values() if layer.bank is not None]
    return sum(t.numel() * t.element_size() for b in banks for t in (b.S, b.G, b.router_bias, b.P, b.B))


def test_the_estimate_is_the_banks_own_bytes_times_the_kernels_copies():
    core = engine(None)
    small, wide = adapter(2, 2, 4), adapter(6, 8, 16, seed=1)
    projected = core.runner.adapters.bank_bytes(small)
    core.add_adapter("small", small)
    assert projected == core.runner.adapters.bank_bytes() == 3 * bank_tensor_bytes(core)
    projected = core.runner.adapters.bank_bytes(wide)
    assert projected > core.runner.adapters.bank_bytes()
    core.add_adapter("wide", wide)
    assert projected == 3 * bank_tensor_bytes(core)


def test_an_adapter_past_the_budget_is_refused_and_the_others_keep_serving():
    probe = engine(None)
    small, wide = adapter(2, 2, 4), adapter(6, 8, 16, seed=1)
    budget = probe.runner.adapters.bank_bytes(small) + 1
    core = engine(budget)
    core.add_adapter("small", small)
    before = bank_tensor_bytes(core)
    with pytest.raises(SlotMemoryError, match="--adapter-bank-memory") as refused:
        core.add_adapter("wide", wide)
    assert refused.value.param == "model"
    assert bank_tensor_bytes(core) == before and "wide" not in core.runner.adapters.current
    core.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), "small")
    tokens = []
    while core.has_unfinished():
        for output in core.step():
            assert output.error is None
            tokens += [t for c in output.outputs for t in c.token_ids]
    assert len(tokens) == 3
    assert core.runner.adapters.bank_bytes() <= budget
