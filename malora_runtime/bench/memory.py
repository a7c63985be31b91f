"""Adapter memory as a user sees it: a running server's resident memory before and after its adapters load.

Writes adapters under a fresh adapter root (fp16, as `malora adapter init` does), starts the server on
the default model (`server.main`, loopback), warms it with a base-model request, then sends one short
request to each adapter in turn (each is read from disk, packed and put in a slot: a cold activation,
timed) and reads the server process's RSS from /proc. Finally `--batch` concurrent requests over that many
distinct adapters check that they share the engine's batches.

  default      the four shapes of issue 21: alpha N 4 r 8 d 16 on q/k/v/o; beta N 8 r 4 d 32 on q/v;
               gamma N 1 r 16 on all seven projections; delta N 6 r 8 d 24 on the MLP
  --count K    K adapters instead: random ones of those four shapes (`--shape mixed`), or all of the
               offline benchmark's shape (`--shape offline`: N 4, r 8, d 16 on q/k/v/o)

Goal (issue 21): RSS growth <= 1.2 x the adapters' file bytes + 64 MiB.

  --base       the base model instead (issue 29): a started server's RSS, after a few requests, above a process
               that only imports it, against the GGUF file's bytes x 1.15 + the KV pool + 300 MiB; the server's
               flags from --server-args (e.g. "--quantization gguf"), several runs one after the other
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .adapter_shapes import MIXED_SHAPES as SHAPES
from .adapter_shapes import OFFLINE_SHAPE
from .serve import REPO_ROOT, start_server, stop_server

log = logging.getLogger(__name__)

GOAL_RATIO, GOAL_SLACK = 1.2, 64 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=0, help="K adapters (0: the four shapes of issue 21)")
    parser.add_argument("--shape", choices=("mixed", "offline"), default="mixed",
                        help="with --count: random ones of the four shapes, or all N 4 r 8 d 16 on q/k/v/o")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="the adapters' dtype on disk (and in memory)")
    parser.add_argument("--batch", type=int, default=0,
                        help="then this many concurrent requests over as many distinct adapters (default: "
                             "min(64, adapters))")
    parser.add_argument("--json", type=Path, default=None, help="write adapter_bytes, rss_growth_bytes and the rest")
    parser.add_argument("--base", action="store_true", help="measure the base model's memory instead (see above)")
    parser.add_argument("--server-args", action="append", default=None,
                        help="with --base: the server's flags, one string per configuration (repeatable; default: "
                             "none, the defaults)")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _write_adapters(args: argparse.Namespace, root: Path) -> dict[str, int]:
    """Adapters under `root`; their names and file bytes."""
    from ..adapters import save_adapter
    from ..adapters.init import random_adapter
    from ..models.loader import load_model
    from ..patching import linear_shapes

    model, _, source = load_model(None)
    shapes = linear_shapes(model)
    del model
    if args.count:
        rng = random.Random(0)
        plan = [(f"a{i:04d}", OFFLINE_SHAPE if args.shape == "offline" else SHAPES[rng.choice(list(SHAPES))])
                for i in range(args.count)]
    else:
        plan = list(SHAPES.items())
    sizes = {}
    for seed, (name, (targets, n, r, d, k)) in enumerate(plan):
        directory = save_adapter(random_adapter(shapes, source.name, targets, n, r, d, k, seed=seed, dtype=args.dtype),
                                 root / name)
        sizes[name] = sum(p.stat().st_size for p in directory.iterdir())
    return sizes


def _complete(client: httpx.Client, model: str) -> float:
    started = time.perf_counter()
    response = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    response.raise_for_status()
    return time.perf_counter() - started


async def _batch(url: str, names: list[str]) -> tuple[float, int]:
    """Concurrent requests, one per adapter: (seconds, how many succeeded)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(name: str) -> bool:
            body = {"model": name, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
            return (await client.post("/v1/completions", json=body)).status_code == 200

        started = time.perf_counter()
        done = await asyncio.gather(*(one(n) for n in names))
        return time.perf_counter() - started, sum(done)


def _metric(text: str, name: str, labels: str = "") -> float | None:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return None


def measure(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="malora-bench-memory-"))
    root = workdir / "adapters"
    sizes = _write_adapters(args, root)
    names = sorted(sizes)
    adapter_bytes = sum(sizes.values())
    slots = max(32, len(names))
    batch = args.batch or min(64, len(names))
    cmd = [sys.executable, "-m", "server.main", "--adapter-root", str(root), "--log-level", "warning",
           "--max-loaded-adapters", str(slots), "--max-cpu-adapters", str(max(64, len(names))),
           "--max-cpu-adapter-bytes", str(2 * adapter_bytes + (1 << 30)),
           "--adapter-bank-memory", str(2 * adapter_bytes + (1 << 30)),
           "--max-num-seqs", str(max(64, batch)), "--state-dir", str(workdir / "state")]
    process, url = start_server(cmd, "/ready", workdir / "server.log", {"PYTHONPATH": str(REPO_ROOT)})
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            base = client.get("/v1/models").json()["data"][0]["id"]
            for _ in range(3):
                _complete(client, base)
            before = _rss(process.pid)
            cold = [_complete(client, name) for name in names]
            after = _rss(process.pid)
            scraped = client.get("/metrics").text
        seconds, succeeded = asyncio.run(_batch(url, names[:batch]))
    finally:
        stop_server(process)
        shutil.rmtree(root, ignore_errors=True)  # the adapters (GBs with --count); the server log stays
    growth = after - before
    goal = GOAL_RATIO * adapter_bytes + GOAL_SLACK
    return {
        "adapters": len(names), "shape": "issue 21's four" if not args.count else args.shape, "dtype": args.dtype,
        "adapter_bytes": adapter_bytes, "rss_before_bytes": before, "rss_after_bytes": after,
        "rss_growth_bytes": growth, "growth_over_adapter_bytes": growth / adapter_bytes,
        "goal_bytes": goal, "meets_goal": growth <= goal,
        "reported_slot_bytes": _metric(scraped, "malora_adapter_memory_bytes", 'tier="device"'),
        "reported_host_bytes": _metric(scraped, "malora_adapter_memory_bytes", 'tier="cpu"'),
        "cold_activation_p50_s": statistics.median(cold),
        "cold_activation_p99_s": sorted(cold)[min(len(cold) - 1, round(0.99 * (len(cold) - 1)))],
        "batch": {"requests": batch, "distinct_adapters": batch, "succeeded": succeeded, "seconds": seconds},
        "logs": str(workdir / "server.log"),
    }


BASE_RATIO, BASE_SLACK = 1.15, 300 << 20
IMPORTS = "import torch, transformers, fastapi, server.main, malora_runtime.engine.llm_engine"


def _imported_rss() -> int:
    """RSS of a process that has imported the server and everything it loads, and nothing else."""
    script = f"{IMPORTS}\nimport pathlib\nprint(next(l for l in pathlib.Path('/proc/self/status').read_text()" \
             ".splitlines() if l.startswith('VmRSS:')).split()[1])"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return int(out.stdout.split()[-1]) * 1024


def measure_base(server_args: str) -> dict:
    """One server with `server_args`: its RSS after three 32-token requests, against the bar."""
    from ..models.loader import default_gguf_path

    workdir = Path(tempfile.mkdtemp(prefix="malora-bench-memory-base-"))
    cmd = [sys.executable, "-m", "server.main", "--log-level", "info", *shlex.split(server_args)]
    imported = _imported_rss()
    process, url = start_server(cmd, "/ready", workdir / "server.log", {"PYTHONPATH": str(REPO_ROOT)})
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            base = client.get("/v1/models").json()["data"][0]["id"]
            for _ in range(3):
                client.post("/v1/completions", json={"model": base, "prompt": "Tell me a story", "max_tokens": 32,
                                                     "ignore_eos": True}).raise_for_status()
            version = client.get("/version").json()
            rss = _rss(process.pid)
    finally:
        stop_server(process)
    pool = re.search(r"KV pool: \d+ blocks of \d+ tokens \((\d+) MiB\)", (workdir / "server.log").read_text())
    pool_bytes = int(pool.group(1)) << 20 if pool else 0
    file_bytes = default_gguf_path().stat().st_size
    goal = BASE_RATIO * file_bytes + pool_bytes + BASE_SLACK
    growth = rss - imported
    return {"server_args": server_args, "weights": version.get("weights"), "dtype": version.get("dtype"),
            "cpu_isa": version.get("cpu_isa"), "gguf_bytes": file_bytes, "kv_pool_bytes": pool_bytes,
            "imported_rss_bytes": imported, "server_rss_bytes": rss, "rss_above_import_bytes": growth,
            "goal_bytes": goal, "meets_goal": growth <= goal, "logs": str(workdir / "server.log")}


def run_base(args: argparse.Namespace) -> int:
    mib = 1 << 20
    results = []
    for server_args in args.server_args or [""]:
        result = measure_base(server_args)
        results.append(result)
        sys.stdout.write(
            f"[{server_args or 'defaults'}] weights {result['weights']}, {result['dtype']}, {result['cpu_isa']}: "
            f"RSS {result['server_rss_bytes'] / mib:.0f} MiB, {result['rss_above_import_bytes'] / mib:.0f} MiB above "
            f"an importing process ({result['imported_rss_bytes'] / mib:.0f}); goal <= "
            f"{result['goal_bytes'] / mib:.0f} MiB (GGUF {result['gguf_bytes'] / mib:.0f} MiB x {BASE_RATIO} + KV "
            f"pool {result['kv_pool_bytes'] / mib:.0f} + 300): {'met' if result['meets_goal'] else 'NOT met'}\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.base:
        return run_base(args)
    if args.count < 0 or args.batch < 0:
        raise SystemExit("--count and --batch must be >= 0")
    result = measure(args)
    mib = 1 << 20
    sys.stdout.write(
        f"{result['adapters']} adapters ({result['shape']}, {result['dtype']}): "
        f"{result['adapter_bytes'] / mib:.1f} MiB on disk; server RSS +{result['rss_growth_bytes'] / mib:.1f} MiB "
        f"({result['growth_over_adapter_bytes']:.2f}x; goal <= {result['goal_bytes'] / mib:.1f} MiB: "
        f"{'met' if result['meets_goal'] else 'NOT met'}); /metrics: {(result['reported_slot_bytes'] or 0) / mib:.1f} "
        f"MiB in slots, {(result['reported_host_bytes'] or 0) / mib:.1f} MiB in host memory\n"
        f"cold activation (read, pack, slot, 1 token) p50 {result['cold_activation_p50_s'] * 1e3:.0f} ms, "
        f"p99 {result['cold_activation_p99_s'] * 1e3:.0f} ms; {result['batch']['succeeded']}/"
        f"{result['batch']['requests']} concurrent requests over distinct adapters in "
        f"{result['batch']['seconds']:.1f} s\n")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["batch"]["succeeded"] == result["batch"]["requests"] else 1
