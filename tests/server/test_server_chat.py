"""`/v1/chat/completions` through the official openai SDK against the live server."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


def template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat(client, model, tokenizer):
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == model
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(template_ids(tokenizer, MESSAGES))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_streaming_matches(client, model, tokenizer):
    kwargs = dict(model=model, messages=MESSAGES, max_completion_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert full.usage.completion_tokens == 8
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_chat_n_seed_and_stop(client):
    kwargs = dict(model="beta", messages=MESSAGES[:2], max_tokens=6, n=3, seed=11, temperature=1.0,
                  extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert first.usage.completion_tokens == 18
    text = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=10,
                                          temperature=0).choices[0].message.content
    stop = text.strip()[:3]
    out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=10, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and stop not in out.choices[0].message.content


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert isinstance(item.token, str) and item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert all(t.bytes == list(t.token.encode()) for t in item.top_logprobs)
    special = "<|im_end|>"  # ignore_eos lets the model emit it; logprobs name it, the text skips it
    assert "".join(i.token for i in content).replace(special, "") == out.choices[0].message.content
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = list(client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=0,
                                                   logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    tokens = [i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in tokens)


def test_content_parts_and_developer_role(client, tokenizer):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]}]
    out = client.chat.completions.create(model="beta", messages=parts, max_tokens=3, temperature=0, user="u1")
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    assert out.usage.prompt_tokens == len(template_ids(tokenizer, expected))
