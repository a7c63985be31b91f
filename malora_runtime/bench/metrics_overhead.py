"""Engine step throughput with metrics on against off, in one run.

"On" is what a server does per step: the kernels count tokens per expert on the device, a listener
records the step in Prometheus histograms, and routing counts are harvested once a second. "Off"
has none of it. Both run the same mixed-adapter decode workload, alternating several times.

`--scrape-hz HZ`: instead, a real server (the default model, the example adapters) under a fixed streamed load,
with a scraper reading `/metrics` HZ times a second (Kubernetes' inference gateway picker polls every 50 ms: 20)
against none, alternating; steps/s from the engine's own step counter over each load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs, alternated")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--scrape-hz", type=float, default=0.0,
                        help="a real server, scraped HZ times a second against not at all (e.g. 20)")
    parser.add_argument("--concurrency", type=int, default=16, help="with --scrape-hz: requests in flight")


def _run(engine, prompts, adapters, new_tokens: int, on_step) -> float:
    from malora_runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"m-{time.monotonic_ns()}-{i}", prompt, params, adapter)
    steps = 0
    started = time.perf_counter()
    last_harvest = started
    while engine.has_unfinished():
        step_started = time.perf_counter()
        engine.step()
        steps += 1
        if on_step is not None:
            on_step(time.perf_counter() - step_started, engine.last_step_tokens, engine.last_step_seqs)
            if time.perf_counter() - last_harvest >= 1.0:
                engine.runner.adapters.harvest_expert_counts()
                last_harvest = time.perf_counter()
    return steps / (time.perf_counter() - started)


def _load_steps_per_second(url: str, adapters: list[str], args: argparse.Namespace, scrape_hz: float) -> float:
    """Steps/s of the server over one load of `args.requests` completions, `args.concurrency` at a time, while a
    thread reads /metrics `scrape_hz` times a second (0: not at all)."""
    import concurrent.futures
    import threading

    import httpx

    stop = threading.Event()

    def scrape() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.wait(1 / scrape_hz):
                client.get("/metrics").raise_for_status()

    def complete(i: int) -> None:
        body = {"model": adapters[i % len(adapters)], "prompt": f"Request {i}: tell me a story about the sea.",
                "max_tokens": args.output_tokens, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=600) as client:
            client.post("/v1/completions", json=body).raise_for_status()

    with httpx.Client(base_url=url, timeout=10) as client:
        steps_before = client.get("/v1/engine/stats").json()["num_steps"]
        scraper = threading.Thread(target=scrape, daemon=True) if scrape_hz > 0 else None
        started = time.perf_counter()
        if scraper is not None:
            scraper.start()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(complete, range(args.requests)))
        elapsed = time.perf_counter() - started
        stop.set()
        if scraper is not None:
            scraper.join()
        return (client.get("/v1/engine/stats").json()["num_steps"] - steps_before) / elapsed


def run_scraped(args: argparse.Namespace) -> int:
    import tempfile

    from .serve import base_model_of, start_server, stop_server

    log = Path(tempfile.mkdtemp(prefix="malora-bench-metrics-")) / "server.log"
    process, url = start_server([sys.executable, "-m", "server.main", "--adapter-root", "examples/adapters"], "/ready",
                                log, {})
    try:
        import httpx

        base = base_model_of(url, None)
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        adapters = [m for m in models if m != base][:args.adapters] or [base]
        _load_steps_per_second(url, adapters, argparse.Namespace(**{**vars(args), "requests": 4}), 0)  # warm-up
        on, off = [], []
        for _ in range(args.rounds):
            off.append(_load_steps_per_second(url, adapters, args, 0))
            on.append(_load_steps_per_second(url, adapters, args, args.scrape_hz))
    finally:
        stop_server(process)
    ratio = sorted(on)[len(on) // 2] / sorted(off)[len(off) // 2]
    sys.stdout.write(f"steps/s, no scraper:            {[round(v, 2) for v in off]}\n"
                     f"steps/s, /metrics at {args.scrape_hz:g} Hz: {[round(v, 2) for v in on]}\n"
                     f"ratio scraped/not (medians): {ratio:.3f}\n")
    if args.json:
        args.json.write_text(json.dumps({"scrape_hz": args.scrape_hz, "scraped": on, "not_scraped": off,
                                         "ratio": ratio}, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.scrape_hz > 0:
        return run_scraped(args)
    from prometheus_client import CollectorRegistry, Histogram

    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.bench.offline import _prompts
    from malora_runtime.config import EngineConfig
    from malora_runtime.engine.llm_engine import LLMEngine
    from malora_runtime.models.loader import load_model
    from malora_runtime.patching import linear_shapes

    model, tokenizer, source = load_model(None)
    engine = LLMEngine(model, tokenizer, EngineConfig(count_expert_routing=True), source.name)
    shapes = linear_shapes(model)
    for i in range(args.adapters):
        engine.add_adapter(f"m{i}", random_adapter(shapes, source.name, TARGETS, 4, 8, 16, 2, seed=i, dtype="float32"))
    prompts = _prompts(tokenizer, args.requests, 32)
    names = [f"m{i % args.adapters}" for i in range(args.requests)]
    registry = CollectorRegistry()
    tokens = Histogram("bench_step_tokens", "", buckets=(1, 8, 64, 512, 4096), registry=registry)
    seqs = Histogram("bench_step_seqs", "", buckets=(1, 8, 64, 512), registry=registry)

    def on_step(seconds: float, n_tokens: int, n_seqs: int) -> None:
        tokens.observe(n_tokens)
        seqs.observe(n_seqs)

    _run(engine, prompts, names, 4, None)  # warm-up
    on, off = [], []
    for _ in range(args.rounds):
        engine.runner.routing.enabled = False
        off.append(_run(engine, prompts, names, args.output_tokens, None))
        engine.runner.routing.enabled = True
        on.append(_run(engine, prompts, names, args.output_tokens, on_step))
    ratio = sorted(on)[len(on) // 2] / sorted(off)[len(off) // 2]
    sys.stdout.write(f"steps/s metrics off: {off}\nsteps/s metrics on:  {on}\nratio on/off (medians): {ratio:.3f}\n")
    if args.json:
        args.json.write_text(json.dumps({"on": on, "off": off, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
