"""response_format through the official openai SDK on the live server, greedy on the default model: every schema
yields output that json.loads parses and jsonschema validates, on the base model and through an adapter,
streamed and not; free requests batched with constrained ones get exactly their own tokens; bad schemas are 400s."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"],
        "additionalProperties": False}}, "required": ["address"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "integer", "minimum": 0, "maximum": 1000},
                                      "in_stock": {"type": "boolean"}}, "required": ["price", "in_stock"],
     "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "items": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
        "additionalProperties": False}, "minItems": 2, "maxItems": 2}}, "required": ["points"],
     "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": -99,
                                                                                      "maximum": 999}]},
                                      "unit": {"type": "string", "enum": ["m", "km"]}},
     "required": ["answer", "unit"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 3, "maxItems": 3},
]
PROMPT = "Describe a person, a colour, some tags, an address, a price, two points, a distance and three digits."


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_each_schema_parses_and_validates_in_chat(client, live_server, index):
    schema = SCHEMAS[index]
    for model in (live_server.base_model, "alpha"):
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=200, temperature=0, response_format=response_format(schema))
        [choice] = answer.choices
        assert choice.finish_reason == "stop", (model, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("index", [0, 3, 5])
def test_streamed_completions_follow_the_schema(client, live_server, index):
    schema = SCHEMAS[index]
    stream = client.completions.create(model="beta", prompt=PROMPT + "\nJSON:", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"response_format": response_format(schema)})
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_is_any_object(client, live_server):
    ask = 'Output {"ok": true} as JSON.'
    answer = client.chat.completions.create(model=live_server.base_model, max_tokens=200, temperature=0,
                                            messages=[{"role": "user", "content": ask}],
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_free_requests_batched_with_constrained_ones_get_their_own_tokens(client, live_server):
    def free(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    alone = {m: free(m) for m in (live_server.base_model, "alpha")}

    def ask(i: int) -> tuple[str, str]:
        model = (live_server.base_model, "alpha")[i % 2]
        if i % 3 == 0:
            return "constrained", client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=120, temperature=0,
                response_format=response_format(SCHEMAS[i % len(SCHEMAS)])).choices[0].message.content
        return model, free(model)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, range(12)))
    for kind, text in results:
        if kind == "constrained":
            json.loads(text)
        else:
            assert text == alone[kind]


@pytest.mark.parametrize("bad", [
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": "wat"}}}}},
    {"type": "xml"},
])
def test_bad_formats_are_400s(client, live_server, bad):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=live_server.base_model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format=bad)
    assert refused.value.body["param"].startswith("response_format")


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 3}])
def test_format_with_ignore_eos_or_min_tokens_is_refused_and_the_server_keeps_serving(client, live_server, extra):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=live_server.base_model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format={"type": "json_object"}, extra_body=extra)
    assert refused.value.body["param"] == "response_format"
    answer = client.chat.completions.create(model=live_server.base_model, max_tokens=2,
                                            messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].finish_reason in ("length", "stop")
