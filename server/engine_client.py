"""The seam between the HTTP server and the engine: the server depends on this interface only.

`malora_runtime.engine.async_engine.AsyncEngine` implements it; tests may pass a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from malora_runtime.adapters.format import MaloraAdapter
from malora_runtime.adapters.registry import HostAdapter
from malora_runtime.engine.outputs import EngineStats, RequestOutput
from malora_runtime.sampling_params import SamplingParams


class EngineClient(Protocol):
    adapter_provider: Callable[[str], Awaitable[HostAdapter]] | None
    """Where the engine gets an adapter's current version when a request names one not in a slot."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_running(self) -> bool: ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has `finished` set. Closing the stream aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False) -> int:
        """Copy `adapter` into a slot between steps as `name`'s current version; NoFreeSlotError when all are busy."""
        ...

    async def remove_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; running ones finish on their version first."""
        ...

    def check_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        """Raise an `EngineRequestError` for a request the engine cannot serve."""
        ...

    def adapter_names(self) -> list[str]: ...

    def stats(self) -> EngineStats: ...

    def stalled_for(self) -> float:
        """Seconds since the engine last made progress while work waits (0 when healthy, inf when its thread
        is gone)."""
        ...

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish up to `timeout`, then stop."""
        ...
