"""Ties `ServerMetrics` to a running server: scrape-time engine and adapter figures, routing harvests,
and the dashboard's JSON summary."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from malora_runtime.adapters.format import AdapterConfig
from malora_runtime.adapters.manager import Tier
from malora_runtime.engine.outputs import EngineStats

from .metrics import ServerMetrics, counter, gauge
from .serving import ServerState
from .vllm_metrics import LEVEL_CPU, LEVEL_GPU, ResidentLora, VllmSnapshot

ROUTING_INTERVAL = 1.0  # seconds: the device-side counters are read at most this often
# Seconds between scans of the adapter roots for the disk tier: a scan stats every adapter directory (50 ms for
# 1,000 of them here), too much for every scrape of a picker that polls at 20 Hz; it runs in a worker thread.
DISK_SCAN_INTERVAL = 10.0
TIERS = tuple(tier.value for tier in Tier)


def max_rank(config: AdapterConfig) -> int:
    """The largest expert rank r of an adapter's modules."""
    return max((spec.r for spec in config.modules.values()), default=0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Telemetry:
    def __init__(self, state: ServerState, metrics: ServerMetrics) -> None:
        self.state = state
        self.metrics = metrics
        self._last_routing = 0.0
        self._last_disk_scan = -DISK_SCAN_INTERVAL
        self._on_disk: list[str] = []  # adapter names found under the roots by the last scan
        metrics.set_state_collector(self._families)
        metrics.is_known = self.is_known_model
        state.on_constrained = metrics.observe_constrained
        engine = state.engine
        if engine is not None:
            engine.add_request_listener(metrics.observe_request)
            engine.add_step_listener(metrics.observe_step)

    # ---- periodic work ----
    async def refresh(self) -> None:
        """Harvest expert routing (at most once a second) and adapter load times."""
        engine = self.state.engine
        now = time.monotonic()
        if engine is not None and engine.is_running and now - self._last_routing >= ROUTING_INTERVAL:
            self._last_routing = now
            summed, by_layer = await engine.harvest_routing()
            self.metrics.observe_routing(summed)
            self.metrics.observe_layer_routing(by_layer)
        if self.state.adapters is not None:
            self.metrics.observe_adapter_loads(self.state.adapters.drain_load_seconds())
            if now - self._last_disk_scan >= DISK_SCAN_INTERVAL:
                self._last_disk_scan = now
                self._on_disk = list(await asyncio.to_thread(self.state.adapters.registry.discover))
        if engine is not None:
            self.metrics.observe_adapter_activations(engine.drain_activation_seconds())

    def is_known_model(self, name: str) -> bool:
        if self.state.engine is not None and name in (self.state.base_model, self.state.engine.model_name):
            return True
        return self.state.adapters is not None and self.state.adapters.is_known_model(name)

    def adapter_tiers(self) -> dict[str, str]:
        """Where each known adapter is: `device` (a slot), `cpu` (host memory) or `disk` (as of the last scan)."""
        adapters = self.state.adapters
        if adapters is None:
            return {}
        registry = adapters.registry
        unloaded = registry.unloaded_names()  # since the scan too
        on_disk = [name for name in self._on_disk if name not in unloaded] + list(registry.registered_paths())
        return {name: tier.value for name, tier in adapters.tiers(on_disk).items()}

    def adapter_memory(self) -> dict[str, int | None]:
        """Bytes held by adapters in slots and in host memory (not in a slot), with their budgets."""
        if self.state.adapters is None:
            return {}
        counts = self.state.adapters.stats()
        return {"device": counts.slot_bytes, "device_budget": counts.slot_budget,
                "cpu": counts.host_bytes, "cpu_budget": counts.host_budget}

    # ---- scrape-time families ----
    def _families(self) -> list[Any]:
        engine = self.state.engine
        if engine is None:
            return []
        stats = engine.stats()
        families = [
            gauge("malora_requests_running", "Sequences running in the engine", stats.num_running),
            gauge("malora_requests_waiting", "Sequences waiting for the engine", stats.num_waiting),
            gauge("malora_requests_waiting_for_adapter", "Requests waiting for a free adapter slot",
                  stats.num_waiting_for_adapter),
            gauge("malora_kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used),
            gauge("malora_kv_blocks_total", "KV cache blocks in the pool", stats.kv_blocks_total),
            counter("malora_preemptions", "Sequences preempted for lack of KV blocks", stats.num_preemptions),
            counter("malora_engine_steps", "Engine steps run", stats.num_steps),
            counter("malora_prefix_cache_hits", "Prompt tokens served from the prefix cache", stats.prefix_cache_hits),
            counter("malora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                    stats.prefix_cache_queries),
        ]
        tiers = self.adapter_tiers()
        per_tier = {tier: 0 for tier in TIERS}
        for tier in tiers.values():
            per_tier[tier] += 1
        loaded = GaugeMetricFamily("malora_adapters_loaded", "Adapters per tier", labels=["tier"])
        for tier, count in per_tier.items():
            loaded.add_metric([tier], count)
        where = GaugeMetricFamily("malora_adapter_tier", "1 for the tier each adapter is in",
                                  labels=["adapter", "tier"])
        for name, tier in sorted(tiers.items()):
            label = self.metrics.adapter_label(name)
            if label != "other":
                where.add_metric([label, tier], 1)
        families += [loaded, where]
        counts = self.state.adapters.stats() if self.state.adapters is not None else None
        families += [
            counter("malora_adapter_loads", "Adapters read from disk", counts.loads if counts else 0),
            counter("malora_adapter_reloads", "Adapters reloaded as a new version", counts.reloads if counts else 0),
            counter("malora_adapter_unloads", "Adapters unloaded", counts.unloads if counts else 0),
            counter("malora_adapter_evictions", "Adapters evicted from a device slot", stats.num_adapter_evictions),
            counter("malora_adapter_activations", "Adapter versions written into a device slot (cold activations)",
                    stats.num_adapter_activations),
            counter("malora_adapter_host_evictions", "Adapters evicted from host memory",
                    counts.host_evictions if counts else 0),
        ]
        if counts is not None:
            memory = GaugeMetricFamily("malora_adapter_memory_bytes", "Bytes held by adapters per tier (device: in "
                                       "slots, read in place from host memory on a CPU; cpu: host memory, not in a "
                                       "slot)", labels=["tier"])
            budget = GaugeMetricFamily("malora_adapter_memory_budget_bytes", "Budget for the bytes of each tier",
                                       labels=["tier"])
            memory.add_metric([Tier.DEVICE.value], counts.slot_bytes)
            memory.add_metric([Tier.HOST.value], counts.host_bytes)
            budget.add_metric([Tier.HOST.value], counts.host_budget)
            if counts.slot_budget is not None:
                budget.add_metric([Tier.DEVICE.value], counts.slot_budget)
            copies = gauge("malora_adapter_device_copy_bytes", "Bytes of device copies of adapters in slots (a GPU; "
                           "0 where the kernels read them in host memory)", stats.adapter_device_copy_bytes)
            families += [memory, budget, copies, *self._source_families()]
        if self.metrics.vllm is not None:
            families += self.metrics.vllm.families(self.vllm_snapshot(stats))
        return families

    def vllm_snapshot(self, stats: EngineStats) -> VllmSnapshot:
        """The vLLM-compatible figures, from `stats` and the adapters' current places (vllm_metrics.py)."""
        engine = self.state.engine
        assert engine is not None
        activity = engine.adapter_activity()
        resident = engine.resident_adapters()
        loras = [ResidentLora(name, LEVEL_GPU, r.pinned, max_rank(r.config)) for name, r in sorted(resident.items())]
        registry = self.state.adapters.registry if self.state.adapters is not None else None
        if registry is not None:
            for name in sorted(registry.host_names()):
                host = registry.host_entry(name)
                if name not in resident and host is not None:
                    loras.append(ResidentLora(name, LEVEL_CPU, registry.is_pinned(name), max_rank(host.adapter.config)))
        return VllmSnapshot(
            num_running=stats.num_running, num_waiting=stats.num_waiting + stats.num_waiting_for_adapter,
            kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
            block_size=self.state.settings.engine.block_size, running_adapters=activity.running,
            waiting_adapters=activity.waiting, num_slots=self.state.settings.engine.max_loaded_adapters,
            resident=tuple(loras), time=time.time(),
        )

    def _source_families(self) -> list[Any]:
        """Per adapter from a source: its latest fetch time; the cache's bytes."""
        registry = self.state.adapters.registry if self.state.adapters is not None else None
        if registry is None or not registry.sources:
            return []
        fetch = GaugeMetricFamily("malora_adapter_fetch_seconds", "Listing and, when not cached, downloading and "
                                  "validating the latest version of an adapter from its source",
                                  labels=["adapter", "source"])
        for name, fetched in sorted(registry.last_fetch.items()):
            label = self.metrics.adapter_label(name)
            if label != "other":
                fetch.add_metric([label, fetched.ref.source.name], fetched.seconds)
        assert registry.source_cache is not None
        cache = gauge("malora_adapter_cache_bytes", "Bytes of adapters fetched from sources in the local cache",
                      registry.source_cache.num_bytes)
        return [fetch, cache]

    # ---- dashboard ----
    def summary(self) -> dict[str, Any]:
        engine = self.state.engine
        now = time.time()
        window = 60.0
        recent = [r for t, r in self.metrics.recent if now - t <= window]
        ttft = [r.time_to_first_token for r in recent if r.time_to_first_token is not None]
        itl = [gap for r in recent for gap in r.inter_token_latencies]
        per_adapter: dict[str, dict[str, float]] = {}
        for record in recent:
            entry = per_adapter.setdefault(self.metrics.adapter_label(record.adapter),
                                           {"requests": 0, "tokens": 0})
            entry["requests"] += 1
            entry["tokens"] += record.generation_tokens
        stats = engine.stats() if engine is not None else None
        return {
            "time": now,
            "model": self.state.base_model if engine is not None else None,
            "window_seconds": window,
            "throughput_tokens_per_second": sum(r.generation_tokens for r in recent) / window,
            "requests_per_second": len(recent) / window,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
            "running": stats.num_running if stats else 0,
            "waiting": stats.num_waiting if stats else 0,
            "kv_blocks_used": stats.kv_blocks_used if stats else 0,
            "kv_blocks_total": stats.kv_blocks_total if stats else 0,
            "preemptions": stats.num_preemptions if stats else 0,
            "adapters": per_adapter,
            "tiers": self.adapter_tiers(),
            "adapter_memory": self.adapter_memory(),
            "routing": self.metrics.routing_snapshot(),
            "routing_by_layer": self.metrics.layer_routing_snapshot(),
        }
