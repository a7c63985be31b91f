"""Tools through the official openai SDK on the live server (the default model, greedy): a named tool choice and
`required` return calls whose arguments parse and follow the function's parameters; streamed deltas reassemble to
the same calls; tool turns are accepted in the conversation; bad tool requests are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def ask(client, model, stream=False, **kwargs):
    kwargs = {"messages": ASK, "tools": TOOLS, "max_tokens": 80, **kwargs}
    return client.chat.completions.create(model=model, temperature=0, stream=stream, **kwargs)


def reassemble(stream) -> tuple[list[dict], str | None, str]:
    """The calls, finish reason and content of a streamed chat completion, from its deltas."""
    calls: list[dict] = []
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index == len(calls) and delta.type == "function"
                    calls.append({"name": delta.function.name, "arguments": ""})
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return calls, finish, content


def check_calls(calls: list[dict], allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in allowed
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_is_valid_and_streams_to_the_same_call(client, live_server, choice):
    allowed = {"add"} if isinstance(choice, dict) else {"get_weather", "add"}
    for model in (live_server.base_model, "alpha"):
        answer = ask(client, model, tool_choice=choice, parallel_tool_calls=False)
        [result] = answer.choices
        assert result.finish_reason == "tool_calls" and result.message.content is None
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in result.message.tool_calls]
        assert len(calls) == 1 and result.message.tool_calls[0].id.startswith("call_")
        check_calls(calls, allowed)
        streamed, finish, content = reassemble(ask(client, model, stream=True, tool_choice=choice,
                                                   parallel_tool_calls=False))
        assert (streamed, finish, content) == (calls, "tool_calls", "")


def test_parallel_calls_each_follow_their_function(client, live_server):
    answer = ask(client, live_server.base_model, tool_choice="required", max_tokens=120)
    calls = [{"name": c.function.name, "arguments": c.function.arguments}
             for c in answer.choices[0].message.tool_calls or []]
    if answer.choices[0].finish_reason == "tool_calls":
        check_calls(calls, {"get_weather", "add"})
    else:  # out of tokens mid-way: the calls made so far still parse
        assert answer.choices[0].finish_reason == "length"
        check_calls(calls[:-1] or calls, {"get_weather", "add"})


def test_none_and_auto_answer_in_text_without_parsing_the_prompt_as_calls(client, live_server):
    for choice in ("none", "auto"):
        answer = ask(client, live_server.base_model, tool_choice=choice, max_tokens=16)
        [result] = answer.choices
        if result.message.tool_calls:  # the model called a tool by itself: then it parses
            check_calls([{"name": c.function.name, "arguments": c.function.arguments}
                         for c in result.message.tool_calls], {"get_weather", "add"})
        else:
            assert result.message.content and result.finish_reason in ("stop", "length")


def test_a_conversation_with_calls_and_results_is_served(client, live_server, http):
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "high_c": 18}'}]
    answer = ask(client, "alpha", messages=messages, tool_choice="none", max_tokens=8)
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > 60
    counted = http.post("/tokenize", json={"messages": messages}).json()
    assert counted["count"] > 40


@pytest.mark.parametrize("kwargs,param", [
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "wat"}}}}}]}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s_and_the_server_keeps_serving(client, live_server, kwargs, param):
    body = {"model": live_server.base_model, "messages": ASK, "max_tokens": 4, "tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{k: v for k, v in body.items() if v is not None})
    assert (refused.value.body["param"] or "").startswith(param), refused.value.body
    answer = client.chat.completions.create(model=live_server.base_model, messages=ASK, max_tokens=2)
    assert answer.choices[0].finish_reason in ("length", "stop")
