"""Prometheus metrics (names prefixed `malora_`) and the JSON summary behind the dashboard.

Request-level figures come from the engine's per-request records (TTFT, inter-token latency,
end-to-end, queue time, tokens, finish reasons); refused requests are counted by a small ASGI
middleware that sees their status. Engine, KV and adapter-tier figures are read at scrape time.
Expert routing is accumulated on the device by the kernels and harvested at most once a second.
Each app has its own `CollectorRegistry`: no process-global metric state.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from malora_runtime.engine.async_engine import RequestRecord
from malora_runtime.engine.outputs import StepRecord

from .vllm_metrics import VllmMetrics

OTHER = "other"
# Log-spaced buckets wide enough for a GPU (milliseconds) and this CPU (tens of seconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STEP_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAYER_WINDOW = 15.0  # seconds of per-layer routing the dashboard shows
GRAMMAR_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


def endpoint_of(request_id: str) -> str:
    """The serving layer names requests `cmpl-...` / `chatcmpl-...`."""
    if request_id.startswith("chatcmpl"):
        return "chat"
    return "completions" if request_id.startswith("cmpl") else "other"


class AdapterLabels:
    """Bounded label values: the first `limit` adapter names get their own label, the rest `other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.names: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        with self._lock:
            if name in self.names:
                return name
            if len(self.names) < self.limit:
                self.names.add(name)
                return name
            return OTHER


class ServerMetrics:
    def __init__(self, base_model: str, max_adapter_labels: int = 100, vllm_compatible: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.base_model = base_model
        self.label = AdapterLabels(max_adapter_labels)
        r = self.registry
        self.requests = Counter("malora_requests", "Requests by adapter, endpoint and outcome (finish reason or HTTP "
                                "status)", ["adapter", "endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("malora_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.generation_tokens = Counter("malora_generation_tokens", "Generated tokens", ["adapter"], registry=r)
        self.ttft = Histogram("malora_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("malora_inter_token_latency_seconds", "Time between streamed tokens", ["adapter"],
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("malora_e2e_request_latency_seconds", "Request latency end to end", ["adapter"],
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("malora_queue_time_seconds", "Time from arrival to first scheduled", ["adapter"],
                               buckets=QUEUE_BUCKETS, registry=r)
        self.step_tokens = Histogram("malora_step_tokens", "Tokens computed per engine step",
                                     buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_seqs = Histogram("malora_step_sequences", "Sequences per engine step", buckets=STEP_SEQ_BUCKETS,
                                   registry=r)
        self.step_seconds = Counter("malora_step_seconds", "Time spent in engine steps", registry=r)
        self.adapter_load_seconds = Histogram("malora_adapter_load_seconds", "Adapter read and validation time",
                                              buckets=LOAD_BUCKETS, registry=r)
        self.expert_tokens = Counter("malora_expert_tokens", "Tokens routed to each expert (summed over layers)",
                                     ["adapter", "expert"], registry=r)
        self.router_balance = Gauge("malora_router_balance", "Normalised entropy of the adapter's expert routing "
                                    "(1 = perfectly balanced)", ["adapter"], registry=r)
        self.constrained_requests = Counter("malora_constrained_requests", "Requests whose output follows a grammar, "
                                            "by kind (json_object, json_schema, regex, choice, grammar, tools)",
                                            ["kind"], registry=r)
        self.grammar_compile = Histogram("malora_grammar_compile_seconds", "Compiling a grammar not in the cache "
                                         "(off the engine thread)", buckets=GRAMMAR_BUCKETS, registry=r)
        self.grammar_mask = Histogram("malora_grammar_mask_seconds", "Masking the constrained rows' logits, per "
                                      "engine step that has any", buckets=GRAMMAR_BUCKETS, registry=r)
        # The vLLM names Kubernetes' inference gateway reads (vllm_metrics.py), beside these.
        self.vllm = VllmMetrics(r) if vllm_compatible else None
        self._routing: dict[str, list[float]] = {}
        # Per adapter, the last LAYER_WINDOW seconds of per-layer routing harvests (the dashboard's by-layer view).
        self._layer_routing: deque[tuple[float, str, dict[str, list[int]]]] = deque()
        self.recent: deque[tuple[float, RequestRecord]] = deque(maxlen=2000)
        self._state_collector: Callable[[], list[Any]] | None = None
        # Whether a model name is the base model or an adapter the server has (set by the app's telemetry).
        self.is_known: Callable[[str], bool] = lambda name: name == base_model

    # ---- observations ----
    def adapter_label(self, adapter: str | None) -> str:
        return self.label(adapter or self.base_model)

    def observe_request(self, record: RequestRecord) -> None:
        label = self.adapter_label(record.adapter)
        endpoint = endpoint_of(record.request_id)
        for reason in record.finish_reasons or ["abort"]:
            self.requests.labels(label, endpoint, reason).inc()
        self.prompt_tokens.labels(label).inc(record.prompt_tokens)
        self.generation_tokens.labels(label).inc(record.generation_tokens)
        if record.time_to_first_token is not None:
            self.ttft.labels(label).observe(record.time_to_first_token)
        for gap in record.inter_token_latencies:
            self.itl.labels(label).observe(gap)
        self.e2e.labels(label).observe(record.e2e_latency)
        if record.queue_time is not None:
            self.queue.labels(label).observe(record.queue_time)
        self.recent.append((time.time(), record))

    def observe_error(self, adapter: str | None, endpoint: str, status: int) -> None:
        """A refused request. The name it gave is a label only when it names a real model: names a client made up
        must not fill the label budget."""
        label = self.adapter_label(adapter) if adapter is None or self.is_known(adapter) else OTHER
        self.requests.labels(label, endpoint, str(status)).inc()

    def observe_step(self, step: StepRecord) -> None:
        self.step_tokens.observe(step.tokens)
        self.step_seqs.observe(step.seqs)
        self.step_seconds.inc(step.seconds)
        if step.constrained_seqs:
            self.grammar_mask.observe(step.grammar_mask_seconds)

    def observe_constrained(self, kind: str, compile_seconds: float | None) -> None:
        """A request admitted with a grammar of `kind`; `compile_seconds` when its grammar was not cached."""
        self.constrained_requests.labels(kind).inc()
        if compile_seconds is not None:
            self.grammar_compile.observe(compile_seconds)

    def observe_routing(self, counts: dict[str, list[int]]) -> None:
        for name, per_expert in counts.items():
            label = self.adapter_label(name)
            totals = self._routing.setdefault(label, [0.0] * len(per_expert))
            if len(totals) < len(per_expert):
                totals.extend([0.0] * (len(per_expert) - len(totals)))
            for expert, value in enumerate(per_expert):
                if value:
                    self.expert_tokens.labels(label, str(expert)).inc(value)
                    totals[expert] += value
            self.router_balance.labels(label).set(normalised_entropy(totals))

    def observe_adapter_loads(self, seconds: list[float]) -> None:
        for value in seconds:
            self.adapter_load_seconds.observe(value)
        if self.vllm is not None:
            self.vllm.observe_loads("cpu", seconds)

    def observe_adapter_activations(self, seconds: list[float]) -> None:
        if self.vllm is not None:
            self.vllm.observe_loads("gpu", seconds)

    def routing_snapshot(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self._routing.items()}

    def observe_layer_routing(self, by_layer: dict[str, dict[str, list[int]]], now: float | None = None) -> None:
        """A harvest's per-layer counts, by adapter; kept for LAYER_WINDOW seconds."""
        now = time.time() if now is None else now
        for name, layers in by_layer.items():
            label = self.adapter_label(name)
            if label != OTHER and layers:
                self._layer_routing.append((now, label, layers))
        while self._layer_routing and self._layer_routing[0][0] < now - LAYER_WINDOW:
            self._layer_routing.popleft()

    def layer_routing_snapshot(self, now: float | None = None) -> dict[str, dict[str, list[int]]]:
        """Per adapter and layer, tokens per expert over the last LAYER_WINDOW seconds: sent one task at a time,
        an adapter whose routers follow the task shows a different pattern per task (summed over layers, the
        patterns cancel out)."""
        now = time.time() if now is None else now
        merged: dict[str, dict[str, list[int]]] = {}
        for when, label, layers in self._layer_routing:
            if when < now - LAYER_WINDOW:
                continue
            target = merged.setdefault(label, {})
            for path, counts in layers.items():
                kept = target.setdefault(path, [0] * len(counts))
                kept.extend([0] * (len(counts) - len(kept)))
                for expert, value in enumerate(counts):
                    kept[expert] += value
        return merged

    def set_state_collector(self, collect: Callable[[], list[Any]]) -> None:
        """Scrape-time metric families (engine gauges, adapter tiers) built by `collect`."""
        self._state_collector = collect
        self.registry.register(_CallbackCollector(collect))


def normalised_entropy(counts: list[float]) -> float:
    total = sum(counts)
    if total <= 0 or len(counts) < 2:
        return 1.0
    entropy = -sum(c / total * math.log(c / total) for c in counts if c > 0)
    return entropy / math.log(len(counts))


class _CallbackCollector:
    def __init__(self, collect: Callable[[], list[Any]]) -> None:
        self._collect = collect

    def collect(self):
        yield from self._collect()

    def describe(self):
        return []


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ErrorMetricsMiddleware:
    """Counts refused completions and chat requests (status >= 400) by adapter, endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], ServerMetrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        metrics = self.metrics() if endpoint else None
        if metrics is None:
            return await self.app(scope, receive, send)
        body = bytearray()

        async def tap_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < 1 << 20:
                body.extend(message.get("body", b""))
            return message

        async def tap_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                metrics.observe_error(_model_of(bytes(body)), endpoint, message["status"])
            await send(message)

        await self.app(scope, tap_receive, tap_send)


def _model_of(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):  # any body a client sends, nested 50,000 deep too
        return None
    return model if isinstance(model, str) and model else None
