"""The asynchronous engine: one background thread steps `LLMEngine`; callers get async streams.

Everything that touches the engine's state (adding, aborting, adapter changes) runs on the engine
thread, between steps, so a step never sees a half-applied change. Torch releases the GIL inside
its kernels, so the HTTP event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..adapters.format import MaloraAdapter
from ..adapters.registry import HostAdapter
from ..config import EngineConfig
from ..patching import linear_shapes
from ..sampling_params import SamplingParams
from .adapter_slots import NoFreeSlotError
from .errors import EngineShutdownError, RequestFailedError, UnknownAdapterError
from .llm_engine import LLMEngine
from .outputs import AdapterActivity, EngineStats, RequestOutput, ResidentAdapter, StepRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
StepListener = Callable[[StepRecord], None]


@dataclass
class RequestRecord:
    """What one finished request looked like, for metrics (times in seconds)."""

    request_id: str
    adapter: str | None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queue_time: float | None = None
    time_to_first_token: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    e2e_latency: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)


RequestListener = Callable[[RequestRecord], None]
SLOT_RETRY_SECONDS = 0.02


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.num_waiting_for_adapter = 0
        # Requests waiting for a free slot, by adapter name (touched on the event loop's thread only).
        self._waiting_for_slot: Counter[str] = Counter()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.step_listeners: list[StepListener] = []
        self.request_listeners: list[RequestListener] = []
        self.last_step_time = 0.0
        # time.monotonic() of the loop's last sign of progress: a finished step, or a wait while idle.
        self.last_progress = time.monotonic()
        self._broken_listeners: set[int] = set()
        self._restore_threads: int | None = None  # torch threads to give back to the process on shutdown

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model on the engine's own thread, which then runs the step loop, and make every
        other thread of the process run torch single-threaded.

        Why: torch's CPU kernels run OpenMP teams, one per thread that calls them. A second team
        (the caller's, left from loading the model) makes OpenMP throttle its spin-waits when the
        teams outnumber the cores, and every small parallel op of the engine then waits ~50 us for a
        sleeping worker: a prefill with an adapter on 7 modules took 230 ms instead of 80 ms here.
        With one team, owned by the engine thread, steps run as fast as on a main thread.
        """
        threads = torch.get_num_threads()
        built: Future[AsyncEngine] = Future()

        def build_then_loop() -> None:
            torch.set_num_threads(threads)
            try:
                engine = cls(LLMEngine.from_config(config))
            except BaseException as exc:  # handed to the caller of from_config
                built.set_exception(exc)
                return
            engine._thread = threading.current_thread()
            engine._restore_threads = threads
            built.set_result(engine)
            engine._loop()

        threading.Thread(target=build_then_loop, name="malora-engine", daemon=True).start()
        engine = built.result()
        torch.set_num_threads(1)  # this thread and threads started later: no OpenMP team of their own
        return engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="malora-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish up to `timeout`, then stop the thread."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.05)
        for request_id in list(self._streams):
            self._submit(lambda rid=request_id: self._abort_now(rid))
        self._commands.put((lambda: None, Future()))  # wakes the loop to see _stopping
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None

    # ---- engine-thread work ----
    def _submit(self, fn: Callable[[], T]) -> Future:
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future

    async def run_on_engine(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and await its result."""
        if self._thread is None:
            return fn()
        return await asyncio.wrap_future(self._submit(fn))

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the awaiting caller
                    future.set_exception(exc)

    def stalled_for(self) -> float:
        """Seconds since the engine thread last made progress while work is waiting; 0 when it is idle or
        stepping normally, infinite when the thread is gone."""
        if self._thread is None or not self._thread.is_alive():
            return float("inf")
        if not self._streams:
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

    def _notify(self, listeners: list, *args: Any) -> None:
        """Call every listener; one that raises is logged (once) and never stops the caller."""
        for listener in listeners:
            try:
                listener(*args)
            except Exception:
                if id(listener) not in self._broken_listeners:
                    self._broken_listeners.add(id(listener))
                    log.exception("listener %r failed (further failures of it are not logged)", listener)

    def _loop(self) -> None:
        while True:
            self._drain_commands()
            if self._stopping and not self._streams:
                return
            if not self.engine.has_unfinished():
                self.last_progress = time.monotonic()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self.last_progress = time.monotonic()
                continue
            started = time.perf_counter()
            steps_before = self.engine.num_steps
            try:
                outputs = self.engine.step()
            except Exception:  # outside the per-request isolation (the scheduler itself): a bug
                log.exception("engine step failed; aborting the running requests")
                for request_id in list(self._streams):
                    self._abort_now(request_id, error=True)
                continue
            elapsed = time.perf_counter() - started
            self.last_step_time = time.time()
            self.last_progress = time.monotonic()
            if self.engine.num_steps > steps_before:
                engine = self.engine
                self._notify(self.step_listeners, StepRecord(elapsed, engine.last_step_tokens, engine.last_step_seqs,
                                                             engine.last_step_mask_seconds,
                                                             engine.last_step_constrained))
            for output in outputs:
                if output.error is not None:
                    self._deliver(RequestFailedError(output.error), output.request_id)
                else:
                    self._deliver(output)

    def _deliver(self, output: RequestOutput | BaseException, request_id: str | None = None) -> None:
        key = request_id if request_id is not None else output.request_id  # type: ignore[union-attr]
        stream = self._streams.get(key)
        if stream is None:
            return
        loop, q = stream
        finished = isinstance(output, BaseException) or output.finished
        if finished:
            self._streams.pop(key, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, output)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            log.debug("dropped an output of %s: its event loop is closed", key)

    def _abort_now(self, request_id: str, error: bool = False) -> None:
        output = self.engine.abort(request_id)
        if error:
            self._deliver(RequestFailedError("the engine failed while running this request"), request_id)
        elif output is not None:
            self._deliver(output)

    # ---- public API ----
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: HostAdapter | str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last one has `finished` set. Closing the stream aborts it.

        `adapter`: the adapter version the request runs on, as the caller resolved it (brought into a slot
        first when it is not resident), or the name of one already in a slot; None for the base model."""
        if self._stopping:
            raise EngineShutdownError("the server is shutting down")
        request_id = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        try:
            await self._admit(request_id, prompt, params, adapter)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        record = RequestRecord(request_id, adapter.name if isinstance(adapter, HostAdapter) else adapter)
        started = last = time.monotonic()
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    record.finish_reasons = ["error"]
                    raise item
                finished = item.finished
                self._observe(record, item, started, last)
                last = time.monotonic()
                yield item
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._submit(lambda: self.engine.abort(request_id))
                record.finish_reasons = record.finish_reasons or ["abort"]
            record.e2e_latency = time.monotonic() - started
            self._notify(self.request_listeners, record)

    @staticmethod
    def _observe(record: RequestRecord, output: RequestOutput, started: float, last: float) -> None:
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        record.prompt_tokens = len(output.prompt_token_ids)
        if output.first_scheduled_time is not None and record.queue_time is None:
            record.queue_time = max(0.0, output.first_scheduled_time - output.arrival_time)
        if new_tokens:
            if record.time_to_first_token is None:
                record.time_to_first_token = now - started
            else:
                record.inter_token_latencies.append(now - last)
        record.generation_tokens += new_tokens
        record.finish_reasons.extend(c.finish_reason for c in output.outputs if c.finish_reason)

    async def _admit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                     adapter: HostAdapter | str | None) -> None:
        """Add the request, first bringing its adapter version into a slot if needed.

        Activation and admission run in one engine command, so the adapter cannot be evicted in
        between. With every slot busy, the request waits (not fails) until one frees up.
        """

        def admit() -> None:
            if isinstance(adapter, HostAdapter):
                if adapter.unloaded:
                    raise UnknownAdapterError(f"adapter {adapter.name!r} was unloaded")
                if not self.engine.runner.adapters.is_resident(adapter.name, adapter.version):
                    self.engine.add_adapter(adapter.name, adapter.adapter, adapter.version, adapter.pinned)
            name = adapter.name if isinstance(adapter, HostAdapter) else adapter
            self.engine.add_request(request_id, prompt, params, name)

        waiting = False
        name = adapter.name if isinstance(adapter, HostAdapter) else adapter or ""
        try:
            while True:
                try:
                    await self.run_on_engine(admit)
                    return
                except NoFreeSlotError:
                    if not waiting:
                        waiting = True
                        self.num_waiting_for_adapter += 1
                        self._waiting_for_slot[name] += 1
                    await asyncio.sleep(SLOT_RETRY_SECONDS)
        finally:
            if waiting:
                self.num_waiting_for_adapter -= 1
                self._waiting_for_slot[name] -= 1
                if self._waiting_for_slot[name] <= 0:
                    del self._waiting_for_slot[name]

    async def add_adapter(self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False) -> int:
        return await self.run_on_engine(lambda: self.engine.add_adapter(name, adapter, version, pinned))

    async def remove_adapter(self, name: str) -> None:
        """New requests can no longer use `name` (no-op when it is not resident)."""

        def remove() -> None:
            if name in self.engine.runner.adapters.current:
                self.engine.remove_adapter(name)

        await self.run_on_engine(remove)

    def resident_adapters(self) -> dict[str, ResidentAdapter]:
        """The adapter versions that sit in engine slots now, by name (a snapshot)."""
        return self.engine.resident_adapters()

    def adapter_activity(self) -> AdapterActivity:
        """The adapters of running requests, and of waiting ones: queued in the engine or waiting for a free slot."""
        engine = self.engine.adapter_activity()
        waiting = {*engine.waiting, *(name for name, count in list(self._waiting_for_slot.items()) if count > 0)}
        return AdapterActivity(engine.running, tuple(sorted(waiting)))

    def drain_activation_seconds(self) -> list[float]:
        """Seconds of each adapter activation into a slot since the last call (for a latency histogram)."""
        pending = self.engine.runner.adapters.activation_seconds
        drained = []
        while pending:
            try:
                drained.append(pending.popleft())
            except IndexError:
                break
        return drained

    async def harvest_routing(self) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
        """(tokens per expert by adapter, summed over layers; the same per adapted layer) since the last harvest."""
        adapters = self.engine.runner.adapters

        def harvest() -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
            return adapters.harvest_expert_counts(), adapters.harvest_layer_counts()

        return await self.run_on_engine(harvest)

    async def harvest_expert_counts(self) -> dict[str, list[int]]:
        """Tokens routed to each expert since the last harvest, by adapter (read between steps)."""
        return await self.run_on_engine(self.engine.runner.adapters.harvest_expert_counts)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every linear module an adapter may target, by module path."""
        return linear_shapes(self.engine.runner.model)

    async def prepare_grammar(self, grammar: str) -> float | None:
        """Compile `grammar` for this tokenizer in a worker thread (never the engine's, so the batch keeps
        stepping); the seconds it took, None when it was cached. Raises GrammarError."""
        seconds = await asyncio.to_thread(self.engine.grammars.prepare, grammar)
        return seconds or None

    def add_step_listener(self, listener: StepListener) -> None:
        self.step_listeners.append(listener)

    def add_request_listener(self, listener: RequestListener) -> None:
        self.request_listeners.append(listener)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_ids, params, None)

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.engine.stats(), num_waiting_for_adapter=self.num_waiting_for_adapter)
