"""OpenAI's `logit_bias` through the official SDK on the live server: -100 removes a token, +100 forces it, per
request inside one batch, streamed or not; bad maps are 400s naming the parameter."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROMPT = "The three primary colours are"


def first_tokens(client, model: str, n: int, **extra) -> list[str]:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0, **extra)
    return out.choices[0].logprobs.tokens


def test_minus_100_removes_the_token_the_model_would_choose(client, model, tokenizer):
    plain = first_tokens(client, model, 1)
    banned = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(PROMPT + plain[0])[-1])
    assert tokenizer.decode([banned]) == plain[0]
    biased = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                       logit_bias={str(banned): -100})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(PROMPT + biased.choices[0].text)]
    assert banned not in ids[len(tokenizer(PROMPT)["input_ids"]):]
    assert biased.choices[0].logprobs.tokens[0] != plain[0]


def test_plus_100_forces_a_token_in_a_mixed_batch(client, tokenizer, live_server):
    base = live_server.base_model
    forced = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" banana")[0])
    alone = first_tokens(client, base, 6, extra_body={"ignore_eos": True})

    def ask(i: int):
        if i % 2:
            return client.completions.create(model=base, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                             logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
        return client.completions.create(model=base, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for i, answer in enumerate(answers):
        tokens = answer.choices[0].logprobs.tokens
        if i % 2:
            assert tokens == [tokenizer.decode([forced])] * 6
        else:
            assert tokens == alone  # the biased neighbours in the batch change nothing here


def test_streamed_and_chat_honour_the_bias(client, tokenizer, live_server):
    forced = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" banana")[0])
    stream = client.chat.completions.create(model=live_server.base_model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True, logit_bias={str(forced): 100})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == tokenizer.decode([forced]) * 4


@pytest.mark.parametrize("bias", [{"49152": 5}, {"12": 100.5}, {"twelve": 1}, {str(i): 1 for i in range(1025)}])
def test_bad_maps_are_400s(client, bias, live_server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=live_server.base_model, prompt=PROMPT, max_tokens=2, logit_bias=bias)
    assert refused.value.body["param"] == "logit_bias"
