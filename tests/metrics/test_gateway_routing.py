"""Adapter-affinity routing across replicas without Kubernetes: the inference gateway's endpoint picker, emulated.

Three real replicas (a tiny random Llama, 2 adapter slots each) serve 12 adapters under a skewed (Zipf) load. A
small router in front of them scrapes each replica's /metrics every 50 ms and scores it exactly as the picker does
with deploy/k8s/gateway's profile (its weights are read from the shipped file): lora-affinity (1.0 the adapter runs,
0.8 a free slot, 0.6 it waits, read from the latest vllm:lora_requests_info series naming an adapter, the last ones
kept when none does), queue (min-max over vllm:num_requests_waiting) and KV cache (1 - vllm:kv_cache_usage_perc);
the highest score wins, ties at random. The same requests, in the same order and concurrency, go round-robin in the
same run, on their own 12 adapters (both sets start on disk). Cold activations (malora_adapter_activations_total
summed over the replicas) must be fewer with affinity; TTFT p99 of both is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server.server_helpers import API_KEY, start_server, stop_server, wait_ready

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
PICKER_CONFIG = REPO / "deploy" / "k8s" / "gateway" / "epp-config.yaml"
NUM_REPLICAS, NUM_SLOTS, NUM_ADAPTERS = 3, 2, 12
NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 96, 6, 24
SCRAPE_INTERVAL = 0.05  # the picker's default refresh
ZIPF = 1.2
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Replica:
    url: str
    process: object
    log: Path


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory) -> Iterator[list[Replica]]:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.models.loader import load_model
    from malora_runtime.patching import linear_shapes

    model, _, source = load_model(tiny_model_dir)
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("routing-adapters")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, name in enumerate(["warm", *adapter_names("rr"), *adapter_names("af"), *adapter_names("rs")]):
        save_adapter(random_adapter(shapes, source.name, targets, 4, 8, 16, 2, seed, dtype="float32"), root / name)
    directory = tmp_path_factory.mktemp("routing-servers")
    args = ["--model", str(tiny_model_dir), "--adapter-root", str(root), "--max-loaded-adapters", str(NUM_SLOTS),
            "--max-num-seqs", "4", "--kv-cache-memory", str(32 << 20), "--log-level", "warning",
            "--shutdown-timeout", "5"]
    started = []
    try:
        for i in range(NUM_REPLICAS):
            # One torch thread each: three replicas' OpenMP teams on a few shared cores wait on each other (20x
            # slower steps here); a replica per core is also how they would run.
            process, url = start_server(args, directory / f"replica-{i}.log",
                                        env={"MALORA_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"})
            started.append(Replica(url, process, directory / f"replica-{i}.log"))
        for replica in started:
            wait_ready(replica.process, replica.url, replica.log)
        yield started
    finally:
        for replica in started:
            stop_server(replica.process)


def adapter_names(prefix: str) -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(NUM_ADAPTERS)]


# ---- the picker, emulated ----
@dataclass
class PodMetrics:
    """What the picker keeps of one replica's /metrics."""

    active: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)
    max_active: int = 0
    queue: int = 0
    kv_usage: float = 0.0
    in_slots: set[str] = field(default_factory=set)  # vllm:lora_adapter_loaded{level="gpu"}
    num_slots: int = 0  # vllm:max_gpu_lora_adapters


def parse_metrics(text: str, previous: PodMetrics) -> PodMetrics:
    values: dict[str, float] = {}
    lora, in_slots = [], set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:lora_requests_info":
                lora.append(sample)
            elif sample.name == "vllm:lora_adapter_loaded" and sample.labels["level"] == "gpu":
                in_slots.add(sample.labels["adapter_name"])
            else:
                values[sample.name] = sample.value
    current = PodMetrics(previous.active, previous.waiting, previous.max_active,
                         int(values["vllm:num_requests_waiting"]), values["vllm:kv_cache_usage_perc"],
                         in_slots, int(values["vllm:max_gpu_lora_adapters"]))
    named = [s for s in lora if s.labels["running_lora_adapters"] or s.labels["waiting_lora_adapters"]]
    if named:  # the latest series naming an adapter; none: the adapters seen before stay
        latest = max(named, key=lambda s: s.value).labels
        current.active = {a for a in latest["running_lora_adapters"].split(",") if a}
        current.waiting = {a for a in latest["waiting_lora_adapters"].split(",") if a}
        current.max_active = int(latest["max_lora"])
    return current


def picker_weights() -> dict[str, float]:
    (config_map,) = yaml.safe_load_all(PICKER_CONFIG.read_text())
    config = yaml.safe_load(config_map["data"]["plugins.yaml"])
    (profile,) = config["schedulingProfiles"]
    return {p["pluginRef"]: p["weight"] for p in profile["plugins"] if "weight" in p}


def lora_affinity(pod: PodMetrics, adapter: str) -> float:
    """The picker's lora-affinity-scorer."""
    if adapter in pod.active:
        return 1.0
    if len(pod.active) + len(pod.waiting) < pod.max_active:
        return 0.8
    if adapter in pod.waiting:
        return 0.6
    return 0.0


def residency_affinity(pod: PodMetrics, adapter: str) -> float:
    """The same scale from the residency metrics proposed upstream: 1.0 where the adapter is in a slot (running or
    not), 0.8 where a slot is empty, 0.6 where it waits. Not the picker's today: what those metrics make possible."""
    if adapter in pod.in_slots or adapter in pod.active:
        return 1.0
    if len(pod.in_slots) < pod.num_slots:
        return 0.8
    if adapter in pod.waiting:
        return 0.6
    return 0.0


Affinity = Callable[[PodMetrics, str], float]


def scores(pods: list[PodMetrics], adapter: str, weights: dict[str, float],
           affinity: Affinity = lora_affinity) -> list[float]:
    low, high = min(p.queue for p in pods), max(p.queue for p in pods)
    result = []
    for pod in pods:
        queue = 1.0 if high == low else (high - pod.queue) / (high - low)
        result.append(weights["lora-affinity-scorer"] * affinity(pod, adapter)
                      + weights["queue-scorer"] * queue
                      + weights["kv-cache-utilization-scorer"] * (1.0 - pod.kv_usage))
    return result


class AffinityRouter:
    """Scrapes every replica every 50 ms; picks the replica with the highest weighted score."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, seed: int,
                 affinity: Affinity = lora_affinity) -> None:
        self.urls = urls
        self.affinity = affinity
        self.client = client
        self.pods = [PodMetrics() for _ in urls]
        self.weights = picker_weights()
        self.random = random.Random(seed)

    async def refresh(self) -> None:
        texts = await asyncio.gather(*(self.client.get(f"{url}/metrics") for url in self.urls))
        self.pods = [parse_metrics(t.text, pod) for t, pod in zip(texts, self.pods, strict=True)]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_INTERVAL)

    def pick(self, adapter: str) -> int:
        result = scores(self.pods, adapter, self.weights, self.affinity)
        best = max(result)
        return self.random.choice([i for i, s in enumerate(result) if s == best])


# ---- load ----
def workload(names: list[str], seed: int = 7) -> list[tuple[int, str]]:
    """NUM_REQUESTS (index of the adapter by popularity, prompt) drawn from a Zipf distribution."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** ZIPF for rank in range(len(names))]
    picks = rng.choices(range(len(names)), weights=weights, k=NUM_REQUESTS)
    return [(i, f"Request {n} for tenant {i}: tell me about") for n, i in enumerate(picks)]


async def first_token_time(client: httpx.AsyncClient, url: str, adapter: str, prompt: str) -> float:
    body = {"model": adapter, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data:") and '"text"' in line:
                ttft = time.perf_counter() - started
    assert ttft is not None
    return ttft


async def activations(client: httpx.AsyncClient, urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        for family in text_string_to_metric_families((await client.get(f"{url}/metrics")).text):
            total += sum(s.value for s in family.samples if s.name == "malora_adapter_activations_total")
    return total


@dataclass
class PhaseResult:
    activations: float
    ttfts: list[float]
    per_replica: list[int]

    @property
    def p99(self) -> float:
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def run_phase(urls: list[str], names: list[str], choose: Callable[[str], int],
                    client: httpx.AsyncClient) -> PhaseResult:
    before = await activations(client, urls)
    requests = iter(workload(names))
    ttfts: list[float] = []
    per_replica = [0] * len(urls)

    async def worker() -> None:
        for index, prompt in requests:  # shared iterator: each request is sent once, in order
            replica = choose(names[index])
            per_replica[replica] += 1
            ttfts.append(await first_token_time(client, urls[replica], names[index], prompt))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return PhaseResult(await activations(client, urls) - before, ttfts, per_replica)


async def routed_phase(urls: list[str], names: list[str], affinity: Affinity,
                       client: httpx.AsyncClient) -> PhaseResult:
    router = AffinityRouter(urls, client, seed=1, affinity=affinity)
    await router.refresh()
    stop = asyncio.Event()
    scraper = asyncio.create_task(router.run(stop))
    try:
        return await run_phase(urls, names, router.pick, client)
    finally:
        stop.set()
        await scraper


async def compare(urls: list[str]) -> dict[str, PhaseResult]:
    """Round-robin, the picker, and the picker's scale on the residency metrics; each on its own adapters."""
    async with httpx.AsyncClient(headers=HEADERS, timeout=60) as client:
        # Warm-up: the first adapter wraps the model's layers on each replica, a one-time cost neither phase pays.
        await asyncio.gather(*(first_token_time(client, url, "warm", "Hello") for url in urls))
        cycle = itertools.cycle(range(len(urls)))
        return {
            "round-robin": await run_phase(urls, adapter_names("rr"), lambda _: next(cycle), client),
            "picker": await routed_phase(urls, adapter_names("af"), lora_affinity, client),
            "residency": await routed_phase(urls, adapter_names("rs"), residency_affinity, client),
        }


def test_picker_scores_follow_the_shipped_profile():
    weights = picker_weights()
    assert weights == {"lora-affinity-scorer": 2, "queue-scorer": 1, "kv-cache-utilization-scorer": 1}
    running = PodMetrics({"a"}, set(), 2, 3, 0.5)
    free = PodMetrics({"b"}, set(), 2, 0, 0.0)
    full = PodMetrics({"b", "c"}, {"a"}, 2, 1, 0.0)
    assert [lora_affinity(p, "a") for p in (running, free, full)] == [1.0, 0.8, 0.6]
    # running: 2 x 1.0 + 0 (longest queue) + 0.5; free: 2 x 0.8 + 1 + 1; full: 2 x 0.6 + 2/3 + 1.
    assert scores([running, free, full], "a", weights) == pytest.approx([2.5, 3.6, 1.2 + 2 / 3 + 1])


def test_affinity_routing_activates_fewer_adapters_than_round_robin(replicas):
    started = time.monotonic()
    results = asyncio.run(compare([r.url for r in replicas]))
    for policy, result in results.items():
        log.warning("%s: %d cold activations, TTFT p99 %.3f s, requests per replica %s", policy, result.activations,
                    result.p99, result.per_replica)
    log.warning("three phases of %d requests in %.1f s", NUM_REQUESTS, time.monotonic() - started)
    assert all(len(result.ttfts) == NUM_REQUESTS for result in results.values())
    assert results["picker"].activations < results["round-robin"].activations
    assert results["residency"].activations < results["round-robin"].activations
