"""Load generator for any OpenAI-compatible server: closed loop (fixed concurrency) or open loop (Poisson).

    plan = build_plan(LoadSpec(num_requests=64, adapters=["alpha", "beta"], popularity="zipf"), base_model)
    results = asyncio.run(run_load(plan, LoadTarget("http://127.0.0.1:8000"), concurrency=32))
    summary = summarize(results)

Every request is planned up front from the seed (model, prompt, output length), so two servers get the
same load. Streaming requests record the time to the first token (TTFT) and the gaps between later
chunks (inter-token latency, ITL); failures are counted by status, never retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sdk import AsyncMaloraClient, RetryPolicy
from .types import MaloraError

BUILTIN_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step, for a curious ten-year-old.",
    "Describe a walk through a busy market in the morning, with sounds and smells.",
    "List ten ideas for a rainy weekend and say why each one is fun.",
    "Explain the water cycle and why it matters for farming.",
    "Write a letter to a friend about learning to bake bread.",
    "Describe how to plan a vegetable garden for a small balcony.",
    "Tell the story of a robot who learns to paint.",
    "Explain what makes a good team and give examples from sports.",
    "Write a travel guide paragraph about a small mountain village.",
    "Explain how the moon affects the tides, with a simple example.",
    "Describe the life of a honeybee from egg to forager.",
    "Give advice to someone starting to learn the piano as an adult.",
    "Write a poem about the first snow of winter, then explain its imagery.",
    "Explain why the sky is blue and why sunsets are red.",
    "Describe a day in the life of a train conductor.",
]
FILLER = ("Please answer in detail and keep going with examples, reasons and a short summary at the end. "
          "Think about history, people, places and everyday life while you write.")


@dataclass(slots=True)
class Lengths:
    """A fixed length (`low == high`) or one drawn uniformly from [low, high]: parsed from "64" or "32:128"."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> Lengths:
        low, _, high = str(text).partition(":")
        lengths = cls(int(low), int(high or low))
        if not 1 <= lengths.low <= lengths.high:
            raise ValueError(f"lengths must be 1 <= low <= high, got {text!r}")
        return lengths

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(slots=True)
class LoadSpec:
    num_requests: int = 64
    endpoint: str = "chat"
    """chat (`/v1/chat/completions`, the prompt as one user message) or completions."""
    adapters: list[str] = field(default_factory=list)
    """Adapter names to spread requests over; empty: all go to the base model."""
    popularity: str = "uniform"
    """uniform, zipf (adapter i drawn with weight 1 / (i+1)^zipf_s) or one (every request to the first)."""
    zipf_s: float = 1.0
    output_len: Lengths = field(default_factory=lambda: Lengths(64, 64))
    prompt_words: Lengths | None = None
    """Pad (with filler) or cut each prompt to this many words; None: prompts as they are."""
    prompts: list[Any] = field(default_factory=lambda: list(BUILTIN_PROMPTS))
    """Strings, or JSONL records: {"prompt": str} or {"messages": [...]}, optionally "max_tokens", "model"."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {self.endpoint!r}")
        if self.popularity not in ("uniform", "zipf", "one"):
            raise ValueError(f"popularity must be uniform, zipf or one, got {self.popularity!r}")
        if self.num_requests < 1 or not self.prompts:
            raise ValueError("need at least one request and one prompt")


@dataclass(slots=True)
class PlannedRequest:
    index: int
    model: str
    path: str
    body: dict[str, Any]


@dataclass(slots=True)
class LoadTarget:
    base_url: str
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields added to every body (e.g. temperature, ignore_eos); `None` values remove a field."""
    timeout: float = 600.0


@dataclass(slots=True)
class RequestResult:
    index: int
    model: str
    start: float
    """Seconds after the run began."""
    e2e: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def load_prompts(path: str | Path) -> list[Any]:
    """A JSONL file: one string, or one object with "prompt" or "messages", per line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not (isinstance(record, str) or (isinstance(record, dict) and ("prompt" in record or "messages" in record))):
            raise ValueError(f"{path}:{number}: expected a string or an object with prompt or messages")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def adapter_weights(n: int, popularity: str, zipf_s: float) -> list[float]:
    if popularity == "one":
        return [1.0] + [0.0] * (n - 1)
    if popularity == "zipf":
        return [1.0 / (i + 1) ** zipf_s for i in range(n)]
    return [1.0] * n


def _fit(text: str, words: int) -> str:
    have = text.split()
    while len(have) < words:
        have += FILLER.split()
    return " ".join(have[:words])


def build_plan(spec: LoadSpec, base_model: str) -> list[PlannedRequest]:
    rng = random.Random(spec.seed)
    models = spec.adapters or [base_model]
    weights = adapter_weights(len(models), spec.popularity, spec.zipf_s)
    plan = []
    for i in range(spec.num_requests):
        record = spec.prompts[i % len(spec.prompts)]
        record = {"prompt": record} if isinstance(record, str) else dict(record)
        model = record.get("model") or rng.choices(models, weights)[0]
        max_tokens = record.get("max_tokens") or spec.output_len.sample(rng)
        if spec.prompt_words is not None and "prompt" in record:
            record["prompt"] = _fit(record["prompt"], spec.prompt_words.sample(rng))
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
        if spec.endpoint == "chat":
            body["messages"] = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            plan.append(PlannedRequest(i, model, "/v1/chat/completions", body))
        else:
            body["prompt"] = record.get("prompt") or "\n".join(m["content"] for m in record["messages"])
            plan.append(PlannedRequest(i, model, "/v1/completions", body))
    return plan


async def _one(client: AsyncMaloraClient, request: PlannedRequest, target: LoadTarget, stream: bool,
               t0: float) -> RequestResult:
    body = {**request.body, **target.extra}
    body = {k: v for k, v in body.items() if v is not None}
    result = RequestResult(request.index, request.model, time.perf_counter() - t0)
    started = time.perf_counter()
    try:
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
            response = await client.send("POST", request.path, body, stream=True)
            await _read_stream(client, response, result, started)
        else:
            data = (await client.send("POST", request.path, body)).json()
            usage = data.get("usage") or {}
            result.output_tokens = usage.get("completion_tokens", 0)
            result.prompt_tokens = usage.get("prompt_tokens", 0)
    except MaloraError as exc:
        result.error = f"{exc.status} {exc.code or exc.type or ''}".strip() if exc.status else "connection"
    except Exception as exc:  # a broken stream or timeout counts as an error of this request, not of the run
        result.error = type(exc).__name__
    result.e2e = time.perf_counter() - started
    if result.error is None and stream and result.ttft is None:
        result.error = "empty stream"
    return result


async def _read_stream(client: AsyncMaloraClient, response, result: RequestResult, started: float) -> None:
    from .sdk import parse_event, sse_data

    last = None
    chunks = 0
    try:
        async for line in response.aiter_lines():
            data = sse_data(line)
            if data is None:
                continue
            if data == "[DONE]":
                break
            event = parse_event(data)
            if any((c.get("delta") or {}).get("content") or c.get("text") for c in event.get("choices") or []):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
            usage = event.get("usage")
            if usage:
                result.output_tokens = usage.get("completion_tokens", 0)
                result.prompt_tokens = usage.get("prompt_tokens", 0)
    finally:
        await response.aclose()
    result.output_tokens = result.output_tokens or chunks


async def run_load(plan: list[PlannedRequest], target: LoadTarget, concurrency: int | None = None,
                   rate: float | None = None, stream: bool = True, seed: int = 0,
                   progress: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Closed loop with `concurrency` workers, or open loop at `rate` requests/s (Poisson arrivals)."""
    import httpx

    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency or 64)
    http = httpx.AsyncClient(base_url=target.base_url.rstrip("/").removesuffix("/v1"), limits=limits,
                             timeout=target.timeout)
    client = AsyncMaloraClient(target.base_url, api_key=target.api_key, retry=RetryPolicy(max_retries=0),
                               http_client=http)
    results: list[RequestResult] = []
    t0 = time.perf_counter()

    async def one(request: PlannedRequest) -> None:
        result = await _one(client, request, target, stream, t0)
        results.append(result)
        if progress is not None:
            progress(result)

    async with client:
        if concurrency is not None:
            queue = list(reversed(plan))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plan)))))
        else:
            rng = random.Random(seed)
            tasks = []
            for request in plan:
                tasks.append(asyncio.create_task(one(request)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.index)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None,
            **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


@dataclass(slots=True)
class Summary:
    requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    request_throughput: float
    output_throughput: float
    """Output tokens per second over the whole run."""
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    per_model: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: list[RequestResult]) -> Summary:
    done = [r for r in results if r.error is None]
    duration = max((r.start + r.e2e for r in results), default=0.0) - min((r.start for r in results), default=0.0)
    per_model: dict[str, dict[str, int]] = {}
    for r in results:
        row = per_model.setdefault(r.model, {"requests": 0, "completed": 0, "output_tokens": 0, "prompt_tokens": 0})
        row["requests"] += 1
        row["completed"] += r.error is None
        row["output_tokens"] += r.output_tokens
        row["prompt_tokens"] += r.prompt_tokens
    output_tokens = sum(r.output_tokens for r in done)
    return Summary(
        requests=len(results), completed=len(done), failed=len(results) - len(done),
        errors=dict(Counter(r.error for r in results if r.error is not None)), duration_s=duration,
        output_tokens=output_tokens, prompt_tokens=sum(r.prompt_tokens for r in done),
        request_throughput=len(done) / duration if duration else 0.0,
        output_throughput=output_tokens / duration if duration else 0.0,
        ttft_s=_stats([r.ttft for r in done if r.ttft is not None]),
        itl_s=_stats([gap for r in done for gap in r.itl]), e2e_s=_stats([r.e2e for r in done]),
        per_model=dict(sorted(per_model.items())),
    )


def format_summary(summary: Summary, title: str = "") -> str:
    def ms(stats: dict[str, float | None]) -> str:
        return "  ".join(f"{k} {v * 1000:8.1f}" if v is not None else f"{k} {'-':>8}" for k, v in stats.items())

    lines = [title] if title else []
    lines += [
        f"requests      {summary.completed}/{summary.requests} ok, {summary.failed} failed"
        + (f" {summary.errors}" if summary.errors else ""),
        f"duration      {summary.duration_s:.2f} s",
        f"throughput    {summary.output_throughput:.1f} output tok/s, {summary.request_throughput:.2f} req/s "
        f"({summary.output_tokens} output, {summary.prompt_tokens} prompt tokens)",
        f"TTFT ms       {ms(summary.ttft_s)}",
        f"ITL ms        {ms(summary.itl_s)}",
        f"e2e ms        {ms(summary.e2e_s)}",
    ]
    lines += [f"  {model:<28} {row['completed']:>4}/{row['requests']:<4} req  {row['output_tokens']:>7} out tok"
              for model, row in summary.per_model.items()]
    return "\n".join(lines)
