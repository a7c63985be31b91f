"""Label cardinality stays bounded, and the routing balance is the normalised entropy."""

from __future__ import annotations

import math

from malora_runtime.engine.async_engine import RequestRecord
from server.metrics import OTHER, ServerMetrics, normalised_entropy


def test_adapters_beyond_the_limit_are_summed_under_other() -> None:
    metrics = ServerMetrics("base", max_adapter_labels=3)
    for name in ("a", "b", "c", "d", "e", None):
        metrics.observe_request(RequestRecord(f"cmpl-{name}", name, prompt_tokens=2, generation_tokens=1,
                                              finish_reasons=["length"]))
    samples = {(s.name, s.labels.get("adapter")): s.value for f in metrics.registry.collect() for s in f.samples}
    assert samples[("malora_prompt_tokens_total", "a")] == 2
    assert samples[("malora_prompt_tokens_total", "b")] == 2
    assert samples[("malora_prompt_tokens_total", "c")] == 2
    # d, e and the base model came after the limit: 3 requests of 2 prompt tokens under "other".
    assert samples[("malora_prompt_tokens_total", OTHER)] == 6
    assert ("malora_prompt_tokens_total", "d") not in samples


def test_normalised_entropy() -> None:
    assert normalised_entropy([5, 5, 5, 5]) == 1.0
    assert normalised_entropy([10, 0, 0, 0]) == 0.0
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert abs(normalised_entropy([3, 1]) - expected) < 1e-12
