"""The Hermes tool-call parser (server/tool_parser.py): the same content and calls however the text is split into
pieces; calls it cannot stream are parsed whole; text that is not a call stays content."""

from __future__ import annotations

import json
import random

import pytest

from server.tool_parser import ToolCallParser


def parse(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser = ToolCallParser()
    content, calls, ids = "", [], set()
    for piece in [*pieces, None]:
        out = parser.feed(piece) if piece is not None else parser.finish()
        content += out.content
        for delta in out.calls:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.id not in ids
                ids.add(delta.id)
                calls.append([delta.name, delta.arguments])
            else:
                calls[delta.index][1] += delta.arguments
    return content, [tuple(c) for c in calls]


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


TRICKY_ARGS = {"city": 'Pa"ris} {', "path": "C:\\dir\\", "days": [1, {"a": [2, {}]}], "none": None}
CASES = [
    ("no call at all, a < sign and <tool", "no call at all, a < sign and <tool", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(TRICKY_ARGS) + "}\n</tool_call>", "",
     [("get_weather", json.dumps(TRICKY_ARGS))]),
    ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"arguments": {"x": 1}, "name": "b"}\n</tool_call>\n', "Let me look.\n", [("a", "{}"), ("b", '{"x": 1}')]),
    ('<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>', "", [("s", '{"q": 1}')]),
    ("<tool_call>\nnot json\n</tool_call> after", "<tool_call>\nnot json\n</tool_call> after", []),
    ('<tool_call>\n{"name": "cut", "argu', '<tool_call>\n{"name": "cut", "argu', []),
    ('<tool_call>{"name": "f", "arguments": {"k": "v"}}</tool_call> and then some text.', " and then some text.",
     [("f", '{"k": "v"}')]),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>b \\" </tool_call>"}}\n</tool_call>', "",
     [("f", '{"s": "a</tool_call>b \\" </tool_call>"}')]),  # the tag inside an argument's string is text
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_every_split_of_the_text_parses_the_same(text, content, calls):
    assert parse([text]) == (content, calls)
    assert parse(list(text)) == (content, calls)
    rng = random.Random()
    for _ in range(30):
        assert parse(random_split(text, rng)) == (content, calls)


def test_arguments_stream_before_the_block_closes():
    parser = ToolCallParser()
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"city": "Pa')
    assert [(d.name, d.arguments) for d in first.calls] == [("f", '{"city": "Pa')]
    more = parser.feed('ris"}}\n</tool')
    assert [(d.id, d.arguments) for d in more.calls] == [(None, 'ris"}')]
    assert parser.feed("_call>").calls == [] and parser.has_calls
