"""`AsyncEngine.from_config`: the model is loaded on the engine's own thread, which is then the only
thread running multi-threaded torch (one OpenMP team; see the method's docstring)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from malora_runtime.config import EngineConfig
from malora_runtime.engine.async_engine import AsyncEngine
from malora_runtime.sampling_params import SamplingParams


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "malora-engine"]


def test_from_config_builds_and_steps_on_its_own_thread() -> None:
    threads_before = torch.get_num_threads()
    engine = AsyncEngine.from_config(EngineConfig(num_kv_blocks=64))
    try:
        assert engine.is_running  # the loop already runs; start() is a no-op
        engine.start()
        assert len(engine_threads()) == 1
        assert torch.get_num_threads() == 1  # the caller no longer runs an OpenMP team of its own

        async def first_tokens() -> list[int]:
            tokens: list[int] = []
            async for output in engine.generate("The capital of France is",
                                                SamplingParams(max_tokens=3, temperature=0.0)):
                tokens.extend(output.outputs[0].token_ids)
            return tokens

        tokens = asyncio.run(first_tokens())
        assert len(tokens) == 3
        assert "Paris" in engine.tokenizer.decode(tokens)
        step_thread = asyncio.run(engine.run_on_engine(lambda: threading.current_thread().name))
        assert step_thread == "malora-engine"
    finally:
        engine.shutdown(timeout=5)
    assert engine_threads() == []
    assert torch.get_num_threads() == threads_before


def test_from_config_hands_a_load_error_to_the_caller(tmp_path) -> None:
    threads_before = torch.get_num_threads()
    with pytest.raises((ValueError, OSError)):
        AsyncEngine.from_config(EngineConfig(model=str(tmp_path / "no-such-model")))
    assert engine_threads() == []
    assert torch.get_num_threads() == threads_before
