"""Hostile requests against the live server: each gets a 4xx while an honest stream runs beside it, the honest
stream finishes every token, and the server stays ready. Then queue admission under a burst and the request
deadline, on a small server of their own."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from server_helpers import API_KEY, MAX_NUM_SEQS, MAX_WAITING, start_server, stop_server, wait_idle, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LIMIT = MAX_NUM_SEQS + MAX_WAITING
HONEST_TOKENS = 48
# (path, raw JSON body, the status it must get, the parameter a 400 must name or None)
HOSTILE: list[tuple[str, str, int, str | None]] = [
    ("/v1/completions", json.dumps({"prompt": "Hi", "stop_token_ids": [1_000_000_000], "min_tokens": 2}), 400,
     "stop_token_ids"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "stop_token_ids": list(range(257))}), 400, "stop_token_ids"),
    ("/v1/completions", '{"prompt": "lone \\ud800 surrogate", "max_tokens": 2}', 400, None),
    ("/v1/completions", '{"prompt": "Hi", "stop": "\\udfff", "max_tokens": 2}', 400, None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud83d"}], "max_tokens": 2}', 400, None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     400, None),
    ("/v1/completions", json.dumps({"prompt": ["a"] * 100, "n": 2, "max_tokens": 1}), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [[1, 2]] * 5000, "max_tokens": 1}), 400, "prompt"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "n": LIMIT + 1}), 400,
     "n"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "stop": ["x"] * 17}), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "stop": ["x" * 257]}), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "n": 64, "max_tokens": 8000, "logprobs": 20}), 400,
     "max_tokens"),
    ("/v1/completions", "[" * 50_000 + "]" * 50_000, 400, None),
    ("/v1/completions", json.dumps({"prompt": "Hi", "logit_bias": {"5": 101, "x": 1}}), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": "../../etc/passwd", "prompt": "Hi"}), 404, "model"),
    ("/v1/completions", json.dumps({"prompt": [[1, 2], [3, 10**7]]}), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2**31 - 1}), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "word " * 40_000, "max_tokens": 2}), 400, "prompt"),
    ("/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/etc"}), 403, None),
]


def honest_stream(url: str, result: dict) -> None:
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": HONEST_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c, \
            c.stream("POST", "/v1/completions", json=body) as r:
        result["status"] = r.status_code
        result["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_hostile_requests_get_4xx_and_never_hurt_an_honest_stream(live_server, http):
    result: dict = {}
    honest = threading.Thread(target=honest_stream, args=(live_server.url, result))
    honest.start()
    try:
        for path, raw, status, param in HOSTILE:
            r = http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
            assert r.status_code == status, (raw[:120], r.text[:300])
            error = r.json()["error"]
            assert error["message"] and error["type"]
            if param is not None:
                assert error["param"] == param, (raw[:120], error)
            assert http.get("/ready").status_code == 200
    finally:
        honest.join(300)
    assert result["status"] == 200 and result["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in result["events"][:-1]]
    assert not any("error" in c for c in chunks), chunks[-3:]
    assert chunks[-1]["usage"]["completion_tokens"] == HONEST_TOKENS
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    wait_idle(http)


def test_unknown_model_names_do_not_become_metric_labels(live_server, http):
    for i in range(5):
        assert http.post("/v1/completions", json={"model": f"made-up-{i}", "prompt": "Hi"}).status_code == 404
    metrics = http.get("/metrics").text
    assert "made-up-" not in metrics
    assert 'malora_requests_total{adapter="other",endpoint="completions",outcome="404"}' in metrics


def test_metrics_need_a_key_when_keys_are_set(live_server):
    with live_server.http(key=None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/v1/dashboard/summary").status_code == 401
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/ready").status_code == 200
        assert anonymous.get("/dashboard").status_code == 200  # the page itself holds no data
    with live_server.http() as keyed:
        assert keyed.get("/metrics").status_code == 200


def test_models_show_no_server_paths_without_the_admin_key(live_server, http, adapter_dirs):
    listing = http.get("/v1/models").text
    for path in adapter_dirs.values():
        assert str(path) not in listing and str(path.parent) not in listing
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert cards["alpha"]["root"] == "alpha" and cards["alpha"]["adapter"]["path"] is None


def start_small_server(adapter_dirs, tmp_path_factory, extra: list[str]):
    log = tmp_path_factory.mktemp("small") / "server.log"
    args = [f"--adapter=alpha={adapter_dirs['alpha']}", "--log-level", "warning", "--shutdown-timeout", "5", *extra]
    process, url = start_server(args, log, env={"MALORA_API_KEY": API_KEY})
    wait_ready(process, url, log)
    return process, url


@pytest.fixture(scope="module")
def queue_of_16(adapter_dirs, default_model, tmp_path_factory):
    """A queue of 16 sequences (8 running + 8 waiting), warmed up (the first steps at a new batch size are slow
    while oneDNN builds its kernels)."""
    process, url = start_small_server(adapter_dirs, tmp_path_factory, ["--max-num-seqs", "8", "--max-waiting", "8"])
    try:
        warm_up = {"model": "alpha", "prompt": "Count:", "max_tokens": 4, "n": 16, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=warm_up, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=300).status_code == 200
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def eight_second_deadline(adapter_dirs, default_model, tmp_path_factory):
    process, url = start_small_server(adapter_dirs, tmp_path_factory, ["--request-timeout", "8"])
    try:
        yield url
    finally:
        stop_server(process)


def test_a_burst_of_200_streams_admits_at_most_the_queue(queue_of_16):
    body = {"model": "alpha", "prompt": "Count:", "max_tokens": 6, "ignore_eos": True, "stream": True}
    limit = 16
    started = time.monotonic()

    async def one(ac: httpx.AsyncClient) -> tuple[int, float, float, list[str], dict]:
        async with ac.stream("POST", "/v1/completions", json=body) as r:
            opened = time.monotonic()
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return r.status_code, opened, time.monotonic(), lines, dict(r.headers)

    async def burst() -> list:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=queue_of_16, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=120, limits=limits) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac) for _ in range(200))), 300)

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 200, sorted({r[0] for r in results})
    assert ok and refused
    bad = [r[3] for r in ok if r[3][-1] != "data: [DONE]" or any('"error"' in line for line in r[3])]
    assert not bad, bad[:2]
    assert all(int(r[4]["retry-after"]) >= 1 for r in refused)
    # A stream is counted from before its headers go out until after its last byte: the streams the client saw
    # open at once can never be more than the queue holds.
    edges = sorted([(r[1], 1) for r in ok] + [(r[2], -1) for r in ok])
    open_now = peak = 0
    for _, change in edges:
        open_now += change
        peak = max(peak, open_now)
    assert peak <= limit, peak
    with httpx.Client(base_url=queue_of_16, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        stats = wait_idle(c)
    assert stats["num_admitted"] == 0 and time.monotonic() - started < 300


def test_a_request_past_the_deadline_ends_with_an_error_and_frees_its_blocks(eight_second_deadline):
    body = {"prompt": "Tell me everything.", "max_tokens": 4000, "ignore_eos": True}
    results: dict = {}

    def whole(c: httpx.Client) -> None:
        started = time.monotonic()
        results["whole"] = c.post("/v1/completions", json=body), time.monotonic() - started

    def streamed(c: httpx.Client) -> None:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            results["events"] = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]

    with httpx.Client(base_url=eight_second_deadline, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as c:
        threads = [threading.Thread(target=job, args=(c,)) for job in (whole, streamed)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        response, seconds = results["whole"]
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
        assert 7.5 < seconds < 90
        events = results["events"]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        wait_idle(c)
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
