"""Incremental detokenisation with stop strings, one `IncrementalDetokenizer` per sequence.

Semantics:
  after every step, (emitted text) + (held back) == tokenizer.decode(output_ids, skip_special_tokens)
  up to characters not yet complete; after `flush()` the emitted text equals it exactly (unless a
  stop string matched: then it is that text truncated right before the stop string).
Decoding uses the usual prefix_offset/read_offset window: decode(ids[prefix:]) minus
decode(ids[prefix:read]), so tokenizers that strip a leading space at the window start stay exact,
and text ending in U+FFFD (an unfinished multi-byte character) is held back until it completes.
Stop strings: text that could still become the start of a stop string is held back, so no part of
a stop string is ever emitted, even when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def decode_incrementally(
    tokenizer: Tokenizer, ids: list[int], prefix_offset: int, read_offset: int, skip_special_tokens: bool
) -> tuple[str, int, int]:
    """New complete text of ids[read_offset:] -> (delta, prefix_offset, read_offset) for the next call."""
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=skip_special_tokens)
    new_text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
        return new_text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: Iterable[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.decoded = ""  # complete characters decoded so far (emitted + held back)
        self.num_emitted = 0  # chars of `decoded` already returned to the caller
        self.stopped_by: str | None = None  # the stop string that matched

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self.decoded[: self.num_emitted]

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Feed the newly sampled token ids; return the text that is now safe to emit.

        After it returns, check `stopped`: the engine then finishes the sequence with reason "stop".
        """
        if self.stopped:
            return ""
        self.token_ids.extend(new_token_ids)
        delta, self.prefix_offset, self.read_offset = decode_incrementally(
            self.tokenizer, self.token_ids, self.prefix_offset, self.read_offset, self.skip_special_tokens
        )
        self.decoded += delta
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended (EOS / length / abort): release everything still held back."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(
            self.token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        head = self.tokenizer.decode(
            self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens
        )
        self.decoded += tail[len(head) :]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = self.num_emitted
        if self.stop:
            # A match can only start in the unemitted part: earlier candidates were held back.
            hits = [(i, s) for s in self.stop if (i := self.decoded.find(s, start)) >= 0]
            if hits:
                pos, self.stopped_by = min(hits)
                self.decoded = self.decoded[:pos]
                self.num_emitted = pos
                return self.decoded[start:pos]
        end = len(self.decoded) if final else len(self.decoded) - self._stop_prefix_len(start)
        self.num_emitted = end
        return self.decoded[start:end]

    def _stop_prefix_len(self, start: int) -> int:
        """Length of the longest unemitted suffix of `decoded` that begins some stop string.

        Only positions holding a stop string's first character are tried (a C-level `find`), so the cost
        per token stays small with many long stop strings."""
        text, end = self.decoded, len(self.decoded)
        best = end  # start of the longest candidate suffix found so far
        for stop in self.stop:
            position = text.find(stop[0], max(start, end - len(stop) + 1), best)
            while position != -1:
                if stop.startswith(text[position:]):
                    best = position
                    break
                position = text.find(stop[0], position + 1, best)
        return end - best
