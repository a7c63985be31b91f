"""Tool calls out of generated text, incrementally: the Hermes format (Qwen 2.5, Hermes, SmolLM3 and this server's
own prompt for templates without tools), one call per block:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ToolCallParser.feed` takes text as it is generated and returns what can be said of it so far: content deltas
(text outside the blocks) and call deltas (a call's id and name once its name is complete, then its argument text
as it arrives), in the shapes of OpenAI's streamed chat chunks. A non-streamed response is the same deltas folded
together, so both say exactly the same thing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The start of a call whose arguments can be streamed: the name first, then the arguments object.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDeltas:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class _Call:
    """The block being read: its text so far, and how much of its arguments has been handed out."""

    text: str = ""
    index: int | None = None  # set once the head (name) has been handed out
    args_start: int = 0
    args_sent: int = 0  # characters of the arguments handed out, from args_start
    scan: _JsonScan | None = None
    quotes: _JsonScan = field(default_factory=lambda: _JsonScan())  # string state over the whole block


class _JsonScan:
    """Finds where a JSON value that starts with `{` ends, one character at a time (strings and escapes aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def push(self, char: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0


class ToolCallParser:
    def __init__(self) -> None:
        self.pending = ""  # content held back: it may be the start of OPEN
        self.call: _Call | None = None
        self.num_calls = 0
        self.gap = ""

    def feed(self, text: str) -> ParsedDeltas:
        out = ParsedDeltas()
        self.pending += text
        while self.pending:
            if self.call is None:
                at = self.pending.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.pending, OPEN)
                    self._content(out, self.pending[:len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                self._content(out, self.pending[:at])
                self.gap = ""  # only line breaks between two calls
                self.pending = self.pending[at + len(OPEN):]
                self.call = _Call()
            else:
                at, taken = self._find_close()
                self.call.text += self.pending[:taken]
                if at is None:
                    self.pending = self.pending[taken:]  # empty, or a start of CLOSE held back
                    self._stream_call(out)
                    break
                self.pending = self.pending[at + len(CLOSE):]
                self._stream_call(out)
                self._close_call(out)
        return out

    def _find_close(self) -> tuple[int | None, int]:
        """(where CLOSE starts in `pending`, or None; how many characters of `pending` belong to the call). A
        CLOSE inside a JSON string of the call (an argument's text) does not end it."""
        call = self.call
        assert call is not None
        text = self.pending
        for i, char in enumerate(text):
            if not call.quotes.in_string:
                if text.startswith(CLOSE, i):
                    return i, i
                if CLOSE.startswith(text[i:]):  # the end of the text may be the start of CLOSE
                    return None, i
            call.quotes.push(char)
        return None, len(text)

    def _content(self, out: ParsedDeltas, text: str) -> None:
        """Text outside the blocks; after a call, blank text is held until something else follows it."""
        if not self.num_calls:
            out.content += text
            return
        self.gap += text
        if self.gap.strip():
            out.content += self.gap
            self.gap = ""

    def finish(self) -> ParsedDeltas:
        """The end of the output: an unfinished block whose call was never announced is handed out as content."""
        out = ParsedDeltas(content=self.pending)
        self.pending = ""
        if self.call is not None and self.call.index is None:
            out.content = OPEN + self.call.text + out.content
        self.call = None
        return out

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    def _stream_call(self, out: ParsedDeltas) -> None:
        call = self.call
        assert call is not None
        if call.index is None:
            head = _HEAD.match(call.text)
            if head is None:
                return
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return
            call.index, call.args_start, call.scan = self.num_calls, head.end(), _JsonScan()
            self.num_calls += 1
            out.calls.append(CallDelta(call.index, tool_call_id(), name))
        assert call.scan is not None
        start = call.args_start + call.args_sent
        piece = []
        for char in call.text[start:]:
            if call.scan.done:
                break
            call.scan.push(char)
            piece.append(char)
        if piece:
            call.args_sent += len(piece)
            _arguments(out, call.index).arguments += "".join(piece)

    def _close_call(self, out: ParsedDeltas) -> None:
        call = self.call
        assert call is not None
        self.call = None
        if call.index is not None:
            return
        # Not streamable (other key order, string arguments...): the whole block, parsed at once.
        try:
            value = json.loads(call.text)
            name = value["name"]
            arguments = value.get("arguments", value.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, TypeError, KeyError, AttributeError):
            out.content += OPEN + call.text + CLOSE  # not a call after all: the model's text
            return
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        out.calls.append(CallDelta(self.num_calls, tool_call_id(), name, text))
        self.num_calls += 1


def _arguments(out: ParsedDeltas, index: int) -> CallDelta:
    if out.calls and out.calls[-1].index == index:
        return out.calls[-1]
    out.calls.append(CallDelta(index))
    return out.calls[-1]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back until the next piece)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
