"""Retries observed against a server whose queue is full: one sequence at most, no waiting room, so a second
request gets 429 with Retry-After while the first streams; the client waits, retries and succeeds."""

from __future__ import annotations

import threading

import httpx
import pytest

from clients.sdk import AsyncMaloraClient, MaloraClient, RetryPolicy
from clients.types import MaloraError
from tests.server.server_helpers import start_server, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LONG = {"prompt": "Count slowly:", "max_tokens": 48, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def full_server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("retry-server") / "server.log"
    process, url = start_server(["--max-num-seqs", "1", "--max-waiting", "0", "--log-level", "warning",
                                 "--shutdown-timeout", "5"], log)
    try:
        wait_ready(process, url, log)
        yield url
    finally:
        stop_server(process)


def occupy(url: str) -> threading.Thread:
    """Start a long streamed request; the event is set once it holds the server's only place."""
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    return thread


def test_sync_client_retries_429_then_succeeds(full_server):
    events = []
    thread = occupy(full_server)
    with MaloraClient(full_server, retry=RetryPolicy(max_retries=30, backoff=0.05), on_retry=events.append) as c:
        done = c.complete("Hello", max_tokens=2)
    thread.join()
    assert done.usage.completion_tokens >= 1
    assert events and {e.status for e in events} == {429} and "capacity" in events[0].message
    assert all(e.delay >= 1.0 for e in events)  # the server's Retry-After: 1


def test_no_retries_raises_the_429(full_server):
    thread = occupy(full_server)
    try:
        with MaloraClient(full_server, retry=RetryPolicy(max_retries=0)) as c, pytest.raises(MaloraError) as full:
            c.complete("Hello", max_tokens=2)
        assert full.value.status == 429 and full.value.retry_after == 1.0 and full.value.code == "queue_full"
    finally:
        thread.join()


def test_async_stream_retries_429_then_succeeds(full_server):
    import asyncio

    events = []
    thread = occupy(full_server)

    async def scenario() -> str:
        async with AsyncMaloraClient(full_server, retry=RetryPolicy(max_retries=30, backoff=0.05),
                                     on_retry=events.append) as c:
            return "".join([chunk.text async for chunk in await c.stream_complete("Hello", max_tokens=3)])

    text = asyncio.run(scenario())
    thread.join()
    assert text and events and {e.status for e in events} == {429}
