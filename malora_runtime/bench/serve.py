"""`malora bench serve`: load on any OpenAI-compatible server: throughput, TTFT, ITL and latency percentiles.

Closed loop (`--concurrency`, default 32) or open loop (`--rate`, Poisson arrivals); requests spread
over `--adapters` uniformly, by Zipf or all to one; prompts built in or from a JSONL file. The load
generator itself is `clients.loadgen` (usable as a library).

Comparisons start the servers themselves on the default model, one after the other, and run the same load on
each: `malora-serve` in `--dtype`, then whichever peers are named: `--compare-dtype float32` (this server again in
another dtype), `--compare-transformers` (`transformers serve --continuous-batching` in the same dtype; greedy, no
ignore_eos: it refuses it) and `--compare-llama-cpp PATH` (a `llama-server` binary on the default model's own
GGUF file, 32 slots). Each peer's ratios to malora-serve (output throughput, ITL p50, TTFT p50) are printed and
written under `comparisons` in `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.loadgen import (
    Lengths,
    LoadSpec,
    LoadTarget,
    RequestResult,
    Summary,
    build_plan,
    format_summary,
    load_prompts,
    run_load,
    summarize,
)

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=os.environ.get("MALORA_BASE_URL", "http://127.0.0.1:8000"),
                        help="server URL [env MALORA_BASE_URL]")
    target.add_argument("--api-key", default=os.environ.get("MALORA_API_KEY"), help="[env MALORA_API_KEY]")
    target.add_argument("--model", default=None, help="base model id (default: the server's first model)")
    target.add_argument("--compare-transformers", action="store_true",
                        help="start malora-serve and `transformers serve --continuous-batching` on the default "
                        "model and run the same load on each (ignores --base-url)")
    target.add_argument("--compare-llama-cpp", type=Path, default=None, metavar="LLAMA_SERVER",
                        help="start malora-serve and this llama.cpp `llama-server` binary on the default model's "
                        "GGUF file (32 slots) and run the same load on each")
    target.add_argument("--llama-cpp-args", default="", metavar="ARGS",
                        help="more arguments for llama-server, one string (e.g. \"--no-repack\" where its weight "
                        "repacking crashes: it did on this project's sandboxed Xeon)")
    target.add_argument("--compare-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="start malora-serve in --dtype and again in this dtype, the same load on each")
    target.add_argument("--quantization", choices=["none", "gguf", "int8"], default="none",
                        help="the started malora-serve's --quantization (the --compare-dtype one runs without)")
    target.add_argument("--server-args", default="", metavar="ARGS",
                        help="more flags for the started malora-serve, e.g. '--fast-decode false'")
    target.add_argument("--compare-server-args", default="", metavar="ARGS",
                        help="more flags for the --compare-dtype malora-serve")
    target.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="comparisons: malora-serve's dtype, and transformers' (auto: what the server picks "
                        "here)")
    load = parser.add_argument_group("load")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 32)")
    loop.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    load.add_argument("--num-requests", type=int, default=64)
    load.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load.add_argument("--adapters", default="", help="comma-separated adapter names (default: the base model)")
    load.add_argument("--popularity", choices=["uniform", "zipf", "one"], default="uniform")
    load.add_argument("--zipf-s", type=float, default=1.0, help="Zipf skew: weight of adapter i is 1/(i+1)^s")
    load.add_argument("--prompts", type=Path, default=None, help="JSONL: strings or {prompt|messages, ...}")
    load.add_argument("--prompt-words", type=Lengths.parse, default=None, help="N or LOW:HIGH words per prompt")
    load.add_argument("--output-len", type=Lengths.parse, default=Lengths(64, 64), help="N or LOW:HIGH tokens")
    load.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--response-format", choices=sorted(BENCH_RESPONSE_FORMATS), default=None,
                      help="run the load twice on --base-url: free, then every request with a JSON-schema "
                      "response_format (json: a bounded record that ends by itself; json-list: a list of records "
                      "that runs to the output length, as free text does); prints the throughput ratio")
    load.add_argument("--no-stream", action="store_true", help="no streaming (then no TTFT or ITL)")
    load.add_argument("--warmup", type=int, default=2, help="short requests before the run, not counted")
    load.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write the summary and every request here")
    out.add_argument("--plot", type=Path, default=None, help="write a PNG of latency against time here")
    out.add_argument("--no-progress", action="store_true")


def base_model_of(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/").removesuffix("/v1")
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    return next((m["id"] for m in models if not m.get("parent")), models[0]["id"])


def measure(args: argparse.Namespace, target: LoadTarget, model: str, title: str) -> tuple[Summary, list]:
    spec = LoadSpec(num_requests=args.num_requests, endpoint=args.endpoint,
                    adapters=[a for a in args.adapters.split(",") if a], popularity=args.popularity,
                    zipf_s=args.zipf_s, output_len=args.output_len, prompt_words=args.prompt_words,
                    prompts=load_prompts(args.prompts) if args.prompts else LoadSpec().prompts, seed=args.seed)
    plan = build_plan(spec, model)
    if args.warmup:
        warm = build_plan(LoadSpec(num_requests=args.warmup, endpoint=args.endpoint,
                                   output_len=Lengths(4, 4)), model)
        asyncio.run(run_load(warm, target, concurrency=1, stream=not args.no_stream))
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(plan), desc=title, unit="req", file=sys.stderr)
        except ImportError:
            pass
    concurrency = None if args.rate else args.concurrency or 32

    def progress(result: RequestResult) -> None:
        if bar is not None:
            bar.update(1)
            if result.error:
                bar.set_postfix_str(f"last error: {result.error}")

    results = asyncio.run(run_load(plan, target, concurrency=concurrency, rate=args.rate,
                                   stream=not args.no_stream, seed=args.seed, progress=progress))
    if bar is not None:
        bar.close()
    return summarize(results), results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The caller's keys are not the started server's: it listens on loopback for this process alone, which sends none.
CALLER_ONLY = ("MALORA_API_KEY", "MALORA_ADMIN_KEY")


def start_server(cmd: list[str], ready_path: str, log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inherited = {k: v for k, v in os.environ.items() if k not in CALLER_ONLY}
    with log_path.open("w") as out:
        process = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT,
                                   env={**inherited, **env}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{cmd[0]} not ready after 600 s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class Contender:
    """A server a comparison starts: its command (the port is appended), readiness path and environment."""

    name: str
    cmd: list[str]
    ready: str
    env: dict[str, str] = field(default_factory=dict)


LLAMA_CPP_SLOTS = 32
# `--response-format json`: a record with bounded fields, so that constrained outputs end by themselves (shorter
# than free text: the ratio then also counts the prefill of more requests per token). `json-list`: a list of such
# records, unbounded, so that constrained outputs run to the output length as the free ones do: the same tokens,
# the ratio is the constraint's own cost.
BENCH_RECORD = {"type": "object", "additionalProperties": False, "required": ["title", "rating", "tags"],
                "properties": {"title": {"type": "string", "maxLength": 48},
                               "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}}}
BENCH_RESPONSE_FORMATS = {
    name: {"type": "json_schema", "json_schema": {"name": "bench", "strict": True, "schema": schema}}
    for name, schema in (("json", BENCH_RECORD),
                         ("json-list", {"type": "array", "items": BENCH_RECORD, "minItems": 8}))}


def contenders(args: argparse.Namespace, dtype: str) -> list[Contender]:
    """malora-serve in `dtype` first, then each requested peer."""
    from malora_runtime.models.loader import default_gguf_path, materialize, resolve_model

    model_dir = str(materialize(resolve_model(None)))

    def malora(flags: list[str]) -> list[str]:
        # The converted float model starts faster than the GGUF file; the blocks (--quantization gguf) need the file.
        model = str(default_gguf_path()) if "gguf" in flags else model_dir
        return [sys.executable, "-m", "server.main", "--model", model, "--log-level", "warning", *flags]

    main_flags = [*(["--quantization", args.quantization] if args.quantization != "none" else []),
                  *shlex.split(args.server_args)]
    found = [Contender(" ".join([f"malora-{dtype}", *main_flags]), [*malora(main_flags), "--dtype", dtype], "/ready",
                       {"PYTHONPATH": str(REPO_ROOT)})]
    if args.compare_dtype:
        compare_flags = shlex.split(args.compare_server_args)
        found.append(Contender(" ".join([f"malora-{args.compare_dtype}", *compare_flags]),
                               [*malora(compare_flags), "--dtype", args.compare_dtype], "/ready",
                               {"PYTHONPATH": str(REPO_ROOT)}))
    if args.compare_transformers:
        transformers_cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        found.append(Contender("transformers", [transformers_cli, "serve", model_dir, "--continuous-batching",
                                                "--device", "cpu", "--dtype", dtype], "/health",
                               {"HF_HUB_OFFLINE": "1"}))
    if args.compare_llama_cpp:
        binary = args.compare_llama_cpp.expanduser()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise SystemExit(f"--compare-llama-cpp {binary}: not an executable file")
        # Its own GGUF (4.5-bit blocks), the form llama.cpp users serve; the context holds 32 slots of 512.
        found.append(Contender("llama.cpp", [str(binary), "-m", str(default_gguf_path()), "-np", str(LLAMA_CPP_SLOTS),
                                             "-c", str(LLAMA_CPP_SLOTS * 512), *shlex.split(args.llama_cpp_args)],
                               "/health"))
    return found


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """malora-serve's figure over the peer's: above 1 is better for throughput, below 1 for latencies."""
    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {"output_throughput": over(ours["output_throughput"], theirs["output_throughput"]),
            "itl_p50": over(ours["itl_s"]["p50"], theirs["itl_s"]["p50"]),
            "ttft_p50": over(ours["ttft_s"]["p50"], theirs["ttft_s"]["p50"])}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from malora_runtime.dtype_choice import choose_dtype

    dtype = choose_dtype(args.dtype, "cpu").name if args.dtype == "auto" else args.dtype
    if args.ignore_eos and args.compare_transformers:
        raise SystemExit("--ignore-eos: transformers serve refuses it; leave it out when comparing with transformers")
    logs = Path(tempfile.mkdtemp(prefix="malora-bench-serve-"))
    report: dict[str, Any] = {"dtype": dtype, "logs": str(logs), "servers": {}, "comparisons": {}}
    for contender in contenders(args, dtype):
        log_name = re.sub(r"[^\w.-]+", "_", contender.name)  # names hold the flags: spaces, dashes
        process, url = start_server(contender.cmd, contender.ready, logs / f"{log_name}.log", contender.env)
        try:
            target = LoadTarget(url, extra={"temperature": args.temperature,
                                            "ignore_eos": True if args.ignore_eos else None})
            summary, _ = measure(args, target, base_model_of(url, None), contender.name)
        finally:
            stop_server(process)
        _out(format_summary(summary, f"== {contender.name} ({' '.join(contender.cmd[:3])} ...)"))
        report["servers"][contender.name] = summary.to_dict()
    ours_name, *peers = report["servers"]
    ours = report["servers"][ours_name]
    for peer in peers:
        found = report["comparisons"][peer] = ratios(ours, report["servers"][peer])
        _out(f"{ours_name} / {peer}: output throughput {found['output_throughput'] or 0:.2f}x, "
             f"ITL p50 {found['itl_p50'] or 0:.2f}, TTFT p50 {found['ttft_p50'] or 0:.2f}")
    return report


def run(args: argparse.Namespace) -> int:
    if args.compare_transformers or args.compare_llama_cpp or args.compare_dtype:
        report = compare(args)
        results: list[RequestResult] = []
    else:
        target = LoadTarget(args.base_url, args.api_key, extra={"temperature": args.temperature,
                                                                 "ignore_eos": True if args.ignore_eos else None})
        model = args.model or base_model_of(args.base_url, args.api_key)
        summary, results = measure(args, target, model, args.base_url)
        _out(format_summary(summary, f"== {args.base_url}"))
        report = {"summary": summary.to_dict(), "requests": [asdict(r) for r in results]}
        if args.response_format:  # the same load again, every request constrained to the schema
            constrained = LoadTarget(args.base_url, args.api_key, extra={
                **target.extra, "response_format": BENCH_RESPONSE_FORMATS[args.response_format]})
            with_format, _ = measure(args, constrained, model, f"{args.base_url} (response_format)")
            _out(format_summary(with_format, f"== {args.base_url}, response_format json_schema"))
            ratio = with_format.output_throughput / summary.output_throughput if summary.output_throughput else None
            report["constrained"] = {"summary": with_format.to_dict(), "throughput_ratio": ratio}
            _out(f"output throughput with response_format / without: {ratio or 0:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot and results:
        from clients.plot import latency_plot

        series = {"e2e": [(r.start + r.e2e, r.e2e) for r in results if r.error is None],
                  "ttft": [(r.start + r.ttft, r.ttft) for r in results if r.ttft is not None],
                  "error": [(r.start + r.e2e, r.e2e) for r in results if r.error is not None]}
        latency_plot(args.plot, series)
    return 0 if report.get("summary", {}).get("completed", 1) else 1
