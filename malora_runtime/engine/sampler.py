"""Batched sampling with per-row settings.

Semantics (row i, logits x[i] of shape [V]):
  x = mask(x)          EOS/stop_token_ids -> -inf while num_output < min_tokens (EOS only if not ignore_eos)
  x = x + logit_bias   OpenAI's per-token bias (-100 bans, +100 all but forces)
  x = penalise(x)      repetition (prompt+output: x/p if x > 0 else x*p), then
                       x -= frequency * count_out + presence * (count_out > 0)   (OpenAI)
  x = grammar(x)       tokens the sequence's grammar does not allow next -> -inf (engine.structured)
  logprobs = log_softmax(x)            # "processed" logprobs: after penalties, BEFORE temperature/filters
  greedy:  token = argmax(x)           # ties -> lowest id
  random:  x /= T; top_k; top_p; min_p; p = softmax(x); token = argmax(p / q), q ~ Exp(1)
Exponential-race sampling draws q from the sequence's own generator when seeded, so a seeded row
samples the same tokens whatever else is in the batch. Rows only pay for the features they use: an
all-greedy batch without penalties, min_tokens, logit_bias, grammars or logprobs is a single argmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from malora_runtime.engine.sequence import Sequence, TokenLogprobs
from malora_runtime.engine.structured import GrammarMask


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, sampled token's logprob; None if no row asked
    top_token_ids: torch.Tensor | None = None  # [B, K] int64, K = max requested alternatives
    top_logprobs: torch.Tensor | None = None  # [B, K] float32

    def token_logprobs(self, seqs: list[Sequence]) -> list[TokenLogprobs | None]:
        """Per-row records for `Scheduler.postprocess` (None for rows that did not ask)."""
        if self.logprobs is None:
            return [None] * len(seqs)
        ids, lps = self.token_ids.tolist(), self.logprobs.tolist()
        top_ids = self.top_token_ids.tolist() if self.top_token_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        result: list[TokenLogprobs | None] = []
        for i, seq in enumerate(seqs):
            k = seq.sampling_params.logprobs
            if k is None:
                result.append(None)
                continue
            # Tokens a grammar or a ban masked have logprob -inf: not alternatives, left out.
            top = [(t, v) for t, v in zip(top_ids[i][:k], top_lps[i][:k]) if v != -math.inf] if k and top_ids else []
            result.append(TokenLogprobs(ids[i], lps[i], top))
        return result


def first_max(x: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first maximum (as argmax): `max(dim)` returns the same index, measured 2.5x faster
    than `argmax` on [32, 49152] float32 rows here (0.44 vs 1.1 ms)."""
    return x.max(dim=-1).indices


class Sampler:
    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.grammar_mask = GrammarMask()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V] for the rows of `seqs` (one sampled token each). Does not modify `logits`."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        params = [s.sampling_params for s in seqs]
        x = logits.float()
        copied = x is not logits

        def writable() -> torch.Tensor:
            nonlocal x, copied
            if not copied:
                x, copied = x.clone(), True
            return x

        self._mask_min_tokens(writable, seqs)
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if bias_rows:
            self._apply_logit_bias(writable(), params, bias_rows)
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            self._apply_penalties(writable(), seqs, pen_rows)
        if any(s.matcher is not None for s in seqs):
            self.grammar_mask(writable(), [s.matcher for s in seqs])

        out = SamplerOutput(token_ids=first_max(x))
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if rand_rows:
            out.token_ids[rand_rows] = self._sample(x[rand_rows], [seqs[i] for i in rand_rows])

        max_k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if max_k is not None:
            lp = torch.log_softmax(x, dim=-1)
            out.logprobs = lp.gather(1, out.token_ids[:, None]).squeeze(1)
            if max_k > 0:
                out.top_logprobs, out.top_token_ids = lp.topk(max_k, dim=-1)
        return out

    def _mask_min_tokens(self, writable: Callable[[], torch.Tensor], seqs: list[Sequence]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, seq in enumerate(seqs):
            p = seq.sampling_params
            if seq.num_output_tokens >= p.min_tokens:
                continue
            banned = p.stop_token_ids if p.ignore_eos else [*p.stop_token_ids, *self.eos_token_ids]
            rows += [i] * len(banned)
            cols += banned
        if rows:
            x = writable()
            x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")

    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, params: list, rows: list[int]) -> None:
        row_ids = [i for i in rows for _ in params[i].logit_bias]
        token_ids = [t for i in rows for t in params[i].logit_bias]
        bias = [b for i in rows for b in params[i].logit_bias.values()]
        x.index_put_((torch.tensor(row_ids, device=x.device), torch.tensor(token_ids, device=x.device)),
                     torch.tensor(bias, dtype=x.dtype, device=x.device), accumulate=True)

    @staticmethod
    def _apply_penalties(x: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        dev, vocab = x.device, x.shape[1]
        rep = torch.tensor([seqs[i].sampling_params.repetition_penalty for i in rows], device=dev)
        freq = torch.tensor([seqs[i].sampling_params.frequency_penalty for i in rows], device=dev)
        pres = torch.tensor([seqs[i].sampling_params.presence_penalty for i in rows], device=dev)
        # Output token counts [R, V], built sparsely from each sequence's running dict.
        counts = torch.zeros(len(rows), vocab, device=dev)
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=dev)  # prompt + output tokens
        for r, i in enumerate(rows):
            seq = seqs[i]
            if seq.output_counts:
                ids = torch.tensor(list(seq.output_counts.keys()), device=dev)
                counts[r, ids] = torch.tensor(list(seq.output_counts.values()), dtype=torch.float, device=dev)
            if seq.sampling_params.repetition_penalty != 1.0:
                seen[r, seq.prompt_unique_ids().to(dev)] = True
        seen |= counts > 0
        sub = x[rows]
        penalised = torch.where(sub > 0, sub / rep[:, None], sub * rep[:, None])
        sub = torch.where(seen, penalised, sub)
        sub -= freq[:, None] * counts + pres[:, None] * (counts > 0).float()
        x[rows] = sub

    @staticmethod
    def _sample(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """x: [R, V] processed logits of the non-greedy rows -> [R] sampled ids."""
        params = [s.sampling_params for s in seqs]
        dev, vocab = x.device, x.shape[1]
        x = x / torch.tensor([p.temperature for p in params], device=dev)[:, None]

        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_x, order = x.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev)[None, :]
            drop = ranks >= torch.tensor(top_k, device=dev)[:, None]
            sorted_p = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)  # top-p after top-k
            # Drop a token once the mass strictly before it reaches top_p (top_p > 0: the best one stays).
            drop |= (sorted_p.cumsum(dim=-1) - sorted_p) >= torch.tensor(top_p, device=dev)[:, None]
            x = x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))

        probs = x.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            floor = torch.tensor(min_p, device=dev)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)

        q = torch.empty_like(probs)
        unseeded = [r for r, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), vocab, device=dev).exponential_()
        for r, seq in enumerate(seqs):
            if seq.generator is not None:  # CPU stream per sequence: reproducible on any device
                q[r] = torch.empty(vocab).exponential_(generator=seq.generator).to(dev)
        return first_max(probs / q.clamp_min_(torch.finfo(q.dtype).tiny))
