"""The multitask example adapter's routers choose experts by task, measured from the engine's own routing counts
(`malora bench routing`): per adapted layer, the distribution of chosen experts while serving one task's eval
prompts. Statistic: the mean over layers of the total variation distance (TVD) between two tasks' distributions.
Threshold: for every pair of tasks at least 0.1, and at least twice the noise floor, the same statistic between
the two halves of either task's own prompts (measured here 0.18-0.25 between tasks, 0.015-0.05 within)."""

from __future__ import annotations

import pytest

from malora_runtime.bench.routing import DEFAULT_ADAPTER, measure, prompts_by_task
from tests.conftest import requires_native

pytestmark = [pytest.mark.slow, requires_native]


def test_the_multitask_routers_choose_experts_by_task(default_model):
    from malora_runtime.adapters import load_adapter
    from malora_runtime.config import EngineConfig
    from malora_runtime.engine.llm_engine import LLMEngine
    from malora_runtime.models.loader import load_model
    from malora_runtime.patching import linear_shapes

    _, tokenizer, _ = default_model
    model, _, source = load_model(None)  # its own copy: the engine wraps the model's linears
    engine = LLMEngine(model, tokenizer, EngineConfig(count_expert_routing=True, num_kv_blocks=256), source.name)
    engine.add_adapter("multitask", load_adapter(DEFAULT_ADAPTER, linear_shapes(model)))
    tasks = prompts_by_task(DEFAULT_ADAPTER / "eval.jsonl")
    assert set(tasks) == {"upper", "reverse", "json"}
    result = measure(engine, "multitask", tasks, max_tokens=16)
    for pair, between in result["between"].items():
        a, b = pair.split("|")
        noise = max(result["within"][a], result["within"][b])
        assert between >= 0.1 and between >= 2 * noise, (pair, between, noise)
    for info in result["tasks"].values():  # summed over layers (what /metrics shows) every expert is used
        assert min(info["summed"]) > 0.1
