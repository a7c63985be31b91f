"""Errors a caller of the engine can cause (each maps to a 4xx at the HTTP layer)."""

from __future__ import annotations


class EngineRequestError(ValueError):
    """The request cannot be served as given."""


class PromptTooLongError(EngineRequestError):
    """Prompt plus max_tokens exceeds the model's context."""


class UnknownAdapterError(EngineRequestError, KeyError):
    """The request names an adapter the engine does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EngineShutdownError(RuntimeError):
    """The engine is stopping and takes no new work."""
