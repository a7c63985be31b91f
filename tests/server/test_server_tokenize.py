"""vLLM's `/tokenize` and `/detokenize` on the live server: the counts a client gets are the ones generation
bills (usage.prompt_tokens), for completion prompts and chat messages alike; bad input is a 4xx."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROMPT = "The three primary colours are red, yellow and blue; mixing them gives the rest."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a primary colour."}]


def test_tokenize_a_prompt_as_generation_counts_it(http, client, model, tokenizer):
    got = http.post("/tokenize", json={"model": model, "prompt": PROMPT, "return_token_strs": True}).json()
    assert got["tokens"] == tokenizer(PROMPT)["input_ids"] and got["count"] == len(got["tokens"])
    assert "".join(got["token_strs"]) == tokenizer.decode(got["tokens"])
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert got["max_model_len"] == models[model]["max_model_len"]
    usage = client.completions.create(model=model, prompt=PROMPT, max_tokens=1).usage
    assert usage.prompt_tokens == got["count"]
    bare = http.post("/tokenize", json={"model": model, "prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


def test_tokenize_messages_through_the_chat_template(http, client, live_server):
    got = http.post("/tokenize", json={"messages": MESSAGES}).json()
    usage = client.chat.completions.create(model=live_server.base_model, messages=MESSAGES, max_tokens=1).usage
    assert got["count"] == usage.prompt_tokens == len(got["tokens"])
    bare = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < got["count"] and got["tokens"][:bare["count"]] == bare["tokens"]


def test_detokenize_inverts_tokenize(http):
    tokens = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": PROMPT}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"model": "no-such-adapter", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/detokenize", {"tokens": [49152]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_bad_input_is_a_clear_4xx(http, path, body, status, param):
    answer = http.post(path, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)


def test_the_endpoints_need_the_api_key(live_server):
    with live_server.http(key=None) as anonymous:
        assert anonymous.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert anonymous.post("/detokenize", json={"tokens": [1]}).status_code == 401
