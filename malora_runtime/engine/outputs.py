"""What the engine streams back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters.format import AdapterConfig
from .sequence import TokenLogprobs


@dataclass
class CompletionOutput:
    """New output of one sequence (`index` among a request's n) since the previous update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_output_tokens: int = 0  # total generated so far


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    arrival_time: float = 0.0  # time.monotonic() when the engine accepted the request
    first_scheduled_time: float | None = None  # when its first chunk ran (queue time = this - arrival)
    error: str | None = None  # set when the engine failed this request alone (finished is then True)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_steps: int
    prefix_cache_hit_rate: float
    prefix_cache_hits: int = 0  # prompt tokens served from the cache, cumulative
    prefix_cache_queries: int = 0  # prompt tokens looked up, cumulative
    num_adapter_evictions: int = 0  # idle adapters evicted from a slot for another, cumulative
    num_waiting_for_adapter: int = 0  # requests waiting for a free adapter slot now
    adapter_slot_bytes: int = 0  # bytes of the adapters in slots, packed (the CPU reads them in host memory)
    adapter_slot_budget: int | None = None  # the budget for those bytes (EngineConfig.adapter_bank_memory)
    adapter_device_copy_bytes: int = 0  # bytes of device copies of adapters in slots (a GPU); 0 on the CPU
    num_adapter_activations: int = 0  # adapter versions written into a slot, cumulative


@dataclass(frozen=True)
class AdapterActivity:
    """The adapters that requests in the engine use now, each name once, sorted."""

    running: tuple[str, ...]  # of sequences in the running batch
    waiting: tuple[str, ...]  # of sequences queued (preempted ones too) or requests waiting for a free slot


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did, for step listeners (metrics)."""

    seconds: float
    tokens: int  # computed: prefill chunks + decodes
    seqs: int
    grammar_mask_seconds: float = 0.0  # masking constrained rows' logits to their grammars
    constrained_seqs: int = 0  # sampled rows that carry a grammar


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter version in an engine slot, as the engine's clients see it."""

    name: str
    version: int
    slot: int
    config: AdapterConfig
    pinned: bool
