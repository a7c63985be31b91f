"""`/v1/completions` through the official openai SDK against the live server."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROMPT = "The three primary colours are"


def test_completion(client, model, tokenizer):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    assert out.model == model and out.object == "text_completion"
    [choice] = out.choices
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert out.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(PROMPT + choice.text)][
        out.usage.prompt_tokens:]
    assert out.usage.completion_tokens == len(choice.logprobs.tokens) <= 8
    assert tokenizer.decode(ids) == choice.text  # the counted tokens are the text's tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_matches_non_streaming(client, model, tokenizer):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_adapters_change_the_output(client, live_server):
    texts = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
             for m in (live_server.base_model, "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_n_choices_and_exact_usage(client):
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, n=3, seed=7, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    stream = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, n=3, seed=7, stream=True,
                                            extra_body={"ignore_eos": True}))
    texts = {i: "".join(ch.text for c in stream for ch in c.choices if ch.index == i) for i in range(3)}
    assert texts == {c.index: c.text for c in out.choices}


def test_batch_and_token_prompts(client, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(model="beta", prompt=[PROMPT, "Once upon a time"], max_tokens=4, n=2,
                                    temperature=0)
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_ids = client.completions.create(model="beta", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == sorted(out.choices, key=lambda c: c.index)[0].text
    assert out.usage.prompt_tokens == len(ids) + len(tokenizer("Once upon a time")["input_ids"])


def test_stop_strings(client):
    base = client.completions.create(model="alpha", prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0).choices[0]
    stop = base.text.strip()[:2].strip() or base.text[:1]
    for stop_arg in (stop, [stop, "zzzz"]):
        out = client.completions.create(model="alpha", prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0,
                                        stop=stop_arg).choices[0]
        assert out.finish_reason == "stop" and stop not in out.text
        assert base.text.startswith(out.text)
        assert out.model_extra.get("stop_reason") == stop


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="beta", prompt=PROMPT, max_tokens=6, temperature=1.0, top_p=0.95, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    others = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(3)}
    assert len(others) > 1


def test_logprobs_shape(client):
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-4 for i, top in
               enumerate(lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == out.choices[0].text


def test_echo(client, tokenizer):
    out = client.completions.create(model="beta", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    assert len(choice.logprobs.tokens) == n_prompt + 3
    assert choice.logprobs.token_logprobs[:n_prompt] == [None] * n_prompt
    stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_vllm_extensions(client):
    out = client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3, presence_penalty=0.5,
        frequency_penalty=0.5, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8, "ignore_eos": True},
    )
    assert out.usage.completion_tokens == 8


def test_stop_token_ids(client, tokenizer):
    greedy = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    first_id = tokenizer(PROMPT + greedy)["input_ids"][n_prompt]
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"stop_token_ids": [first_id]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1
    assert out.choices[0].model_extra.get("stop_reason") == first_id
    held = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={"stop_token_ids": [first_id], "min_tokens": 3})
    assert held.usage.completion_tokens >= 3
