"""What completions and chat share: model resolution, admission, sampling settings, streaming plumbing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from malora_runtime.adapters.registry import (
    AdapterNameError,
    AdapterRegistry,
    HostAdapter,
    UnknownAdapterNameError,
)
from malora_runtime.engine.outputs import RequestOutput
from malora_runtime.sampling_params import SamplingParams

from .adapters import AdapterManager
from .engine_client import EngineClient
from .errors import APIError, from_sampling_error, invalid, not_ready, to_api_error
from .protocol import SamplingFields, UsageInfo
from .settings import ServerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


@dataclass
class ServerState:
    """Everything the routes reach: settings, the engine (None while loading) and the adapters."""

    settings: ServerSettings
    engine: EngineClient | None = None
    adapters: AdapterManager | None = None
    served_model_name: str | None = None
    num_admitted: int = 0
    """Sequences of requests accepted and not yet finished (bounded by settings.max_admitted)."""
    draining: bool = False

    @property
    def registry(self) -> AdapterRegistry | None:
        return self.adapters.registry if self.adapters is not None else None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_running and not self.draining

    @property
    def base_model(self) -> str:
        assert self.engine is not None
        return self.served_model_name or self.engine.model_name

    def require_engine(self) -> EngineClient:
        if not self.ready:
            raise not_ready()
        assert self.engine is not None
        return self.engine

    async def resolve_adapter(self, model: str | None) -> HostAdapter | None:
        """The adapter version a request's `model` names, read from disk on first use (None: the base model).

        404 for a name that is not an adapter (or was unloaded); a broken adapter on disk is a 400.
        """
        if model is None or model in (self.base_model, self.engine.model_name):
            return None
        try:
            if self.adapters is None:
                raise UnknownAdapterNameError(model)
            return await self.adapters.resolve(model)
        except (AdapterNameError, UnknownAdapterNameError):
            raise APIError(404, f"the model {model!r} does not exist", param="model",
                           code="model_not_found") from None

    def check_capacity(self, num_seqs: int) -> None:
        """429 when admitting `num_seqs` more sequences would pass the bound (an idle server takes any request)."""
        limit = self.settings.max_admitted
        if self.num_admitted > 0 and self.num_admitted + num_seqs > limit:
            raise APIError(429, f"the server is at capacity ({self.num_admitted} sequences queued or running, "
                           f"limit {limit}); retry later", code="queue_full", headers={"Retry-After": "1"})

    @contextlib.contextmanager
    def admission(self, num_seqs: int):
        """Count `num_seqs` against the bound for as long as the request runs."""
        self.num_admitted += num_seqs
        try:
            yield
        finally:
            self.num_admitted -= num_seqs


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if body.logit_bias:
        raise invalid("logit_bias is not supported", param="logit_bias")
    defaults = SamplingParams()
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=body.min_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            min_p=defaults.min_p if body.min_p is None else body.min_p,
            repetition_penalty=body.repetition_penalty or defaults.repetition_penalty,
            frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
            seed=body.seed, stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, n=body.n,
            logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as exc:
        raise from_sampling_error(exc) from None


class TokenText:
    """Text of single tokens, cached (logprobs name each token by its text)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


@dataclass
class UsageCounter:
    prompt_tokens: int = 0
    completion_tokens: dict[tuple[int, int], int] | None = None  # (prompt, choice) -> generated

    def update(self, prompt_index: int, output: RequestOutput) -> None:
        if self.completion_tokens is None:
            self.completion_tokens = {}
        for c in output.outputs:
            self.completion_tokens[(prompt_index, c.index)] = c.num_output_tokens

    def usage(self) -> UsageInfo:
        completion = sum((self.completion_tokens or {}).values())
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)


async def merged_outputs(
    engine: EngineClient, prompts: list[list[int]], params: SamplingParams, adapter: str | None, rid: str,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of every prompt's stream, interleaved. Closing it aborts all of them."""
    if len(prompts) == 1:
        async with contextlib.aclosing(engine.generate(prompts[0], params, adapter, rid)) as stream:
            async for output in stream:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, prompt: list[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate(prompt, params, adapter, f"{rid}-{i}")) as stream:
                async for output in stream:
                    queue.put_nowait((i, output))
        except Exception as exc:  # handed to the consumer
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def adapter_headers(host: HostAdapter | None) -> dict[str, str]:
    """Which adapter version serves the request (set at resolve time, before admission)."""
    return {} if host is None else {"x-malora-adapter-version": str(host.version)}


def sse_response(events: AsyncIterator[str], admission: contextlib.AbstractContextManager,
                 headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(sse_stream(events, admission), media_type="text/event-stream", headers=headers)


async def sse_stream(events: AsyncIterator[str], admission: contextlib.AbstractContextManager
                     ) -> AsyncIterator[str]:
    """Server-sent events ending in [DONE]; an error mid-stream becomes an error event.

    `admission` is entered here, not by the caller: a stream that never starts (the client left
    before the first byte) then holds nothing.
    """
    with admission:
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    yield event
        except Exception as exc:
            yield sse(to_api_error(exc).body())
        yield SSE_DONE


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
