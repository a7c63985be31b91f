"""The vLLM-compatible metrics Kubernetes' inference gateway reads: exact names, types and labels, the running and
waiting adapter lists while requests run and wait, residency series that leave on eviction and unload, and the flag
that turns them off. One server with 2 adapter slots, a batch of 2 and 3 adapters, so that requests wait both for a
free slot and in the engine's queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.vllm_metrics import LEVEL_CPU, LEVEL_GPU, ResidentLora, VllmMetrics, VllmSnapshot, families
from tests.server.server_helpers import API_KEY, LiveServer, start_server, stop_server, wait_idle, wait_ready

ADMIN = "vllm-metrics-admin-key"
ADAPTERS = ("alpha", "beta", "gamma")
GAUGES = {  # name -> label names of its series
    "vllm:num_requests_running": set(),
    "vllm:num_requests_waiting": set(),
    "vllm:kv_cache_usage_perc": set(),
    "vllm:cache_config_info": {"block_size", "num_gpu_blocks"},
    "vllm:lora_requests_info": {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
    "vllm:lora_adapter_loaded": {"adapter_name", "level", "pinned", "rank"},
    "vllm:max_gpu_lora_adapters": set(),
}
LONG = {"max_tokens": 1500, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def vllm_server(default_model, tmp_path_factory) -> Iterator[LiveServer]:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    model, _, source = default_model
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("vllm-adapters")
    args = []
    for seed, (name, rank) in enumerate(zip(ADAPTERS, (4, 2, 8), strict=True)):
        adapter = random_adapter(shapes, source.name, ["q_proj", "v_proj"], 2, rank, 8, 1, seed, dtype="float32")
        args.append(f"--adapter={name}={save_adapter(adapter, root / name)}")
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    args += ["--max-loaded-adapters", "2", "--max-num-seqs", "2", "--admin-key", ADMIN, "--log-level", "warning",
             "--shutdown-timeout", "5"]
    process, url = start_server(args, log, env={"MALORA_API_KEY": API_KEY})
    try:
        wait_ready(process, url, log)
        yield LiveServer(url, process, log, source.name)
    finally:
        stop_server(process)


@dataclass
class Family:
    type: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def scrape(url: str) -> dict[str, Family]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return {f.name: Family(f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)}


def only(families_: dict[str, Family], name: str) -> tuple[dict[str, str], float]:
    (sample,) = families_[name].samples
    return sample[1], sample[2]


def lists(families_: dict[str, Family]) -> tuple[list[str], list[str]]:
    """(running, waiting) of the current series (the latest value), split on "," ("" = none)."""
    labels = max(families_["vllm:lora_requests_info"].samples, key=lambda s: s[2])[1]
    return split(labels)


def split(labels: dict[str, str]) -> tuple[list[str], list[str]]:
    return ([a for a in labels["running_lora_adapters"].split(",") if a],
            [a for a in labels["waiting_lora_adapters"].split(",") if a])


def picker_view(families_: dict[str, Family]) -> tuple[list[str], list[str]] | None:
    """What the picker takes: of the series naming an adapter, the one with the latest value (None: none does, and
    it keeps what it saw before)."""
    named = [s for s in families_["vllm:lora_requests_info"].samples if any(split(s[1]))]
    return split(max(named, key=lambda s: s[2])[1]) if named else None


def residency(families_: dict[str, Family]) -> dict[str, tuple[str, str, str]]:
    return {labels["adapter_name"]: (labels["level"], labels["pinned"], labels["rank"])
            for _, labels, _ in families_["vllm:lora_adapter_loaded"].samples}


def test_names_types_and_labels_are_the_pickers(vllm_server):
    before = time.time()
    found = scrape(vllm_server.url)
    for name, labels in GAUGES.items():
        assert found[name].type == "gauge", name
        for sample_name, sample_labels, _ in found[name].samples:
            assert sample_name == name and set(sample_labels) == labels, (name, sample_labels)
    assert found["vllm:lora_adapter_load_seconds"].type == "histogram"
    assert {s[1]["level"] for s in found["vllm:lora_adapter_load_seconds"].samples} == {LEVEL_CPU, LEVEL_GPU}

    _, running = only(found, "vllm:num_requests_running")
    _, waiting = only(found, "vllm:num_requests_waiting")
    _, usage = only(found, "vllm:kv_cache_usage_perc")
    assert (running, waiting, usage) == (0, 0, 0)
    cache, value = only(found, "vllm:cache_config_info")
    _, total = only(found, "malora_kv_blocks_total")
    assert cache == {"block_size": "16", "num_gpu_blocks": str(int(total))} and value == 1
    assert picker_view(found) is None
    info, updated = only(found, "vllm:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert before - 1 <= updated <= time.time() + 1  # the update time, in Unix seconds
    assert only(found, "vllm:max_gpu_lora_adapters")[1] == 2
    # The first two adapters took the two slots at start; the third stays parsed in host memory.
    assert residency(found) == {"alpha": (LEVEL_GPU, "false", "4"), "beta": (LEVEL_GPU, "false", "2"),
                                "gamma": (LEVEL_CPU, "false", "8")}
    assert all(value == 1 for *_, value in found["vllm:lora_adapter_loaded"].samples)


def _stream(url: str, model: str, started: threading.Event, stop: threading.Event) -> None:
    """A long streamed completion on `model`: `started` once a token arrives, closed (aborted) once `stop` is set."""
    body = {"model": model, "prompt": f"A story about {model}:", **LONG}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as h, \
            h.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                started.set()
            if stop.is_set():
                return


def test_running_and_waiting_adapters_are_listed_apart(vllm_server):
    """alpha and beta run (both slots busy, the batch of 2 full); gamma waits for a free slot; a second alpha
    request waits in the engine's queue. The picker must see running = alpha,beta and waiting = alpha,gamma."""
    url = vllm_server.url
    stop = threading.Event()
    threads, events = [], []
    try:
        for model in ("alpha", "beta", "gamma", "alpha"):
            events.append(threading.Event())
            threads.append(threading.Thread(target=_stream, args=(url, model, events[-1], stop), daemon=True))
            threads[-1].start()
            if len(threads) <= 2:  # the first two run before the others are sent
                assert events[-1].wait(60), f"{model} did not start"
        deadline = time.monotonic() + 30
        while True:
            found = scrape(url)
            if picker_view(found) == (["alpha", "beta"], ["alpha", "gamma"]) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert picker_view(found) == lists(found) == (["alpha", "beta"], ["alpha", "gamma"])
        assert only(found, "vllm:num_requests_running")[1] == 2
        assert only(found, "vllm:num_requests_waiting")[1] == 2  # one queued in the engine, one for a slot
        assert 0 < only(found, "vllm:kv_cache_usage_perc")[1] < 1
        assert not events[2].is_set() and not events[3].is_set()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    with vllm_server.http() as h:
        wait_idle(h, timeout=60)
    found = scrape(url)
    assert lists(found) == ([], [])  # now: nothing runs or waits
    # The last series that named adapters stays, older, for the picker (it skips series with both lists empty).
    assert len(found["vllm:lora_requests_info"].samples) == 2
    assert picker_view(found) == (["alpha", "beta"], ["alpha", "gamma"])
    # gamma got a slot once the first two ended: beta (idle, least recently used; alpha was held by the queued
    # request) went back to host memory.
    assert residency(found) == {"alpha": (LEVEL_GPU, "false", "4"), "beta": (LEVEL_CPU, "false", "2"),
                                "gamma": (LEVEL_GPU, "false", "8")}
    _, activations = only(found, "malora_adapter_activations")
    assert activations == 3
    loads = {s[1]["level"]: s[2] for s in found["vllm:lora_adapter_load_seconds"].samples
             if s[0] == "vllm:lora_adapter_load_seconds_count"}
    assert loads == {LEVEL_GPU: 3, LEVEL_CPU: 3}


def test_series_leave_on_unload(vllm_server):
    with httpx.Client(base_url=vllm_server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
        for name in ("gamma", "beta"):  # one in a slot, one in host memory
            assert admin.delete(f"/v1/adapters/{name}").status_code == 200
    found = scrape(vllm_server.url)
    assert residency(found) == {"alpha": (LEVEL_GPU, "false", "4")}


def test_max_lora_leaves_out_slots_of_idle_pinned_adapters():
    """Pinned adapters never leave their slot: with none of their requests, those slots cannot take another."""
    resident = (ResidentLora("p", LEVEL_GPU, True, 4), ResidentLora("q", LEVEL_GPU, True, 4),
                ResidentLora("r", LEVEL_CPU, True, 4))
    snapshot = VllmSnapshot(1, 0, 3, 12, 16, ("p",), (), 4, resident, 1.5e9)
    assert snapshot.max_lora == 3
    text = "\n".join(f"{f.name} {s.labels} {s.value}" for f in families(snapshot) for s in f.samples)
    assert "'max_lora': '3'" in text and "vllm:kv_cache_usage_perc {} 0.25" in text


def test_the_last_series_naming_adapters_outlives_an_idle_spell():
    from prometheus_client import CollectorRegistry

    metrics = VllmMetrics(CollectorRegistry())

    def series(running: tuple[str, ...], when: float) -> list[tuple[dict[str, str], float]]:
        snapshot = VllmSnapshot(len(running), 0, 0, 8, 16, running, (), 2, (), when)
        (info,) = [f for f in metrics.families(snapshot) if f.name == "vllm:lora_requests_info"]
        return [(sample.labels, sample.value) for sample in info.samples]

    empty = {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert series((), 1.0) == [(empty, 1.0)]
    assert series(("a",), 2.0) == [({**empty, "running_lora_adapters": "a"}, 2.0)]
    assert series((), 3.0) == [({**empty, "running_lora_adapters": "a"}, 2.0), (empty, 3.0)]
    assert series(("b",), 4.0) == [({**empty, "running_lora_adapters": "b"}, 4.0)]


def test_the_flag_turns_the_vllm_names_off(tiny_model_dir, tmp_path):
    log = tmp_path / "server.log"
    process, url = start_server(["--model", str(tiny_model_dir), "--vllm-compatible-metrics", "false",
                                 "--log-level", "warning"], log,
                                env={"MALORA_API_KEY": API_KEY})
    try:
        wait_ready(process, url, log)
        found = scrape(url)
    finally:
        stop_server(process)
    assert "malora_requests_running" in found
    assert not [name for name in found if name.startswith("vllm:")]
