"""Adapter hot swap: load latency from disk to first token, and inter-token latency while adapters swap.

One process, one run, the default model, the server's own adapter manager (registry + engine slots)
in front of the async engine, so the path measured is the one a request takes:
  load   a request names an adapter that is on disk only (read, validated, copied into a slot, then
         prefill): time to its first token, p50/p99, per example adapter (a ~10 MB fp16 adapter on
         q,k,v,o,gate,up,down, and a small one). Each repetition uses a fresh name, so nothing is cached
         but the OS page cache.
  itl    `--streams` streaming requests run back to back on four adapters; the p99 gap between tokens
         of running streams without swaps, then with a reload (a new version of an adapter in use,
         read from disk) every `--swap-interval` seconds; phases alternate `--rounds` times.
Bars (issue 5): swap ITL p99 <= 1.5x no-swap ITL p99; load p50 <= 250 ms for the 10 MB adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a short note about the weather in spring."
BIG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams during the ITL phases")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens per stream request")
    # Long phases: on a noisy VM a few slow steps decide a p99 drawn from too few gaps
    # (docs/BENCHMARKS.md, "Why the ITL p99 needs long phases").
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each ITL phase")
    parser.add_argument("--rounds", type=int, default=3, help="no-swap/swap phase pairs")
    parser.add_argument("--swap-interval", type=float, default=0.2, help="seconds between reloads")
    parser.add_argument("--load-reps", type=int, default=10, help="cold loads per example adapter")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the results as a Markdown section here (for docs/BENCHMARKS.md)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _write_adapters(shapes, base: str, root: Path, reps: int) -> dict[str, Path]:
    """The example adapters (and a second version of each) under `root`; `reps` names per adapter for cold loads."""
    from ..adapters import save_adapter
    from ..adapters.init import random_adapter

    specs = {"big": (BIG_TARGETS, 4, 4, 16, 2), "small": (["q_proj", "v_proj"], 2, 4, 8, 1)}
    examples: dict[str, Path] = {}
    for i, (name, (targets, experts, rank, d, top_k)) in enumerate(specs.items()):
        for version in (1, 2):
            adapter = random_adapter(shapes, base, targets, experts, rank, d, top_k, seed=10 * i + version)
            directory = root / name if version == 1 else root / "versions" / name
            save_adapter(adapter, directory)
        examples[name] = root / name
        for rep in range(reps):
            (root / f"{name}-cold{rep}").symlink_to(root / name, target_is_directory=True)
    for extra in range(2):  # two more adapters for the streams
        adapter = random_adapter(shapes, base, ["q_proj", "v_proj"], 2, 4, 8, 1, seed=100 + extra)
        save_adapter(adapter, root / f"extra{extra}")
    return examples


async def _first_token(engine, manager, prompt_ids: list[int], name: str) -> float:
    from ..sampling_params import SamplingParams

    started = time.perf_counter()
    host = await manager.resolve(name)
    stream = engine.generate(prompt_ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), host)
    async for _ in stream:
        break
    await stream.aclose()
    return time.perf_counter() - started


async def _streams(engine, manager, prompt_ids, names, count, tokens, stop: asyncio.Event) -> list[float]:
    from ..sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    gaps: list[float] = []

    async def one(i: int) -> None:
        while not stop.is_set():
            name = names[i % len(names)]
            host = await manager.resolve(name)
            last = None
            async for _ in engine.generate(prompt_ids, params, host):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

    await asyncio.gather(*(one(i) for i in range(count)))
    return gaps


async def _phase(engine, manager, prompt_ids, args, names, swap: bool, root: Path) -> tuple[list[float], int]:
    stop = asyncio.Event()
    swaps = 0

    async def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            await asyncio.sleep(args.swap_interval)
            name = ("big", "small")[swaps % 2]
            path = root / "versions" / name if (swaps // 2) % 2 == 0 else root / name
            await manager.load(name, path, reload=True)
            swaps += 1

    async def timer() -> None:
        await asyncio.sleep(args.seconds)
        stop.set()

    tasks = [timer()] + ([swapper()] if swap else [])
    gaps, *_ = await asyncio.gather(_streams(engine, manager, prompt_ids, names, args.streams, args.output_tokens,
                                             stop), *tasks)
    return gaps, swaps


async def _run(args: argparse.Namespace) -> dict:
    from ..adapters.manager import AdapterManager
    from ..adapters.registry import AdapterRegistry
    from ..config import EngineConfig
    from ..engine.async_engine import AsyncEngine

    threads = torch.get_num_threads()  # the engine thread's; from_config leaves this thread 1
    engine = AsyncEngine.from_config(EngineConfig(model=args.model, max_loaded_adapters=8))
    shapes = engine.module_shapes()
    prompt_ids = list(engine.tokenizer(PROMPT)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        examples = _write_adapters(shapes, engine.model_name, root, args.load_reps)
        sizes = {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in examples.items()}
        registry = AdapterRegistry(shapes, [root], max_cpu_adapters=64)
        manager = AdapterManager(engine, registry, max_loaded=8)
        engine.start()
        try:
            await _first_token(engine, manager, prompt_ids, "extra0")  # warm-up
            loads: dict[str, dict] = {}
            for name in examples:
                seconds = [await _first_token(engine, manager, prompt_ids, f"{name}-cold{rep}")
                           for rep in range(args.load_reps)]
                warm = [await _first_token(engine, manager, prompt_ids, f"{name}-cold0") for _ in range(args.load_reps)]
                entries = [registry.host_entry(f"{name}-cold{rep}") for rep in range(args.load_reps)]
                reads = [entry.load_seconds for entry in entries if entry is not None]
                loads[name] = {"bytes": sizes[name], "p50_ms": percentile(seconds, 0.5) * 1e3,
                               "p99_ms": percentile(seconds, 0.99) * 1e3,
                               "read_p50_ms": statistics.median(reads) * 1e3 if reads else None,
                               "warm_p50_ms": percentile(warm, 0.5) * 1e3}
            names = ["big", "small", "extra0", "extra1"]
            phases: dict[str, list[float]] = {"no_swap": [], "swap": []}
            swaps = 0
            for _ in range(args.rounds):
                for key in ("no_swap", "swap"):
                    gaps, count = await _phase(engine, manager, prompt_ids, args, names, key == "swap", root)
                    phases[key] += gaps
                    swaps += count
        finally:
            await asyncio.to_thread(engine.shutdown, 5.0)
    itl = {key: {"p50_ms": percentile(g, 0.5) * 1e3, "p99_ms": percentile(g, 0.99) * 1e3, "tokens": len(g)}
           for key, g in phases.items()}
    return {"load": loads, "itl": itl, "swaps": swaps, "engine_threads": threads,
            "itl_ratio": itl["swap"]["p99_ms"] / itl["no_swap"]["p99_ms"],
            "slot_evictions": engine.stats().num_adapter_evictions}


def _markdown(results: dict, args: argparse.Namespace, command: str) -> str:
    machine = f"{platform.machine()}, {results['engine_threads']} torch threads (engine), {platform.system()}, torch " \
              f"{torch.__version__}, Python {platform.python_version()}"
    lines = ["## Adapter hot swap (`malora bench swap`)", "", f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Model: {args.model or 'SmolLM2-135M-Instruct'} float32, 8 adapter slots.", "",
             "| adapter | size on disk | first token after a cold load p50 | p99 | of which read + validate p50 "
             "| first token, adapter already in a slot, p50 |", "|---|---|---|---|---|---|"]
    for name, figures in results["load"].items():
        read = figures["read_p50_ms"]
        lines.append(f"| {name} | {figures['bytes'] / 1e6:.1f} MB | {figures['p50_ms']:.0f} ms | "
                     f"{figures['p99_ms']:.0f} ms | {'-' if read is None else f'{read:.0f} ms'} | "
                     f"{figures['warm_p50_ms']:.0f} ms |")
    itl = results["itl"]
    lines += ["", f"Inter-token latency of {args.streams} running streams ({results['swaps']} reloads, one every "
              f"{args.swap_interval * 1e3:.0f} ms during the swap phases):", "",
              "| phase | tokens | ITL p50 | ITL p99 |", "|---|---|---|---|"]
    for key, label in (("no_swap", "no swaps"), ("swap", "swapping")):
        lines.append(f"| {label} | {itl[key]['tokens']} | {itl[key]['p50_ms']:.1f} ms | {itl[key]['p99_ms']:.1f} ms |")
    big = results["load"]["big"]
    lines += ["", f"Bars: swap ITL p99 / no-swap ITL p99 = {results['itl_ratio']:.2f} (bar <= 1.5: "
              f"{'met' if results['itl_ratio'] <= 1.5 else 'NOT met'}); load p50 of the "
              f"{big['bytes'] / 1e6:.0f} MB adapter = {big['p50_ms']:.0f} ms (bar <= 250 ms: "
              f"{'met' if big['p50_ms'] <= 250 else 'NOT met'}).", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = asyncio.run(_run(args))
    command = "malora bench swap " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "swap"] else sys.argv[1:])
    text = _markdown(results, args, command.strip())
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="malora bench swap", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
