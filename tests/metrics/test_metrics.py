"""`/metrics` after a scripted mix of requests equals what was sent; the Grafana JSON only names real metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.server_helpers import API_KEY, wait_idle

REPO = Path(__file__).resolve().parents[2]
IGNORE_EOS = {"ignore_eos": True}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def traffic(metrics_server):
    """Send the scripted mix once; return what the client knows it sent."""
    import openai

    base = metrics_server.base_model
    client = openai.OpenAI(base_url=f"{metrics_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    sent = {"prompt": {base: 0, "alpha": 0, "beta": 0}, "generated": {base: 0, "alpha": 0, "beta": 0}}
    for i in range(3):
        r = client.completions.create(model=base, prompt=f"Count to {i + 3}:", max_tokens=5, extra_body=IGNORE_EOS)
        sent["prompt"][base] += r.usage.prompt_tokens
        sent["generated"][base] += r.usage.completion_tokens
    for i in range(2):
        r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": f"Say {i}"}],
                                           max_tokens=4, extra_body=IGNORE_EOS)
        sent["prompt"]["alpha"] += r.usage.prompt_tokens
        sent["generated"]["alpha"] += r.usage.completion_tokens
    stream = client.completions.create(model="beta", prompt="Once upon a time", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    for chunk in stream:
        if chunk.usage is not None:
            sent["prompt"]["beta"] += chunk.usage.prompt_tokens
            sent["generated"]["beta"] += chunk.usage.completion_tokens
    with httpx.Client(base_url=metrics_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as h:
        for _ in range(2):
            assert h.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        bad = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": -1}
        assert h.post("/v1/chat/completions", json=bad).status_code == 400
        # One abort: a long stream on beta, dropped after a few events.
        body = {"model": "beta", "prompt": "The history of", "max_tokens": 400, "stream": True, **IGNORE_EOS}
        with h.stream("POST", "/v1/completions", json=body) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data:")
                if events >= 3:
                    break
        wait_idle(h, timeout=60)
    # A one-token probe with the dropped stream's prompt: its prompt count is the aborted request's too.
    probe = client.completions.create(model="beta", prompt="The history of", max_tokens=1)
    sent["prompt"]["beta"] += 2 * probe.usage.prompt_tokens
    sent["generated"]["beta"] += probe.usage.completion_tokens
    return sent


def test_request_and_token_counters_equal_what_was_sent(metrics_server, traffic) -> None:
    base = metrics_server.base_model
    time.sleep(1.1)  # routing counters are harvested at most once a second
    s = scrape(metrics_server.url)
    assert value(s, "malora_requests_total", adapter=base, endpoint="completions", outcome="length") == 3
    assert value(s, "malora_requests_total", adapter="alpha", endpoint="chat", outcome="length") == 2
    # beta: the streamed request, the one-token probe (both "length"), and the dropped stream ("abort").
    assert value(s, "malora_requests_total", adapter="beta", endpoint="completions", outcome="length") == 2
    assert value(s, "malora_requests_total", adapter="beta", endpoint="completions", outcome="abort") == 1
    # "nope" names no model: counted under "other", never a label of its own
    assert value(s, "malora_requests_total", adapter="other", endpoint="completions", outcome="404") == 2
    assert value(s, "malora_requests_total", adapter="alpha", endpoint="chat", outcome="400") == 1
    for name in (base, "alpha", "beta"):
        assert value(s, "malora_prompt_tokens_total", adapter=name) == traffic["prompt"][name]
    for name in (base, "alpha"):
        assert value(s, "malora_generation_tokens_total", adapter=name) == traffic["generated"][name]
    # beta's dropped stream generated an unknown number of tokens (at least one) before the abort.
    assert value(s, "malora_generation_tokens_total", adapter="beta") >= traffic["generated"]["beta"] + 1


def test_histogram_counts_equal_request_counts(metrics_server, traffic) -> None:
    base = metrics_server.base_model
    s = scrape(metrics_server.url)
    served = {base: 3, "alpha": 2, "beta": 3}
    for name, count in served.items():
        assert value(s, "malora_e2e_request_latency_seconds_count", adapter=name) == count
        assert value(s, "malora_time_to_first_token_seconds_count", adapter=name) == count
        assert value(s, "malora_queue_time_seconds_count", adapter=name) == count
    # Inter-token gaps: one fewer than the tokens of each non-aborted request.
    assert value(s, "malora_inter_token_latency_seconds_count", adapter=base) == traffic["generated"][base] - 3
    assert value(s, "malora_step_tokens_count") == value(s, "malora_engine_steps_total") > 0


def test_gauges_return_to_zero_when_idle(metrics_server, traffic) -> None:
    s = scrape(metrics_server.url)
    for name in ("malora_requests_running", "malora_requests_waiting", "malora_requests_waiting_for_adapter",
                 "malora_kv_blocks_used"):
        assert value(s, name) == 0, name
    assert value(s, "malora_kv_blocks_total") > 0
    assert value(s, "malora_adapter_tier", adapter="alpha", tier="device") == 1


def test_adapter_memory_is_the_adapters_own_bytes(metrics_server, traffic) -> None:
    """Both adapters sit in slots: the device tier holds their packed weights, within 2% of the safetensors
    files' tensor bytes (the packing adds a 16-element tail and, without a router bias, N zeros per module),
    and no more than its budget."""
    s = scrape(metrics_server.url)
    files = sum(path.stat().st_size for path in metrics_server.adapter_files)
    held = value(s, "malora_adapter_memory_bytes", tier="device")
    assert 0.98 * files <= held <= 1.02 * files, (held, files)
    assert held <= value(s, "malora_adapter_memory_budget_bytes", tier="device")
    assert value(s, "malora_adapter_memory_bytes", tier="cpu") == 0  # none outside a slot
    assert value(s, "malora_adapter_device_copy_bytes") == 0  # read in place on the CPU


def test_expert_routing_is_counted_per_adapter(metrics_server, traffic) -> None:
    time.sleep(1.1)
    s = scrape(metrics_server.url)
    alpha = [value(s, "malora_expert_tokens_total", adapter="alpha", expert=str(e)) for e in range(4)]
    # top_k = 2 per token and layer, 60 adapted layers (30 x q, v): the counts are multiples of 120.
    assert sum(alpha) > 0 and sum(alpha) % 120 == 0
    assert 0 < value(s, "malora_router_balance", adapter="alpha") <= 1


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:malora_|vllm:)[a-z_]+\b", expr))


def test_every_grafana_expression_names_an_exposed_metric(metrics_server, traffic) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "malora.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    exposed = {name for name, _ in scrape(metrics_server.url)}
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used, "the dashboard names no metric"
    assert not used - exposed, f"not exposed by the server: {sorted(used - exposed)}"


def test_per_layer_routing_is_kept_for_a_window_and_merged_by_adapter():
    from server.metrics import LAYER_WINDOW, ServerMetrics

    metrics = ServerMetrics("base", max_adapter_labels=1)
    metrics.observe_layer_routing({"a": {"l0": [1, 2], "l1": [3, 0]}, "b": {"l0": [5, 5]}}, now=100.0)
    metrics.observe_layer_routing({"a": {"l0": [1, 0, 4]}}, now=101.0)
    assert metrics.layer_routing_snapshot(now=102.0) == {"a": {"l0": [2, 2, 4], "l1": [3, 0]}}  # b: past the labels
    assert metrics.layer_routing_snapshot(now=100.5 + LAYER_WINDOW) == {"a": {"l0": [1, 0, 4]}}
    metrics.observe_layer_routing({}, now=200.0)
    assert metrics.layer_routing_snapshot(now=200.0) == {}
