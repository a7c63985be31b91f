"""The seam between the HTTP server and the engine: the server depends on this interface only.

`malora_runtime.engine.async_engine.AsyncEngine` implements it; tests may pass a fake that implements it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from malora_runtime.adapters.format import MaloraAdapter
from malora_runtime.adapters.registry import HostAdapter
from malora_runtime.engine.async_engine import RequestRecord
from malora_runtime.engine.outputs import AdapterActivity, EngineStats, RequestOutput, ResidentAdapter, StepRecord
from malora_runtime.sampling_params import SamplingParams

StepListener = Callable[[StepRecord], None]


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_running(self) -> bool: ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams, adapter: HostAdapter | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs on exactly the `adapter` version given (None: the base model); the last
        output has `finished` set. Closing the stream aborts it."""
        ...

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise an `EngineRequestError` for a request the engine cannot serve."""
        ...

    async def add_adapter(self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False) -> int:
        """Copy `adapter` into a slot between steps as `name`'s current version; NoFreeSlotError when all are busy."""
        ...

    async def remove_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; running ones finish on their version first."""
        ...

    def resident_adapters(self) -> dict[str, ResidentAdapter]:
        """The adapter versions in engine slots now, by name."""
        ...

    def adapter_activity(self) -> AdapterActivity:
        """The adapters of running requests and of waiting ones (queued, or waiting for a free slot), now."""
        ...

    def drain_activation_seconds(self) -> list[float]:
        """Seconds of each adapter activation into a slot since the last call."""
        ...

    async def harvest_routing(self) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
        """(tokens per expert by adapter summed over layers, the same per adapted layer) since the last harvest."""
        ...

    async def harvest_expert_counts(self) -> dict[str, list[int]]:
        """Tokens routed to each expert since the last harvest, by adapter name."""
        ...

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every linear module an adapter may target."""
        ...

    async def prepare_grammar(self, grammar: str) -> float | None:
        """Compile an llguidance grammar off the engine thread (cached): seconds taken, None when cached.
        Raises `GrammarError` for one that cannot be used."""
        ...

    def add_step_listener(self, listener: StepListener) -> None: ...

    def add_request_listener(self, listener: Callable[[RequestRecord], None]) -> None: ...

    def stats(self) -> EngineStats: ...

    def stalled_for(self) -> float:
        """Seconds since the engine last made progress while work waits (0 when healthy, inf when its thread
        is gone)."""
        ...

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish up to `timeout`, then stop."""
        ...
