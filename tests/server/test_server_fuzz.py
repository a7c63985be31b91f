"""Property-based fuzz of request bodies: whatever a client sends, never a 5xx, and the server stays ready."""

from __future__ import annotations

import collections
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-5, 300_000), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
TEXT = st.text(max_size=20)
# Strings a JSON body can carry but UTF-8 cannot: lone surrogates (\ud800-\udfff escapes).
SURROGATE_TEXT = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(max_codepoint=0x7F),
                         min_size=1, max_size=6).filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t))
HUGE_STOPS = st.lists(st.text(min_size=1, max_size=3), min_size=17, max_size=300) | st.lists(
    st.text(min_size=257, max_size=300), min_size=1, max_size=2)
STATUSES: collections.Counter = collections.Counter()
ERRS: collections.Counter = collections.Counter()


def field(valid: st.SearchStrategy, edge: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """Mostly valid values (so requests reach the engine), sometimes out of range, rarely anything at all."""
    return weighted((valid, 12), (edge if edge is not None else valid, 1), (JUNK, 1))


def weighted(*choices: tuple[st.SearchStrategy, int]) -> st.SearchStrategy:
    """One of the strategies, each picked in proportion to its weight (hypothesis favours the first)."""
    pool = [strategy for strategy, weight in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


COMMON = {
    "model": field(st.sampled_from(["alpha", "beta", "SmolLM2-135M-Instruct"]), st.sampled_from(["nope", ""])),
    "max_tokens": field(st.integers(1, 3), st.integers(-2, 0) | st.integers(9000, 2**40)),
    "temperature": field(st.floats(0, 2), st.floats(-3, 3)),
    "top_p": field(st.floats(0.01, 1), st.floats(-0.5, 1.5)),
    "n": field(st.integers(1, 3), st.integers(-1, 200)),
    "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=3)), HUGE_STOPS | SURROGATE_TEXT),
    "seed": field(st.integers(0, 2**32), st.integers(-(2**65), 2**65)),
    "presence_penalty": field(st.floats(-2, 2), st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-2, 2), st.floats(-3, 3)),
    "logit_bias": field(st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
                        st.one_of(st.dictionaries(st.text(alphabet="ab-x ", min_size=1, max_size=3), st.floats(-3, 3),
                                                  min_size=1, max_size=2),
                                  st.dictionaries(st.integers(0, 99).map(str), st.floats(100.5, 1e6), min_size=1,
                                                  max_size=2),
                                  st.dictionaries(st.integers(49152, 10**30).map(str), st.floats(-3, 3), min_size=1,
                                                  max_size=2))),
    "user": field(TEXT, SURROGATE_TEXT),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "top_k": field(st.integers(-1, 50), st.integers(-3, 2**40)),
    "min_p": field(st.floats(0, 1), st.floats(-0.5, 1.5)),
    "repetition_penalty": field(st.floats(0.5, 2), st.floats(-1, 3)),
    "min_tokens": field(st.integers(0, 1), st.integers(-1, 4)),
    "ignore_eos": field(st.booleans()),
    "stop_token_ids": field(st.lists(st.integers(0, 49_000), max_size=3),
                            st.lists(st.integers(-2, 10**9), max_size=4) | st.lists(st.integers(0, 49_000),
                                                                                      min_size=257, max_size=2000)),
    "skip_special_tokens": field(st.booleans()),
}
COMPLETION_OPTIONAL = {
    **COMMON,
    "logprobs": field(st.integers(0, 5), st.integers(-1, 22)),
    "echo": field(st.booleans()),
}
PROMPT = field(st.one_of(TEXT, st.lists(TEXT, max_size=2), st.lists(st.integers(0, 49_000), max_size=4),
                         st.lists(st.lists(st.integers(0, 49_000), max_size=3), max_size=2)),
               st.lists(st.integers(-1, 10**9), max_size=4) | SURROGATE_TEXT
               | st.lists(st.just("a"), min_size=81, max_size=3000)
               | st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=81, max_size=2000))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"])},
    optional={"content": st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": TEXT}), max_size=2)), "name": TEXT},
)
HOSTILE_MESSAGE = st.fixed_dictionaries(
    {"role": st.just("user"), "content": SURROGATE_TEXT | st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": SURROGATE_TEXT}), min_size=1, max_size=2)},
)
BAD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["wizard", "user"])},
                                    optional={"content": JUNK | st.just([{"type": "image_url"}])}) | HOSTILE_MESSAGE
MESSAGES = field(st.lists(MESSAGE, min_size=1, max_size=3), st.lists(BAD_MESSAGE, max_size=2))
CHAT_OPTIONAL = {
    **COMMON,
    "max_completion_tokens": field(st.integers(1, 3), st.integers(-1, 0)),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(0, 5), st.integers(-1, 22)),
    "add_generation_prompt": field(st.booleans()),
}


def body(required: dict, optional: dict) -> st.SearchStrategy:
    """The required fields almost always present; each optional one present or not."""
    return weighted((st.fixed_dictionaries(required, optional=optional), 9),
                    (st.fixed_dictionaries({}, optional={**required, **optional}), 1))


REQUESTS = weighted(
    (st.tuples(st.just("/v1/completions"), body({"prompt": PROMPT}, COMPLETION_OPTIONAL)), 5),
    (st.tuples(st.just("/v1/chat/completions"), body({"messages": MESSAGES}, CHAT_OPTIONAL)), 5),
    (st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), JUNK), 1),
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(request=REQUESTS)
def test_fuzzed_bodies_never_5xx(http, request):
    path, payload = request
    if isinstance(payload, dict) and payload.get("max_tokens") is None:
        payload["max_tokens"] = 2  # keep generation short: chat would otherwise fill the context
    content = json.dumps(payload, allow_nan=True).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    STATUSES[r.status_code] += 1
    if r.status_code == 400:
        ERRS[r.json()["error"]["param"]] += 1
    assert r.status_code < 500, (payload, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text


def test_still_ready_after_fuzz(http):
    # The fuzz must reach the engine, not only validation: about a fifth of the bodies are valid
    # (39 to 45 of 200 in runs here; the draw depends on hypothesis' derandomised seed and version).
    assert STATUSES[200] >= 25, (STATUSES, ERRS)
    assert http.get("/ready").status_code == 200
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
