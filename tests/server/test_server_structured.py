"""response_format through the official openai SDK on the live server, greedy on the default model: every schema
yields output that json.loads parses and jsonschema validates, on the base model and through an adapter,
streamed and not; free requests batched with constrained ones get exactly their own tokens; bad schemas are 400s."""

from __future__ import annotations

import concurrent.futures
import json
import re

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
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "minItems": 1, "maxItems": 2}},
        "required": ["id", "roles"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 20}},
     "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "x": {"type": "integer", "minimum": -99, "maximum": 99}},
     "required": ["kind", "x"],
     "additionalProperties": False},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"circle": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["circle"], "additionalProperties": False},
        {"type": "object", "properties": {"square": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["square"], "additionalProperties": False}]}}, "required": ["shape"],
     "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "exclusiveMinimum": -50,
                                                      "exclusiveMaximum": 60},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "$defs": {"name": NAME}, "properties": {"first": {"$ref": "#/$defs/name"},
                                                            "last": {"$ref": "#/$defs/name"}},
     "required": ["first", "last"], "additionalProperties": False},
    {"type": "string", "enum": ["north", "south", "east", "west"]},
]
PROMPT = "Describe a person, a colour, some tags, an address, a price, two points, a distance and three digits."


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_there_are_twenty_distinct_schemas():
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS}) == len(SCHEMAS) >= 20


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_each_schema_parses_and_validates_in_chat(client, live_server, index):
    """On the base model and through an adapter, streamed and not: four requests at once, batched together."""
    schema = SCHEMAS[index]

    def chat(model: str, stream: bool) -> tuple[str, str | None]:
        kwargs = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200,
                  "temperature": 0, "response_format": response_format(schema)}
        if not stream:
            [choice] = client.chat.completions.create(**kwargs).choices
            return choice.message.content, choice.finish_reason
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    runs = [(m, stream) for m in (live_server.base_model, "alpha") for stream in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        answers = list(pool.map(lambda run: chat(*run), runs))
    for (model, stream), (text, finish) in zip(runs, answers):
        assert finish == "stop", (model, stream, text)
        jsonschema.validate(json.loads(text), schema)



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


@pytest.mark.parametrize("extra,check", [
    ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
    ({"structured_outputs": {"choice": ["oui", 'non "merci"']}}, lambda text: text in ("oui", 'non "merci"')),
    ({"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"}, lambda text: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text)),
    ({"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}}, lambda text: re.fullmatch(r"[0-9]{2}:[0-9]{2}", text)),
    ({"guided_grammar": 'root ::= "The answer is " ("yes" | "no") "."'},
     lambda text: text in ("The answer is yes.", "The answer is no.")),
    ({"structured_outputs": {"grammar": 'start: "A: " /[0-9]{2}/'}}, lambda text: re.fullmatch("A: [0-9]{2}", text)),
    ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}}, lambda text: isinstance(json.loads(text)["ok"], bool)),
    ({"structured_outputs": {"json": '{"type": "integer", "minimum": 3, "maximum": 5}'}},
     lambda text: 3 <= json.loads(text) <= 5),
    ({"structured_outputs": {"json_object": True}}, lambda text: isinstance(json.loads(text), dict)),
])
def test_vllm_guided_options_constrain_chat_and_completions(client, live_server, extra, check):
    """Chat through an adapter; completions on the base model, where the prompt leaves a free JSON object unbounded
    (it then runs to max_tokens): there, only the options that bound the output."""
    ask = "Is Paris in France? What time is it? Give a phone number."
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": ask}],
                                          max_tokens=60, temperature=0, extra_body=extra).choices[0]
    assert chat.finish_reason == "stop" and check(chat.message.content), chat.message.content
    if "json_object" in extra.get("structured_outputs", {}):
        return
    completion = client.completions.create(model=live_server.base_model, prompt=ask + "\nAnswer:", max_tokens=60,
                                           temperature=0, extra_body=extra).choices[0]
    assert completion.finish_reason == "stop" and check(completion.text), completion.text


@pytest.mark.parametrize("extra,param", [
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "wat"}}}}},
     "structured_outputs.json"),
    ({"guided_json": {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 64}
                                                       for i in range(1000)}}}, "guided_json"),
    ({"guided_regex": "a" * 70_000}, "guided_regex"),
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json"),
])
def test_bad_or_huge_constraints_are_400s_naming_the_field(client, live_server, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=live_server.base_model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == param, refused.value.body
    if "uniqueItems" in json.dumps(extra):  # an unsupported keyword is named
        assert "uniqueItems" in refused.value.body["message"]


def test_constrained_requests_compile_and_mask_times_are_metrics(client, live_server, http):
    def sample(name: str, labels: str = "") -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        return 0.0

    before = (sample("malora_constrained_requests_total", '{kind="regex"}'),
              sample("malora_grammar_compile_seconds_count"), sample("malora_grammar_mask_seconds_count"))
    pattern = f"[0-9]{{{len(str(before))}}}"  # a regex this test has not used before: compiled, not cached
    for _ in range(2):
        client.completions.create(model=live_server.base_model, prompt="Digits:", max_tokens=40, temperature=0,
                                  extra_body={"guided_regex": pattern})
    after = (sample("malora_constrained_requests_total", '{kind="regex"}'),
             sample("malora_grammar_compile_seconds_count"), sample("malora_grammar_mask_seconds_count"))
    assert after[0] == before[0] + 2  # both counted
    assert after[1] == before[1] + 1  # compiled once, then cached
    assert after[2] >= before[2] + 2  # a mask in every step that had a constrained row


def test_sampled_choices_each_follow_the_schema_with_masked_logprobs(client, live_server):
    """n > 1 with sampling: every choice has its own matcher; logprobs are of the masked distribution, so the top
    alternatives of each token are tokens the grammar allowed (here: only digits, then the end)."""
    schema = SCHEMAS[4]
    answer = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPT}], n=3,
                                            max_tokens=120, temperature=1.0, seed=7, logprobs=True, top_logprobs=3,
                                            response_format=response_format(schema))
    assert len(answer.choices) == 3
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert len(choice.logprobs.content) >= 3
        assert all(lp.logprob > -1e9 for lp in choice.logprobs.content)
    digits = client.completions.create(model=live_server.base_model, prompt="A number:", max_tokens=8,
                                       temperature=0, logprobs=5, extra_body={"guided_regex": "[0-9]{3}"})
    top = digits.choices[0].logprobs.top_logprobs
    assert top and all(token.isdigit() or token == "" for step in top[:3] for token in step)
    assert all(value is not None and value > -1e9 for step in top for value in step.values())  # no masked entries
    forced = client.completions.create(model=live_server.base_model, prompt="Yes?", max_tokens=4, temperature=0,
                                       logprobs=3, extra_body={"guided_choice": ["yes"]})
    assert list(forced.choices[0].logprobs.top_logprobs[0]) == ["yes"]
