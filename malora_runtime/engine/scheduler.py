"""Iteration-level scheduler: which sequences run this step and which token range each computes.

Per step, in priority order (all within `max_num_batched_tokens`):
  1. decodes of running sequences (1 token each, oldest first); a decode short of KV blocks preempts
     the NEWEST running sequence (its blocks freed, back to the FRONT of waiting, recomputed later
     with its generated tokens treated as prompt);
  2. unfinished (chunked) prefills of running sequences;
  3. waiting sequences FCFS while the seq cap, the token budget and the block pool allow. A prompt
     chunk takes only what the budget has left, so long prompts never stall decodes.
Blocks for all known tokens are allocated at admission, so only decodes ever need new blocks.

n > 1: the engine adds n sibling sequences with the same prompt. A sibling is not admitted while
another sibling is still prefilling the shared prompt, so once admitted it hits that sibling's full
prompt blocks in the prefix cache: one prefill serves all n, except the partial last block (and the
last prompt token), which each sibling recomputes. No copy-on-write is needed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from malora_runtime.config import EngineConfig
from malora_runtime.engine.kv_cache import BlockManager
from malora_runtime.engine.sequence import Sequence, SequenceStatus, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # compute tokens [start, end) of seq.token_ids this step
    end: int
    sample: bool  # the chunk reaches the last known token: the runner samples from its logits

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """Rows of the sampler's batch, in the order `postprocess` expects their tokens."""
        return [s.seq for s in self.scheduled if s.sample]


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int,
                 eos_token_ids: Iterable[int] = ()) -> None:
        """`config`: the engine's limits (max_num_seqs, max_num_batched_tokens, block_size, prefix caching,
        chunked prefill); `max_model_len`: the longest sequence, resolved by the engine from the model."""
        self.config = config
        self.max_model_len = max_model_len
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_model_len "
                             f"({max_model_len}) without chunked prefill: a prompt must fit in one step")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        if self.block_manager.blocks_needed(max_model_len) > num_blocks:
            # Guarantees progress: any sequence fits once everything else is preempted.
            raise ValueError(
                f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence "
                f"of max_model_len={max_model_len}"
            )
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first, preemption victims from the end
        self.requests: dict[str, list[Sequence]] = {}
        self.num_preemptions = 0

    # ---- queue management ----
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.max_model_len:
            raise ValueError(f"{seq.seq_id}: {seq.num_tokens} tokens exceed max_model_len")
        self.waiting.append(seq)
        self.requests.setdefault(seq.request_id, []).append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (e.g. the detokenizer found a stop string) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        siblings = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in siblings):
            self.requests.pop(seq.request_id, None)

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = list(self.requests.get(request_id, []))
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (%d tokens)", seq.seq_id, seq.num_tokens)

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """Defer a sibling while another one is still writing the shareable prompt blocks."""
        if not self.config.enable_prefix_caching or seq.num_output_tokens:
            return False
        shared = (seq.num_prompt_tokens - 1) // self.config.block_size * self.config.block_size
        return any(
            s is not seq and s.status is SequenceStatus.RUNNING and s.num_computed_tokens < shared
            for s in self.requests[seq.request_id]
        )

    # ---- the step ----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. decodes, oldest first; make room by preempting from the newest end.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.is_prefill:
                i += 1
                continue
            while not bm.can_extend(seq):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.extend(seq)
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, seq.num_tokens, True))
                budget -= 1
                i += 1

        # 2. unfinished prefills of running sequences.
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefill:
                budget -= self._schedule_prefill(out, seq, budget)

        # 3. admit waiting sequences (not right after a preemption: the pool is known to be short).
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if self._waits_for_sibling(seq):
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens - bm.cached_prefix_len(seq) > budget:
                break  # the whole prompt must fit this step; keep FCFS order
            if not bm.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._schedule_prefill(out, seq, budget)

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _schedule_prefill(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        start = seq.num_computed_tokens
        end = start + min(seq.num_uncomputed, budget)
        out.scheduled.append(ScheduledSeq(seq, start, end, end == seq.num_tokens))
        return end - start

    # ---- after the forward ----
    def postprocess(
        self,
        out: SchedulerOutput,
        sampled_token_ids: list[int] | torch.Tensor,
        logprobs: list[TokenLogprobs | None] | None = None,
    ) -> list[Sequence]:
        """Advance KV progress, append sampled tokens (one per `out.sampled_seqs`, same order).

        Returns the sequences that finished this step (EOS / stop_token_ids / max_tokens /
        max_model_len); their blocks are already freed.
        """
        if isinstance(sampled_token_ids, torch.Tensor):
            sampled_token_ids = sampled_token_ids.tolist()
        tokens = iter(sampled_token_ids)
        lps = iter(logprobs) if logprobs is not None else None
        finished: list[Sequence] = []
        for sched in out.scheduled:
            seq = sched.seq
            token = next(tokens) if sched.sample else None
            lp = next(lps) if sched.sample and lps is not None else None
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens = sched.end
            self.block_manager.commit_computed(seq)
            if token is None:
                continue
            seq.append_token(token, lp)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling_params
        # The first min_tokens outputs never stop the sequence (the sampler also masks them).
        if seq.num_output_tokens > params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        ):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
