"""Which grammar a request's output must follow: OpenAI's `response_format`, vLLM's `structured_outputs` and
`guided_*` fields, or a tool choice that must be met. At most one may be given. Building and compiling it happens
in worker threads (`ServerState.prepare_constraint`), never on the event loop or the engine thread."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from malora_runtime.engine.structured import (
    JSON_OBJECT_SCHEMA,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)

from .errors import invalid
from .protocol import SamplingFields
from .tools import ToolPlan


@dataclass(frozen=True)
class Constraint:
    kind: str  # json_object, json_schema, regex, choice, grammar, tools (a metrics label)
    param: str  # the request field it came from (named in a 400)
    build: Callable[[], str]  # llguidance's grammar text; raises GrammarError


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise invalid(f"{param} is not JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise invalid(f"{param} must be a JSON schema object", param=param)
    return value


def request_constraint(body: SamplingFields, tools: ToolPlan | None = None) -> Constraint | None:
    """The one constraint `body` asks for, or None; 400 when it asks for more than one or gives a malformed one."""
    found: list[Constraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(Constraint("json_object", "response_format", lambda: json_schema_grammar(JSON_OBJECT_SCHEMA)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format of type json_schema needs json_schema.schema", param="response_format")
        schema = fmt.json_schema.schema_
        found.append(Constraint("json_schema", "response_format", lambda: json_schema_grammar(schema)))
    vllm = body.structured_outputs
    options: list[tuple[str, str, Any]] = [
        ("guided_json", "json_schema", body.guided_json), ("guided_regex", "regex", body.guided_regex),
        ("guided_choice", "choice", body.guided_choice), ("guided_grammar", "grammar", body.guided_grammar)]
    if vllm is not None:
        options += [("structured_outputs.json", "json_schema", vllm.json_),
                    ("structured_outputs.regex", "regex", vllm.regex),
                    ("structured_outputs.choice", "choice", vllm.choice),
                    ("structured_outputs.grammar", "grammar", vllm.grammar),
                    ("structured_outputs.json_object", "json_object", vllm.json_object or None)]
    for param, kind, value in options:
        if value is not None:
            found.append(_option(param, kind, value))
    if tools is not None and tools.constrained:
        found.append(Constraint("tools", "tool_choice", tools.grammar))
    if len(found) > 1:
        raise invalid("give at most one output constraint; this request has " +
                      ", ".join(c.param for c in found), param=found[1].param)
    return found[0] if found else None


def _option(param: str, kind: str, value: Any) -> Constraint:
    if kind == "json_schema":
        schema = _schema(value, param)
        return Constraint(kind, param, lambda: json_schema_grammar(schema))
    if kind == "json_object":
        return Constraint(kind, param, lambda: json_schema_grammar(JSON_OBJECT_SCHEMA))
    if kind == "regex":
        return Constraint(kind, param, lambda: regex_grammar(value))
    if kind == "choice":
        return Constraint(kind, param, lambda: choice_grammar(value))
    return Constraint(kind, param, lambda: lark_grammar(value))
