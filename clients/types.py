"""Typed results of the SDK: plain dataclasses built from the server's JSON (unknown fields are ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _pick(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class MaloraError(Exception):
    """An error answer of the server (or a transport failure, status 0), with the server's own message."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def from_body(cls, status: int, body: Any, text: str = "", retry_after: float | None = None) -> MaloraError:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return cls(status, str(error.get("message", text)), error.get("type"), error.get("code"),
                       error.get("param"), retry_after)
        if isinstance(body, dict) and isinstance(body.get("detail"), str):  # plain FastAPI servers
            return cls(status, body["detail"], retry_after=retry_after)
        return cls(status, text.strip() or f"HTTP {status}", retry_after=retry_after)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> Usage | None:
        return cls(**_pick(cls, data)) if data else None


@dataclass(slots=True)
class Choice:
    """One choice of a completion or chat completion; `text` is the chat message's content for chat."""

    index: int
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: dict[str, Any] | None = None


@dataclass(slots=True)
class Completion:
    """A whole completion or chat completion (`object` tells which)."""

    id: str
    object: str
    model: str
    created: int
    choices: list[Choice]
    usage: Usage | None = None
    adapter_version: int | None = None
    """The `x-malora-adapter-version` header: which version of the adapter answered."""

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def parse(cls, data: dict[str, Any], adapter_version: int | None = None) -> Completion:
        choices = []
        for c in data.get("choices", []):
            text = c["message"].get("content") or "" if "message" in c else c.get("text", "")
            choices.append(Choice(c.get("index", 0), text, c.get("finish_reason"), c.get("stop_reason"),
                                  c.get("logprobs")))
        return cls(data.get("id", ""), data.get("object", ""), data.get("model", ""), data.get("created", 0),
                   choices, Usage.parse(data.get("usage")), adapter_version)


@dataclass(slots=True)
class Chunk:
    """One streamed event: the new text of one choice, or (last, with include_usage) the usage alone."""

    id: str
    model: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None

    @classmethod
    def parse_all(cls, data: dict[str, Any]) -> list[Chunk]:
        rid, model = data.get("id", ""), data.get("model", "")
        usage = Usage.parse(data.get("usage"))
        chunks = []
        for c in data.get("choices", []):
            text = (c.get("delta") or {}).get("content") or "" if "delta" in c else c.get("text", "")
            chunks.append(cls(rid, model, c.get("index", 0), text, c.get("finish_reason")))
        if usage is not None:
            chunks.append(cls(rid, model, usage=usage))
        return chunks


@dataclass(slots=True)
class Model:
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    adapter: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Model:
        return cls(**_pick(cls, data))


@dataclass(slots=True)
class Adapter:
    """An adapter's state on the server: loaded (in a slot), cpu, disk, failed or unloaded."""

    name: str
    state: str
    path: str | None = None
    version: int | None = None
    slot: int | None = None
    pinned: bool = False
    base_model: str | None = None
    target_modules: list[str] = field(default_factory=list)
    num_experts: int | None = None
    rank: int | None = None
    subspace_rank: int | None = None
    top_k: int | None = None
    error: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Adapter:
        return cls(**_pick(cls, data))


@dataclass(slots=True)
class AdapterList:
    adapters: list[Adapter]
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> AdapterList:
        return cls([Adapter.parse(a) for a in data.get("data", [])], dict(data.get("stats") or {}))
