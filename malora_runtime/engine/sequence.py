"""One generated continuation (a request with n > 1 owns n of these)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from malora_runtime.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # [(token_id, logprob)] best first; len == SamplingParams.logprobs


@dataclass(eq=False)
class Sequence:
    """Token ids are one list (prompt then output): recompute after preemption treats it all as prompt.

    KV invariant: tokens [0, num_computed_tokens) have K/V written into the blocks of `block_table`.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    seq_index: int = 0
    adapter_name: str | None = None
    adapter_slot: int = -1
    cache_key: object = None  # prefix-cache namespace: one per adapter activation, None on the base model
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    status: SequenceStatus = field(init=False, default=SequenceStatus.WAITING)
    num_computed_tokens: int = field(init=False, default=0)
    num_cached_tokens: int = field(init=False, default=0)  # prompt tokens served by the prefix cache
    block_table: list[int] = field(init=False, default_factory=list)
    block_hashes: list[int] = field(init=False, default_factory=list)  # chain hash per full block
    num_committed_blocks: int = field(init=False, default=0)  # leading blocks offered to the prefix cache
    finish_reason: str | None = field(init=False, default=None)  # "stop" | "length" | "abort"
    generator: torch.Generator | None = field(init=False, default=None)
    output_counts: dict[int, int] = field(init=False, default_factory=dict)  # output token -> count
    output_logprobs: list[TokenLogprobs] = field(init=False, default_factory=list)
    matcher: object = field(init=False, default=None, repr=False)  # llguidance matcher of a constrained sequence
    _prompt_unique: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.cache_key is None:
            self.cache_key = self.adapter_name
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        if self.sampling_params.seed is not None:
            # Siblings (n > 1) get distinct but reproducible streams.
            self.generator = torch.Generator()
            self.generator.manual_seed((self.sampling_params.seed + self.seq_index) & (2**64 - 1))

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}-{self.seq_index}"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last token lacks KV (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def prompt_unique_ids(self) -> torch.Tensor:
        """Distinct prompt token ids [P'] (int64), computed once for the repetition penalty."""
        if self._prompt_unique is None:
            self._prompt_unique = torch.tensor(sorted(set(self.prompt_token_ids)), dtype=torch.long)
        return self._prompt_unique
