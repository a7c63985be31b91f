"""vLLM-compatible metrics: the names, types and label formats that Kubernetes' inference gateway reads.

The Gateway API Inference Extension's endpoint picker scrapes every model server's `/metrics` and reads vLLM's
names by default: the queue (`vllm:num_requests_waiting`), the batch (`vllm:num_requests_running`), KV-cache use
(`vllm:kv_cache_usage_perc`, a fraction 0-1), the cache's shape (`vllm:cache_config_info`, label values, value 1)
and the adapters (`vllm:lora_requests_info`). Of that last series it keeps the one with the latest value (an update
time in Unix seconds), splits `running_lora_adapters` and `waiting_lora_adapters` on "," (an empty string: none) and
reads `max_lora` as an integer; it scores a pod 1.0 where the adapter runs, 0.8 where running plus waiting adapters
are fewer than `max_lora` (a free slot), 0.6 where the adapter waits.

The picker skips series whose two lists are both empty and, finding none left, keeps the adapters it last saw: in
vLLM every label combination ever set stays exported, so the last non-empty one outlives an idle spell. Here too:
besides the current series (value: now), `/metrics` keeps the last series that named an adapter, with the time it
was last current, so an idle replica still draws its adapters' requests, also from a picker that just started.

Here `running_lora_adapters` names the adapters of sequences in the running batch, and `waiting_lora_adapters`
those of sequences queued in the engine (preempted ones too) or of requests waiting for a free adapter slot (vLLM
repeats one set in both). `max_lora` is the adapter slots that can take an adapter for a request: every slot but
those held by pinned adapters with no request (they never leave theirs).

Residency (the metrics proposed upstream): `vllm:lora_adapter_loaded{adapter_name, level, pinned, rank}`, one series
per resident adapter, value 1, gone once it is evicted or unloaded. Our tiers map to the picker's levels:
`level="gpu"` is an adapter in one of the engine's slots (the `device` tier: it runs without being loaded again,
whether the slot bank is on a GPU or, on a CPU, read in place), `level="cpu"` an adapter parsed in host memory but
in no slot (the `cpu` tier: activating it is a copy, no read). Adapters only on disk or in a source have no series.
`rank` is the largest expert rank r of the adapter's modules. `vllm:max_gpu_lora_adapters` is the number of slots,
and `vllm:lora_adapter_load_seconds{level}` the time of each load: `cpu` a read from disk (or the source cache)
into host memory, `gpu` an activation into a slot (packing, evictions, the slot banks' writes).

Everything is built at scrape time from state the `malora_*` metrics read anyway (the engine's counters, a copy of
its queues' adapter names, the slots, the host tier's names): no per-step work, and a scrape costs microseconds
more. `--vllm-compatible-metrics false` leaves them out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

LEVEL_GPU = "gpu"  # an engine slot (Tier.DEVICE)
LEVEL_CPU = "cpu"  # host memory, no slot (Tier.HOST)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class ResidentLora:
    """An adapter in a slot or in host memory, as `vllm:lora_adapter_loaded` shows it."""

    name: str
    level: str  # LEVEL_GPU or LEVEL_CPU
    pinned: bool
    rank: int


@dataclass(frozen=True)
class VllmSnapshot:
    """What the vLLM-compatible families show, gathered once per scrape."""

    num_running: int
    num_waiting: int  # sequences queued in the engine plus requests waiting for a free slot
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    num_slots: int
    resident: tuple[ResidentLora, ...]
    time: float  # Unix seconds: the value of vllm:lora_requests_info

    @property
    def lora_labels(self) -> tuple[str, str, str]:
        """(max_lora, running_lora_adapters, waiting_lora_adapters) as label values."""
        return str(self.max_lora), ",".join(self.running_adapters), ",".join(self.waiting_adapters)

    @property
    def max_lora(self) -> int:
        """Slots that can hold an adapter for a request: all but those of pinned adapters with no request."""
        busy = {*self.running_adapters, *self.waiting_adapters}
        held = sum(1 for r in self.resident if r.level == LEVEL_GPU and r.pinned and r.name not in busy)
        return max(0, self.num_slots - held)


class VllmMetrics:
    """The one vLLM-compatible metric observed as it happens (load times), and the last `vllm:lora_requests_info`
    series that named an adapter; the rest are `families` of a snapshot."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_active: tuple[tuple[str, str, str], float] | None = None  # (label values, last time current)
        self.load_seconds = Histogram("vllm:lora_adapter_load_seconds", "Adapter load time: level=cpu a read from "
                                      "disk into host memory, level=gpu an activation into an engine slot",
                                      ["level"], buckets=LOAD_BUCKETS, registry=registry)
        for level in (LEVEL_CPU, LEVEL_GPU):  # both series exist from the start, at zero
            self.load_seconds.labels(level)

    def observe_loads(self, level: str, seconds: Iterable[float]) -> None:
        for value in seconds:
            self.load_seconds.labels(level).observe(value)

    def families(self, snapshot: VllmSnapshot) -> list[GaugeMetricFamily]:
        """The families of `snapshot`, `vllm:lora_requests_info` with the last series that named an adapter."""
        labels = snapshot.lora_labels
        if labels[1] or labels[2]:
            self.last_active = labels, snapshot.time
            return families(snapshot)
        return families(snapshot, self.last_active)


def families(snapshot: VllmSnapshot, last_active: tuple[tuple[str, str, str], float] | None = None
             ) -> list[GaugeMetricFamily]:
    """The families of `snapshot`; `last_active`, another `vllm:lora_requests_info` series (labels, time) to keep."""
    s = snapshot
    usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
    cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache's configuration (value 1)",
                              labels=["block_size", "num_gpu_blocks"])
    cache.add_metric([str(s.block_size), str(s.kv_blocks_total)], 1.0)
    lora = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters (comma-separated names) and "
                             "the adapter slots; the value is the update time in Unix seconds",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    if last_active is not None:
        lora.add_metric(list(last_active[0]), last_active[1])
    lora.add_metric(list(s.lora_labels), s.time)
    loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "1 for each resident adapter: level=gpu in an engine slot, "
                               "level=cpu in host memory and no slot", labels=["adapter_name", "level", "pinned",
                                                                               "rank"])
    for entry in s.resident:
        loaded.add_metric([entry.name, entry.level, "true" if entry.pinned else "false", str(entry.rank)], 1.0)
    return [
        GaugeMetricFamily("vllm:num_requests_running", "Sequences in the running batch", value=s.num_running),
        GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting: queued in the engine or for a free adapter "
                          "slot", value=s.num_waiting),
        GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache use, a fraction: 1 means all blocks in use",
                          value=usage),
        cache, lora, loaded,
        GaugeMetricFamily("vllm:max_gpu_lora_adapters", "Adapter slots of the engine (level=gpu adapters at most)",
                          value=s.num_slots),
    ]
