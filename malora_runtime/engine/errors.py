"""Errors a caller of the engine can cause (each maps to a 4xx at the HTTP layer)."""

from __future__ import annotations

from ..adapters.errors import UnknownAdapterError  # noqa: F401 (raised by the engine too: one error, one 404)


class EngineRequestError(ValueError):
    """The request cannot be served as given; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = "prompt") -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(EngineRequestError):
    """Prompt plus max_tokens exceeds the model's context."""



class EngineShutdownError(RuntimeError):
    """The engine is stopping and takes no new work."""


class RequestFailedError(RuntimeError):
    """The engine could not run this request (its step raised, or its logits were not finite); other
    requests of the same step go on."""


class SlotMemoryError(EngineRequestError):
    """Activating the adapter would grow the slot banks past their memory budget."""
