"""Every error status, in OpenAI's error shape, through the SDK against the live server (and 503 in-process)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_helpers import API_KEY, MAX_BODY_BYTES, MAX_NUM_SEQS, MAX_WAITING, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# (endpoint, extra body, the parameter the error must name)
BAD_PARAMS = [
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"temperature": 2.5}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"top_k": -2}, "top_k"),
    ("completions", {"min_p": 1.5}, "min_p"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("completions", {"stop": ""}, "stop"),
    ("completions", {"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ("completions", {"seed": "abc"}, "seed"),
    ("completions", {"logit_bias": {"1": 100.5}}, "logit_bias"),
    ("completions", {"logit_bias": {"49152": 1}}, "logit_bias"),  # past the default model's vocabulary
    ("completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"token": 1}}, "logit_bias"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"ignore_eos": "maybe"}, "ignore_eos"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("chat", {"stream_options": {"include_usage": "often"}}, "stream_options.include_usage"),
]


def call(client: openai.OpenAI, endpoint: str, model: str, **body):
    extra = {k: body.pop(k) for k in list(body)}
    if endpoint == "chat":
        extra.setdefault("messages", [{"role": "user", "content": "Hi"}])
        return client.chat.completions.create(model=model, messages=extra.pop("messages"), max_tokens=2,
                                              extra_body=extra)
    return client.completions.create(model=model, prompt=extra.pop("prompt", "Hi"), max_tokens=extra.pop(
        "max_tokens", 2), extra_body=extra)


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_PARAMS, ids=[f"{e}-{p}" for e, _, p in BAD_PARAMS])
def test_invalid_parameter_is_400_naming_it(client, live_server, endpoint, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(client, endpoint, live_server.base_model, **body)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_bodies_are_400(http):
    for content in (b"{not json", b"[]", b"null", b'{"prompt": "x", "max_tokens": NaN}', "ü".encode("latin-1")):
        r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_missing_or_wrong_key_is_401(live_server):
    for key in ("wrong", API_KEY + "x", ""):
        bad = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.body["type"] == "authentication_error"
    with live_server.http(key=None) as anonymous:
        assert anonymous.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert anonymous.get("/v1/engine/stats").status_code == 401
        for open_path in ("/health", "/ready", "/version", "/openapi.json"):
            assert anonymous.get(open_path).status_code == 200


def test_unknown_model_is_404(client):
    for endpoint in ("completions", "chat"):
        with pytest.raises(openai.NotFoundError) as info:
            call(client, endpoint, "no-such-adapter")
        assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


def test_unknown_route_is_404_and_wrong_method_405(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"]


def test_context_overflow_is_400(client, tokenizer, live_server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="Hi", max_tokens=9000)
    assert "context length" in info.value.body["message"]
    long_prompt = [tokenizer.eos_token_id or 0] * 8190
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=live_server.base_model, prompt=long_prompt, max_tokens=8)
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=8190)


def test_oversized_body_is_413(client, http):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="alpha", prompt="x" * (MAX_BODY_BYTES + 10), max_tokens=1)
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(live_server, http):
    limit = MAX_NUM_SEQS + MAX_WAITING
    n = 16
    body = {"model": "alpha", "prompt": "Tell me a story.", "max_tokens": 500, "n": n, "ignore_eos": True,
            "stream": True}

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60) as ac:
            streams = [ac.stream("POST", "/v1/completions", json=body) for _ in range(limit // n)]
            responses = [await s.__aenter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in responses)
                return await ac.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 1})
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)

    rejected = asyncio.run(scenario())
    assert rejected.status_code == 429, rejected.text
    assert int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["code"] == "queue_full"
    wait_idle(http, timeout=30)
    assert http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_not_ready_is_503():
    """In-process: an app whose engine is still loading (None) or has stopped answers 503 on the API."""
    from server.app import create_app
    from server.settings import ServerSettings

    app = create_app(None, ServerSettings())

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            assert (await ac.get("/health")).status_code == 200
            for method, path in (("GET", "/ready"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions")):
                body = {"prompt": "x"} if path.endswith("/completions") else None
                if path.endswith("chat/completions"):
                    body = {"messages": [{"role": "user", "content": "x"}]}
                r = await ac.request(method, path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert r.headers["Retry-After"] and r.json()["error"]["code"] == "not_ready"

    asyncio.run(scenario())
