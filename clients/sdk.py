"""Python SDK of MALoRA Serve: `MaloraClient` (sync) and `AsyncMaloraClient` (async), both on httpx.

    client = MaloraClient()                      # MALORA_BASE_URL, MALORA_API_KEY, MALORA_ADMIN_KEY
    client.chat([{"role": "user", "content": "Hi"}], model="alpha").text
    for chunk in client.stream_chat(messages, model="alpha"): print(chunk.text, end="")
    async for chunk in await async_client.stream_chat(messages): ...
    client.load_adapter("gamma", "gamma")        # admin key

429 and 503 answers (and connections refused) are retried with exponential back-off, waiting at
least the server's `Retry-After`; other errors raise `MaloraError` carrying the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from .types import Adapter, AdapterList, Chunk, Completion, MaloraError, Model

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
Messages = list[dict[str, Any]]


@dataclass(slots=True)
class RetryEvent:
    """Passed to `on_retry` before each wait: the failed attempt (1-based), its status (0: no connection)."""

    attempt: int
    status: int
    delay: float
    message: str


@dataclass(slots=True)
class RetryPolicy:
    max_retries: int = 4
    backoff: float = 0.25
    """First delay in seconds; doubled every attempt (with jitter), up to `max_delay`."""
    max_delay: float = 20.0
    statuses: tuple[int, ...] = (429, 503)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        return min(self.max_delay, max(backoff, retry_after or 0.0))


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error(response: httpx.Response) -> MaloraError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return MaloraError.from_body(response.status_code, body, response.text,
                                 retry_after_seconds(response.headers.get("retry-after")))


def _adapter_version(response: httpx.Response) -> int | None:
    value = response.headers.get("x-malora-adapter-version")
    return int(value) if value and value.isdigit() else None


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        data = sse_data(line)
        if data is None:
            continue
        if data == "[DONE]":
            return
        yield parse_event(data)


def sse_data(line: str) -> str | None:
    return line[5:].strip() if line.startswith("data:") else None


def parse_event(data: str) -> dict[str, Any]:
    payload = json.loads(data)
    if isinstance(payload, dict) and "error" in payload:  # the server's error event mid-stream
        raise MaloraError.from_body(500, payload)
    return payload


class _Base:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float | httpx.Timeout = 600.0, retry: RetryPolicy | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None) -> None:
        url = (base_url or os.environ.get("MALORA_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url  # the OpenAI-style base URL works too
        self.api_key = api_key if api_key is not None else os.environ.get("MALORA_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("MALORA_ADMIN_KEY")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _next_delay(self, attempt: int, error: MaloraError) -> float | None:
        """Seconds to wait before another attempt, or None to give up with `error`."""
        retryable = error.status in self.retry.statuses or error.status == 0
        if not retryable or attempt > self.retry.max_retries:
            return None
        delay = self.retry.delay(attempt, error.retry_after)
        if self.on_retry is not None:
            self.on_retry(RetryEvent(attempt, error.status, delay, error.message))
        return delay

    @staticmethod
    def _completion_body(prompt: str | list, model: str | None, max_tokens: int | None, stream: bool,
                         params: dict[str, Any]) -> dict[str, Any]:
        body = {"prompt": prompt, "model": model, "max_tokens": max_tokens, **params}
        return _finish_body(body, stream)

    @staticmethod
    def _chat_body(messages: Messages, model: str | None, max_tokens: int | None, stream: bool,
                   params: dict[str, Any]) -> dict[str, Any]:
        body = {"messages": messages, "model": model, "max_tokens": max_tokens, **params}
        return _finish_body(body, stream)


def _finish_body(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    body = {k: v for k, v in body.items() if v is not None}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _reload_body(path: str | None, pinned: bool | None) -> dict[str, Any]:
    return {k: v for k, v in (("path", path), ("pinned", pinned)) if v is not None}


class MaloraClient(_Base):
    """Synchronous client. Use as a context manager, or call `close()`."""

    def __init__(self, *args: Any, http_client: httpx.Client | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = http_client or httpx.Client(base_url=self.base_url, timeout=self.timeout)

    def __enter__(self) -> MaloraClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, body: Any = None, admin: bool = False,
              stream: bool = False) -> httpx.Response:
        """The first successful response (2xx), after retries; raises `MaloraError` otherwise."""
        request = self.http.build_request(method, path, json=body, headers=self._headers(admin))
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.send(request, stream=stream)
            except httpx.ConnectError as exc:
                error = MaloraError(0, f"cannot connect to {self.base_url}: {exc}")
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                    response.close()
                error = _error(response)
            delay = self._next_delay(attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)

    def _json(self, method: str, path: str, body: Any = None, admin: bool = False) -> Any:
        return self.send(method, path, body, admin).json()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[Chunk]:
        """Sends now (errors and retries happen here); the chunks come as the caller iterates."""
        response = self.send("POST", path, body, stream=True)

        def chunks() -> Iterator[Chunk]:
            try:
                for event in _events(response.iter_lines()):
                    yield from Chunk.parse_all(event)
            finally:
                response.close()

        return chunks()

    def complete(self, prompt: str | list, model: str | None = None, max_tokens: int | None = 16,
                 **params: Any) -> Completion:
        response = self.send("POST", "/v1/completions", self._completion_body(prompt, model, max_tokens, False,
                                                                                params))
        return Completion.parse(response.json(), _adapter_version(response))

    def stream_complete(self, prompt: str | list, model: str | None = None, max_tokens: int | None = 16,
                        **params: Any) -> Iterator[Chunk]:
        return self._stream("/v1/completions", self._completion_body(prompt, model, max_tokens, True, params))

    def chat(self, messages: Messages, model: str | None = None, max_tokens: int | None = None,
             **params: Any) -> Completion:
        response = self.send("POST", "/v1/chat/completions", self._chat_body(messages, model, max_tokens, False,
                                                                               params))
        return Completion.parse(response.json(), _adapter_version(response))

    def stream_chat(self, messages: Messages, model: str | None = None, max_tokens: int | None = None,
                    **params: Any) -> Iterator[Chunk]:
        return self._stream("/v1/chat/completions", self._chat_body(messages, model, max_tokens, True, params))

    def models(self) -> list[Model]:
        return [Model.parse(m) for m in self._json("GET", "/v1/models")["data"]]

    def adapters(self) -> AdapterList:
        return AdapterList.parse(self._json("GET", "/v1/adapters", admin=True))

    def adapter(self, name: str) -> Adapter:
        return Adapter.parse(self._json("GET", f"/v1/adapters/{name}", admin=True))

    def load_adapter(self, name: str, path: str, pinned: bool = False) -> Adapter:
        body = {"name": name, "path": str(path), "pinned": pinned}
        return Adapter.parse(self._json("POST", "/v1/adapters", body, admin=True))

    def reload_adapter(self, name: str, path: str | None = None, pinned: bool | None = None) -> Adapter:
        return Adapter.parse(self._json("PUT", f"/v1/adapters/{name}", _reload_body(path, pinned), admin=True))

    def unload_adapter(self, name: str) -> Adapter:
        return Adapter.parse(self._json("DELETE", f"/v1/adapters/{name}", admin=True))

    def metrics(self) -> str:
        """The Prometheus text of `GET /metrics`."""
        return self.send("GET", "/metrics").text


class AsyncMaloraClient(_Base):
    """The same calls as `MaloraClient`, awaited; streams are async iterators."""

    def __init__(self, *args: Any, http_client: httpx.AsyncClient | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = http_client or httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout)

    async def __aenter__(self) -> AsyncMaloraClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, body: Any = None, admin: bool = False,
                    stream: bool = False) -> httpx.Response:
        request = self.http.build_request(method, path, json=body, headers=self._headers(admin))
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.send(request, stream=stream)
            except httpx.ConnectError as exc:
                error = MaloraError(0, f"cannot connect to {self.base_url}: {exc}")
            else:
                if response.is_success:
                    return response
                if stream:
                    await response.aread()
                    await response.aclose()
                error = _error(response)
            delay = self._next_delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    async def _json(self, method: str, path: str, body: Any = None, admin: bool = False) -> Any:
        return (await self.send(method, path, body, admin)).json()

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        response = await self.send("POST", path, body, stream=True)

        async def chunks() -> AsyncIterator[Chunk]:
            try:
                async for line in response.aiter_lines():
                    data = sse_data(line)
                    if data == "[DONE]":
                        return
                    if data is not None:
                        for chunk in Chunk.parse_all(parse_event(data)):
                            yield chunk
            finally:
                await response.aclose()

        return chunks()

    async def complete(self, prompt: str | list, model: str | None = None, max_tokens: int | None = 16,
                       **params: Any) -> Completion:
        body = self._completion_body(prompt, model, max_tokens, False, params)
        response = await self.send("POST", "/v1/completions", body)
        return Completion.parse(response.json(), _adapter_version(response))

    async def stream_complete(self, prompt: str | list, model: str | None = None, max_tokens: int | None = 16,
                              **params: Any) -> AsyncIterator[Chunk]:
        """`async for chunk in await client.stream_complete(...)`: sent (and retried) when awaited."""
        return await self._stream("/v1/completions", self._completion_body(prompt, model, max_tokens, True, params))

    async def chat(self, messages: Messages, model: str | None = None, max_tokens: int | None = None,
                   **params: Any) -> Completion:
        body = self._chat_body(messages, model, max_tokens, False, params)
        response = await self.send("POST", "/v1/chat/completions", body)
        return Completion.parse(response.json(), _adapter_version(response))

    async def stream_chat(self, messages: Messages, model: str | None = None, max_tokens: int | None = None,
                          **params: Any) -> AsyncIterator[Chunk]:
        return await self._stream("/v1/chat/completions", self._chat_body(messages, model, max_tokens, True, params))

    async def models(self) -> list[Model]:
        return [Model.parse(m) for m in (await self._json("GET", "/v1/models"))["data"]]

    async def adapters(self) -> AdapterList:
        return AdapterList.parse(await self._json("GET", "/v1/adapters", admin=True))

    async def adapter(self, name: str) -> Adapter:
        return Adapter.parse(await self._json("GET", f"/v1/adapters/{name}", admin=True))

    async def load_adapter(self, name: str, path: str, pinned: bool = False) -> Adapter:
        body = {"name": name, "path": str(path), "pinned": pinned}
        return Adapter.parse(await self._json("POST", "/v1/adapters", body, admin=True))

    async def reload_adapter(self, name: str, path: str | None = None, pinned: bool | None = None) -> Adapter:
        body = _reload_body(path, pinned)
        return Adapter.parse(await self._json("PUT", f"/v1/adapters/{name}", body, admin=True))

    async def unload_adapter(self, name: str) -> Adapter:
        return Adapter.parse(await self._json("DELETE", f"/v1/adapters/{name}", admin=True))

    async def metrics(self) -> str:
        return (await self.send("GET", "/metrics")).text
