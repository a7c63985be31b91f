"""The synchronous engine core: requests in, one `step()` at a time, outputs out.

step() = schedule -> run the model on the packed batch -> sample -> postprocess -> detokenise.
It is not thread-safe: `AsyncEngine` calls it from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.format import MaloraAdapter
from ..config import EngineConfig
from ..cpu_features import cpu_features
from ..sampling_params import SamplingParams
from .adapter_slots import NoFreeSlotError
from .detokenizer import IncrementalDetokenizer
from .errors import EngineRequestError, PromptTooLongError, UnknownAdapterError
from .model_runner import Chunk, ModelRunner
from .outputs import AdapterActivity, CompletionOutput, EngineStats, RequestOutput, ResidentAdapter
from .sampler import Sampler
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, TokenLogprobs
from .structured import Grammars

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    num_logprobs_sent: list[int]
    adapter_slot: int
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None


@dataclass
class StepLogits:
    """Logits of a step's sampling rows: one tensor when the forward ran whole, else one row per item
    (None for items whose request failed)."""

    tensor: torch.Tensor | None  # [rows, V]
    rows: list[torch.Tensor | None] | None

    @classmethod
    def join(cls, first: StepLogits, second: StepLogits) -> StepLogits:
        return cls(None, first.as_rows() + second.as_rows())

    def as_rows(self) -> list[torch.Tensor | None]:
        return list(self.tensor) if self.rows is None else self.rows

    def select(self, indices: list[int]) -> torch.Tensor:
        if self.rows is None:
            assert self.tensor is not None
            return self.tensor if len(indices) == self.tensor.shape[0] else self.tensor[indices]
        return torch.stack([self.rows[i] for i in indices])


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig, model_name: str = "model") -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.config = config
        self.runner = ModelRunner(model, config)
        context_len = getattr(model.config, "max_position_embeddings", None) or 2048
        pool_len = self.runner.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or context_len, context_len)
        if config.max_model_len is None and pool_len < self.max_model_len:
            # Without an explicit limit, serve what the KV pool can hold for one sequence.
            log.warning("max_model_len lowered from %d to %d to fit the KV pool", self.max_model_len, pool_len)
            self.max_model_len = pool_len
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.scheduler = Scheduler(config, self.runner.num_blocks, self.max_model_len, self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.grammars = Grammars(tokenizer)
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self.last_step_tokens = 0  # tokens computed in the last step (prefill chunks + decodes)
        self.last_step_seqs = 0  # sequences in the last step
        self.last_step_mask_seconds = 0.0  # grammar masks in the last step
        self.last_step_constrained = 0  # sampled rows with a grammar in the last step

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from ..models.loader import load_model

        log.info("serving in %s: %s", config.dtype, config.dtype_reason)
        if torch.device(config.device).type == "cpu":
            log.info("CPU instruction set for the native kernels: %s", cpu_features().describe())
        model, tokenizer, source = load_model(config.model, dtype=config.torch_dtype, device=config.device,
                                              quantization=config.quantization)
        return cls(model, tokenizer, config, source.name)

    # ---- adapters ----
    def add_adapter(self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False) -> int:
        """Make `adapter` the version of `name` that new requests get; returns its slot.

        Requests already running on an older version finish on it. Raises `NoFreeSlotError` when
        every slot holds an adapter in use or pinned.
        """
        try:
            slot, dropped = self.runner.adapters.activate(name, adapter, version, pinned)
        except NoFreeSlotError as exc:  # it may have evicted idle adapters before giving up
            self._drop_cache_keys(exc.dropped_cache_keys)
            raise
        self._drop_cache_keys(dropped)
        return slot

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; running ones finish first."""
        self._drop_cache_keys(self.runner.adapters.deactivate(name))

    def resident_adapters(self) -> dict[str, ResidentAdapter]:
        """The current version of every adapter in a slot (a snapshot, safe to read from another thread)."""
        slots = self.runner.adapters
        resident = {}
        for name, slot in list(slots.current.items()):
            state = slots.slots[slot]
            if state is not None:
                resident[name] = ResidentAdapter(name, state.version, slot, state.adapter.config, state.pinned)
        return resident

    def _drop_cache_keys(self, keys: list[int]) -> None:
        for key in keys:
            self.scheduler.block_manager.drop_adapter(key)

    # ---- requests ----
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]

    def check_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        """Raise an `EngineRequestError` for anything that would make the request unservable."""
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {params.max_tokens}"
            )
        vocab = self.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EngineRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise EngineRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise EngineRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if adapter is not None and adapter not in self.runner.adapters.current:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None) -> list[int]:
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params, adapter)
        slot, cache_key = self.runner.adapters.acquire(adapter)
        seqs = [Sequence(request_id, prompt_ids, params, seq_index=i, adapter_name=adapter, adapter_slot=slot,
                         cache_key=cache_key) for i in range(params.n)]
        if params.grammar is not None:
            try:
                for seq in seqs:
                    seq.matcher = self.grammars.matcher(params.grammar)
            except Exception:
                self.runner.adapters.release(slot)
                raise
        detoks = [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop) for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt_ids, seqs, detoks, [0] * len(seqs), slot)
        for seq in seqs:
            self.scheduler.add(seq)
        return prompt_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        self._drop_cache_keys(self.runner.adapters.release(request.adapter_slot))
        outputs = [CompletionOutput(i, d.flush(), [], None, "abort", None, s.num_output_tokens)
                   for i, (s, d) in enumerate(zip(request.seqs, request.detokenizers))]
        return RequestOutput(request_id, request.prompt_token_ids, outputs, finished=True,
                             arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one step. A request whose part of the step fails (the forward raises for its tokens, its
        logits are NaN or inf, or sampling it raises) is failed alone: its output carries `error` and
        every other request of the step goes on with the tokens it would have had."""
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        now = time.monotonic()
        for s in scheduled.scheduled:
            request = self.requests.get(s.seq.request_id)
            if request is not None and request.first_scheduled_time is None:
                request.first_scheduled_time = now
        self.last_step_tokens = scheduled.num_batched_tokens
        self.last_step_seqs = len(scheduled.scheduled)
        failed: dict[str, str] = {}
        sampled_seqs = scheduled.sampled_seqs
        mask = self.sampler.grammar_mask
        if any(s.matcher is not None for s in sampled_seqs):  # filled while the forward runs
            mask.start([s.matcher for s in sampled_seqs], self.runner.model.config.vocab_size)
        rows = self._forward(scheduled.scheduled, failed)
        mask_before = mask.seconds
        token_ids, logprobs = self._sample(rows, sampled_seqs, failed)
        self.last_step_mask_seconds = self.sampler.grammar_mask.seconds - mask_before
        self.last_step_constrained = sum(s.matcher is not None for s in sampled_seqs)
        failures = [self._fail(request_id, message) for request_id, message in failed.items()]
        # Rows of failed requests carry placeholders: their sequences are finished, postprocess skips them.
        self.scheduler.postprocess(scheduled, [t if t is not None else 0 for t in token_ids], logprobs)
        self.num_steps += 1
        return [f for f in failures if f is not None] + self._collect(sampled_seqs)

    def _forward(self, items: list[ScheduledSeq], failed: dict[str, str]) -> StepLogits:
        """The logits of the sampling items among `items`, in order.

        A forward that raises is re-run in halves until each item that makes it fail runs alone; only
        those requests fail (re-running rewrites the same K/V, so the others are unaffected)."""
        try:
            logits = self.runner.run([Chunk(s.seq.token_ids[s.start:s.end], s.start, s.seq.block_table,
                                            s.seq.adapter_slot, s.sample, prompt=s.end <= s.seq.num_prompt_tokens)
                                      for s in items])
        except Exception as exc:
            if len(items) == 1:
                request_id = items[0].seq.request_id
                log.error("request %s failed in the model's forward", request_id, exc_info=exc)
                failed.setdefault(request_id, f"the engine failed while running this request ({type(exc).__name__})")
                return StepLogits(None, [None] if items[0].sample else [])
            half = len(items) // 2
            return StepLogits.join(self._forward(items[:half], failed), self._forward(items[half:], failed))
        sampling = [s for s in items if s.sample]
        # A NaN or infinity anywhere in a row makes the row's sum non-finite: one pass (0.17 ms at 32 x 49152 here,
        # isfinite().all() 2.2 ms); only then the exact check, since a huge finite row can also overflow its sum.
        finite = torch.isfinite(logits.sum(dim=-1))
        if not bool(finite.all()):
            finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):
            for item, ok in zip(sampling, finite.tolist()):
                if not ok:
                    log.error("request %s: non-finite logits", item.seq.request_id)
                    failed.setdefault(item.seq.request_id, "the model produced NaN or infinite logits for this "
                                      "request (is its adapter's output finite?)")
        return StepLogits(logits, None)

    def _sample(self, rows: StepLogits, seqs: list[Sequence], failed: dict[str, str]
                ) -> tuple[list[int | None], list[TokenLogprobs | None]]:
        """A token (and logprobs) per sampled sequence; None for those of failed requests."""
        keep = [i for i, seq in enumerate(seqs) if seq.request_id not in failed]
        token_ids: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if not keep:
            return token_ids, logprobs
        groups = [keep]
        try:
            sampled = self.sampler(rows.select(keep), [seqs[i] for i in keep])
        except Exception:  # find the rows that fail on their own
            groups, sampled = [[i] for i in keep], None
        for group in groups:
            group_seqs = [seqs[i] for i in group]
            try:
                out = sampled if sampled is not None else self.sampler(rows.select(group), group_seqs)
            except Exception as exc:
                log.error("request %s failed in the sampler", group_seqs[0].request_id, exc_info=exc)
                failed.setdefault(group_seqs[0].request_id, f"sampling failed for this request ({type(exc).__name__})")
                continue
            for i, token, lp in zip(group, out.token_ids.tolist(), out.token_logprobs(group_seqs)):
                token_ids[i], logprobs[i] = token, lp
        self.sampler.grammar_mask.settle()
        for seq, token in zip(seqs, token_ids):
            constrained = seq.matcher is not None and token is not None and token not in self.eos_token_ids
            if constrained and not seq.matcher.consume_token(token):  # the mask allowed it: the grammar's fault
                log.error("request %s: token %d left its grammar: %s", seq.request_id, token, seq.matcher.get_error())
                failed.setdefault(seq.request_id, "the output could not follow the requested format")
        return token_ids, logprobs

    def _fail(self, request_id: str, message: str) -> RequestOutput | None:
        """End `request_id` with an error. Its own K/V blocks are zeroed and dropped from the prefix cache,
        so no NaN it may have written is ever read again (padding reads block 0 with weight 0, and
        0 x NaN is NaN)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        bm = self.scheduler.block_manager
        private = [b for seq in request.seqs for b in seq.block_table if bm.blocks[b].ref_count == 1]
        bm.forget(private)
        self.runner.clear_kv_blocks(private)
        output = self.abort(request_id)
        assert output is not None
        output.outputs, output.error = [], message
        return output

    def _collect(self, seqs: list[Sequence]) -> list[RequestOutput]:
        by_request: dict[str, RequestOutput] = {}
        for seq in seqs:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            i = seq.seq_index
            detok = request.detokenizers[i]
            token = seq.token_ids[-1]
            text = detok.step([token])
            stop_reason: str | int | None = None
            if detok.stopped and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
                stop_reason = detok.stopped_by
            elif seq.is_finished:
                text += detok.flush()
                if seq.finish_reason == "stop":
                    stop_reason = token
            elif detok.stopped:
                stop_reason = detok.stopped_by
            logprobs = None
            if seq.sampling_params.logprobs is not None:
                logprobs = seq.output_logprobs[request.num_logprobs_sent[i]:]
                request.num_logprobs_sent[i] = len(seq.output_logprobs)
            out = by_request.setdefault(seq.request_id, RequestOutput(
                seq.request_id, request.prompt_token_ids, num_cached_tokens=seq.num_cached_tokens,
                arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time))
            out.outputs.append(CompletionOutput(i, text, [token], logprobs, seq.finish_reason, stop_reason,
                                                seq.num_output_tokens))
        for request_id, out in by_request.items():
            request = self.requests[request_id]
            if all(s.is_finished for s in request.seqs):
                out.finished = True
                del self.requests[request_id]
                self._drop_cache_keys(self.runner.adapters.release(request.adapter_slot))
        return list(by_request.values())

    def adapter_activity(self) -> AdapterActivity:
        """The adapters of running and of waiting sequences (a snapshot, safe to read from another thread: copying
        the scheduler's queues into tuples runs in C, under the GIL, never while the engine thread moves a sequence)."""
        running = {seq.adapter_name for seq in tuple(self.scheduler.running) if seq.adapter_name is not None}
        waiting = {seq.adapter_name for seq in tuple(self.scheduler.waiting) if seq.adapter_name is not None}
        return AdapterActivity(tuple(sorted(running)), tuple(sorted(waiting)))

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_blocks - bm.num_free_blocks, kv_blocks_total=bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, prefix_cache_hits=bm.prefix_cache_hits,
            prefix_cache_queries=bm.prefix_cache_queries, num_adapter_evictions=self.runner.adapters.num_evictions,
            adapter_slot_bytes=self.runner.adapters.active_bytes, adapter_slot_budget=self.config.adapter_bank_memory,
            adapter_device_copy_bytes=self.runner.adapters.device_copy_bytes,
            num_adapter_activations=self.runner.adapters.num_activations,
        )
