"""Tools on `/v1/chat/completions`: what a request's `tools` and `tool_choice` mean for the prompt, the output's
grammar and the parsing of the output.

- The prompt: a chat template that knows tools (it mentions `tools`) gets them, and the conversation's calls and
  results, in transformers' shapes. Any other template (the default model's) gets them in the Hermes format,
  which the output parser reads: a system message listing the functions as JSON schemas inside <tools></tools>,
  earlier calls as <tool_call> blocks in the assistant's text, results as <tool_response> blocks in a user turn.
- `tool_choice`: `none` leaves the tools out of the prompt and parses nothing; `auto` (the default) parses the
  model's own calls if it makes any; `required` and a named function constrain the output, with a grammar, to
  <tool_call> blocks whose JSON follows the functions' parameter schemas: even a small model then returns a call
  that parses. `parallel_tool_calls: false` allows exactly one block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from malora_runtime.engine.structured import compact, lark_grammar

from .errors import invalid
from .protocol import ChatCompletionRequest, ChatMessage, ChatTool, NamedToolChoice
from .tool_parser import CLOSE, OPEN

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_ROLES = {"developer": "system"}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean: `mode` none / auto / required / named; `functions` the ones it may call."""

    mode: Literal["none", "auto", "required", "named"]
    tools: list[ChatTool]
    functions: list[ChatTool]
    parallel: bool

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def grammar(self) -> str:
        """Lark: one or (parallel) more <tool_call> blocks, each a JSON call of one of `functions`."""
        alternatives = []
        for i, tool in enumerate(self.functions):
            call = {"type": "object", "properties": {"name": {"const": tool.function.name},
                                                     "arguments": tool.function.parameters or EMPTY_PARAMETERS},
                    "required": ["name", "arguments"], "additionalProperties": False}
            alternatives.append(f"fn_{i}: %json {json.dumps(compact(call))}")
        call_rule = " | ".join(f"fn_{i}" for i in range(len(self.functions)))
        start = 'start: call ("\\n" call)*' if self.parallel else "start: call"
        # Bounded by the request body (--max-body-bytes), not the 64 KiB of a client's own grammar: a large set of
        # tools is a legitimate request.
        return lark_grammar("\n".join([start, f"call: {json.dumps(OPEN + chr(10))} ({call_rule}) "
                                              f"{json.dumps(chr(10) + CLOSE)}", *alternatives]), max_chars=4 << 20)


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tools checked against its tool_choice; 400 for a choice that cannot be met."""
    tools = body.tools or []
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools: function names must be unique", param="tools")
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise invalid(f"tool_choice {_describe(choice)} needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise invalid(f"tool_choice names the function {choice.function.name[:64]!r}, which is not among the "
                          "tools", param="tool_choice")
        return ToolPlan("named", tools, chosen, parallel=False)
    return ToolPlan(choice, tools, tools, parallel=body.parallel_tool_calls)


def _describe(choice: object) -> str:
    return f"function {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else repr(choice)


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def conversation(messages: list[ChatMessage], plan: ToolPlan | None, native_tools: bool
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(turns, tools) for the chat template: natively when it knows tools, else in the Hermes format."""
    offered = plan.tools if plan is not None and plan.mode != "none" else []
    if native_tools:
        turns = [_native_turn(m) for m in messages]
        return turns, [t.model_dump(exclude_none=True) for t in offered] or None
    turns = [_hermes_turn(m) for m in messages]
    if offered:
        system = _hermes_system(offered)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{system}"}
        else:
            turns.insert(0, {"role": "system", "content": system})
    return turns, None


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _native_turn(message: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": _ROLES.get(message.role, message.role), "content": message.text()}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments_value(c.function.arguments)}} for c in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        turn["name"] = message.name
    return turn


def _hermes_turn(message: ChatMessage) -> dict[str, str]:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.text()}\n</tool_response>"}
    text = message.text()
    for call in message.tool_calls or []:
        block = json.dumps({"name": call.function.name, "arguments": _arguments_value(call.function.arguments)},
                           ensure_ascii=False)
        text = f"{text}\n{OPEN}\n{block}\n{CLOSE}" if text else f"{OPEN}\n{block}\n{CLOSE}"
    return {"role": _ROLES.get(message.role, message.role), "content": text}


def _hermes_system(tools: list[ChatTool]) -> str:
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return ("You can call functions to answer. They are described, as JSON schemas, inside <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, reply with a JSON object holding its name and arguments inside <tool_call></tool_call> "
            'tags:\n<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>')
