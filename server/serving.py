"""What completions and chat share: model resolution, admission, sampling settings, streaming plumbing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from malora_runtime.adapters.errors import AdapterError
from malora_runtime.adapters.manager import AdapterManager
from malora_runtime.adapters.registry import (
    AdapterNameError,
    HostAdapter,
    UnknownAdapterError,
)
from malora_runtime.adapters.sources import AdapterSourceError
from malora_runtime.engine.outputs import RequestOutput
from malora_runtime.engine.structured import GrammarError
from malora_runtime.sampling_params import SamplingParams

from .engine_client import EngineClient
from .errors import APIError, from_sampling_error, invalid, not_ready, to_api_error
from .protocol import SamplingFields, UsageInfo
from .settings import ServerSettings
from .structured_outputs import Constraint

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
    on_constrained: Callable[[str, float | None], None] | None = None
    """Told (kind, compile seconds or None when cached) of each request admitted with a grammar (metrics)."""
    num_admitted: int = 0
    """Sequences of requests accepted and not yet finished (bounded by settings.max_admitted)."""
    draining: bool = False

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
                raise UnknownAdapterError(model)
            return await self.adapters.resolve(model)
        except (AdapterNameError, UnknownAdapterError):
            raise APIError(404, f"the model {model!r} does not exist", param="model",
                           code="model_not_found") from None
        except AdapterSourceError as exc:  # the source is down and nothing is cached: try again later
            raise APIError(503, self.adapters.public_message(str(exc)), param="model",
                           code="adapter_source_unavailable", headers={"Retry-After": "5"}) from None
        except AdapterError as exc:  # API callers get the reason, not the server's directories
            raise APIError(400, self.adapters.public_message(str(exc)), param="model",
                           code="invalid_adapter") from None

    async def prepare_constraint(self, constraint: Constraint | None) -> PreparedConstraint | None:
        """Build and compile the grammar of `constraint` in worker threads (the request waits; the batch does
        not); 400 naming the field when it cannot be used."""
        if constraint is None:
            return None
        engine = self.require_engine()
        try:
            grammar = await asyncio.to_thread(constraint.build)
            seconds = await engine.prepare_grammar(grammar)
        except GrammarError as exc:
            raise invalid(f"{constraint.param}: cannot be used: {exc}", param=constraint.param) from None
        if self.on_constrained is not None:
            self.on_constrained(constraint.kind, seconds)
        return PreparedConstraint(constraint.kind, constraint.param, grammar)

    def check_admissible(self, num_seqs: int, param: str = "n") -> None:
        """400 for a request of more sequences than the queue could ever admit at once."""
        limit = self.settings.max_admitted
        if num_seqs > limit:
            raise invalid(f"the request asks for {num_seqs} sequences (prompts x n); this server admits at most "
                          f"{limit} at once", param=param)

    def reserve(self, num_seqs: int) -> Reservation:
        """Count `num_seqs` sequences against the queue bound, atomically (no await between the check and
        the count): 429 when the queue is full now."""
        self.check_admissible(num_seqs)
        limit = self.settings.max_admitted
        if self.num_admitted + num_seqs > limit:
            raise APIError(429, f"the server is at capacity ({self.num_admitted} sequences queued or running, "
                           f"limit {limit}); retry later", code="queue_full", headers={"Retry-After": "1"})
        self.num_admitted += num_seqs
        return Reservation(self, num_seqs)

    def check_response_size(self, num_seqs: int, max_tokens: int, logprobs: int | None) -> None:
        """A non-streaming response is built in memory: bound sequences x max_tokens x (logprobs + 1)."""
        size = num_seqs * max_tokens * ((logprobs or 0) + 1)
        if size > self.settings.max_response_tokens:
            raise invalid(f"the response could hold {size} token entries (prompts x n x max_tokens x (logprobs + "
                          f"1)), more than {self.settings.max_response_tokens}; lower max_tokens, n or logprobs, "
                          "or stream it", param="max_tokens")

    async def serve(self, run: RequestRun, num_seqs: int, max_tokens: int, host: HostAdapter | None,
                    raw: Request, response: Response) -> BaseModel | StreamingResponse:
        """Admit `run` and answer it: as server-sent events when it streams, else as one body. Either way it
        ends with an error after `--request-timeout` seconds, which aborts its engine requests."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        if not run.body.stream:
            self.check_response_size(num_seqs, max_tokens, run.params.logprobs)
        reservation = self.reserve(num_seqs)
        if run.body.stream:
            return ReservedStreamingResponse(sse_stream(until_deadline(run.events(), deadline)), reservation,
                                             media_type="text/event-stream", headers=adapter_headers(host))
        response.headers.update(adapter_headers(host))
        with reservation:
            return await until_disconnect(raw, within_deadline(run.response(), deadline))


@dataclass(frozen=True)
class PreparedConstraint:
    kind: str
    param: str
    grammar: str  # compiled and cached by the engine


@dataclass
class Reservation:
    """Sequences counted against the queue bound until `release` (idempotent)."""

    state: ServerState
    num_seqs: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.num_admitted -= self.num_seqs

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class ReservedStreamingResponse(StreamingResponse):
    """Releases its reservation when the response ends, however it ends: also when the client left before
    the stream started (its generator then never runs, so it cannot release anything itself)."""

    def __init__(self, content: AsyncIterator[str], reservation: Reservation, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.reservation = reservation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reservation.release()


class RequestRun(Protocol):
    """One admitted completion or chat request."""

    body: SamplingFields
    params: SamplingParams

    def events(self) -> AsyncIterator[str]: ...

    async def response(self) -> BaseModel: ...


def request_timeout() -> APIError:
    return APIError(504, "the request ran past the server's --request-timeout and was stopped",
                    code="request_timeout")


async def until_deadline(events: AsyncIterator[T], deadline: float) -> AsyncIterator[T]:
    """`events`, closed (aborting its engine requests) with a 504 error once `deadline` (loop time) passes."""
    async with contextlib.aclosing(events) as stream:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise request_timeout() from None
            yield item


async def within_deadline(work: Awaitable[T], deadline: float) -> T:
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        raise request_timeout() from None


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, settings: ServerSettings,
                    constraint: PreparedConstraint | None = None) -> SamplingParams:
    grammar = constraint.grammar if constraint is not None else None
    if constraint is not None and (body.ignore_eos or body.min_tokens):
        # A complete grammar allows only EOS next: ignore_eos would fill max_tokens with EOS, and min_tokens would
        # mask the one token left (every logit -inf).
        raise invalid(f"{constraint.param} cannot be combined with ignore_eos or min_tokens", param=constraint.param)
    logit_bias: dict[int, float] = {}
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise invalid(f"logit_bias keys are token ids (decimal integers), got {key[:32]!r}", param="logit_bias")
        logit_bias[int(key)] = bias
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > settings.max_stop_strings:
        raise invalid(f"at most {settings.max_stop_strings} stop strings, got {len(stops)}", param="stop")
    if any(len(stop) > settings.max_stop_length for stop in stops):
        raise invalid(f"stop strings must be at most {settings.max_stop_length} characters", param="stop")
    if len(body.stop_token_ids or []) > settings.max_stop_token_ids:
        raise invalid(f"at most {settings.max_stop_token_ids} stop_token_ids, got {len(body.stop_token_ids or [])}",
                      param="stop_token_ids")
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
            seed=body.seed, stop=stops, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
            n=body.n, logprobs=logprobs, skip_special_tokens=body.skip_special_tokens, logit_bias=logit_bias,
            grammar=grammar,
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
    engine: EngineClient, prompts: list[list[int]], params: SamplingParams, adapter: HostAdapter | None, rid: str,
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


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events ending in [DONE]; an error mid-stream becomes an error event."""
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
