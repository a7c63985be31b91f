"""Many concurrent streaming clients, and client disconnects freeing their KV blocks at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from server_helpers import API_KEY, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_64_concurrent_streaming_clients(live_server, http):
    models = [live_server.base_model, "alpha", "beta"]

    async def one(ac: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        model = models[i % 3]
        if i % 2:
            stream = await ac.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Say a number near {i}."}], max_tokens=8,
                stream=True, stream_options={"include_usage": True}, seed=i)
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            stream = await ac.completions.create(model=model, prompt=f"Item {i}:", max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, seed=i)
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 8
        return text, chunks[-1].usage.completion_tokens

    async def scenario():
        ac = openai.AsyncOpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=240,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=100)))
        async with ac:
            return await asyncio.gather(*(one(ac, i) for i in range(64)))

    results = asyncio.run(scenario())
    assert len(results) == 64 and all(tokens >= 1 for _, tokens in results)
    wait_idle(http, timeout=10)


def test_stream_disconnect_frees_blocks(live_server, http):
    wait_idle(http, timeout=30)
    body = {"model": "beta", "prompt": "Write a very long essay.", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    with live_server.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for _, line in zip(range(8), lines)]
        assert sum(line.startswith("data: ") for line in received) >= 3
        assert http.get("/v1/engine/stats").json()["kv_blocks_used"] > 0
    started = time.monotonic()
    wait_idle(http, timeout=5)
    assert time.monotonic() - started < 5


def test_non_streaming_disconnect_aborts(live_server, http):
    wait_idle(http, timeout=30)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 4000,
            "ignore_eos": True}
    with live_server.http() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=body, timeout=1.5)
    wait_idle(http, timeout=5)
