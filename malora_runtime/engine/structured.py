"""Grammar-constrained decoding, per sequence, inside the batched sampler (llguidance).

A request may carry a grammar (`SamplingParams.grammar`: llguidance's grammar text, built here from a JSON schema,
a regex, a list of choices or a Lark/GBNF grammar); each of its sequences gets its own matcher. Before sampling,
every constrained row's logits are masked to the tokens its grammar allows next (one bitmask for the batch, the
rows filled in parallel by llguidance's executor); after sampling, each matcher consumes its sequence's token.
When a grammar is complete only EOS remains allowed, so the sequence ends with finish reason "stop". Rows without a
grammar are untouched.

Compiling a grammar against the tokenizer (`Grammars.prepare`) runs on the caller's thread, never the engine's:
the server prepares a request's grammar in a worker thread before admitting it, so a request whose grammar is
still compiling waits without stalling the batch. Prepared grammars are cached (LRU); the engine gives each
sequence a copy of the prepared matcher (~13 us).

Why llguidance: a Rust library with Python bindings and no dependencies, built for exactly this, one of vLLM's
and SGLang's backends. Measured here against xgrammar (scripts/grammar-mask-time.py, the default model's
tokenizer, a 52-token JSON document, three runs each): per token, fill + unpack + mask as the sampler runs it,
p50 78-102 us vs 191-197 us (xgrammar's own C++ apply); schema compile 1.4-2.4 ms vs 10.3-12.9 ms.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_GRAMMAR_SOURCE_CHARS = 64 * 1024
"""The largest schema (as JSON), regex or grammar text a request may give; larger ones are refused before any
compile (llguidance's own limits bound the rest: grammar size, lexer states, work per token)."""
MAX_CHOICES = 1024
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile, or one too large; the message names why."""


def _bounded(source: str, what: str) -> str:
    if len(source) > MAX_GRAMMAR_SOURCE_CHARS:
        raise GrammarError(f"the {what} is {len(source)} characters; at most {MAX_GRAMMAR_SOURCE_CHARS}")
    return source


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, source: str) -> str:
    import llguidance

    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(source))
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        elif kind == "lark":
            grammar = llguidance.grammar_from("grammar", source)  # Lark, or GBNF (llama.cpp's) converted
        else:
            raise AssertionError(kind)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except GrammarError:
        raise
    except Exception as exc:  # llguidance rejects the source itself
        raise GrammarError(str(exc)) from None
    if error:
        raise GrammarError(error)
    return grammar


COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON layout unless a schema sets its own `x-guidance`: one line, fixed separators. With flexible
whitespace the default model broke lines mid-value and could spend its tokens on blank space."""


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    return schema if "x-guidance" in schema else {**schema, "x-guidance": COMPACT_JSON}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema, built and checked once per distinct schema (cached)."""
    # Not sort_keys: the order of "properties" is the order the output writes them in.
    return _grammar("json_schema", _bounded(json.dumps(compact(schema)), "schema"))


def regex_grammar(pattern: str) -> str:
    """Output matching `pattern` in full (Rust regex syntax, as llguidance reads it)."""
    return _grammar("regex", _bounded(pattern, "regex"))


def choice_grammar(choices: Sequence[str]) -> str:
    """Output that is exactly one of `choices`."""
    if not choices or len(choices) > MAX_CHOICES:
        raise GrammarError(f"give between 1 and {MAX_CHOICES} choices, got {len(choices)}")
    if any(not isinstance(c, str) or not c for c in choices):
        raise GrammarError("choices must be non-empty strings")
    return lark_grammar("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def lark_grammar(text: str, max_chars: int = MAX_GRAMMAR_SOURCE_CHARS) -> str:
    """A Lark grammar (llguidance's dialect, which embeds JSON schemas as `%json {...}`) or a GBNF grammar."""
    if len(text) > max_chars:
        raise GrammarError(f"the grammar is {len(text)} characters; at most {max_chars}")
    return _grammar("lark", text)


class Grammars:
    """The tokenizer's llguidance view and prepared matchers by grammar (LRU).

    `prepare` and `matcher` may be called from any thread."""

    def __init__(self, tokenizer, cache_size: int = 256) -> None:
        self.hf_tokenizer = tokenizer
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer = None
        self._prepared: OrderedDict[str, Any] = OrderedDict()

    @property
    def ll_tokenizer(self):
        """Built on first use (0.35 s for the default model's tokenizer): by `prepare`, off the engine thread."""
        with self._tokenizer_lock:  # not self._lock: the engine thread takes that one for a copy meanwhile
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer)
            return self._ll_tokenizer

    def prepare(self, grammar: str) -> float:
        """Compile `grammar` against the tokenizer unless it is cached; the seconds it took (0.0 when cached).
        Raises GrammarError naming why it cannot be used."""
        with self._lock:
            if grammar in self._prepared:
                self._prepared.move_to_end(grammar)
                return 0.0
        started = time.perf_counter()
        matcher = self._compile(grammar)
        with self._lock:
            self._prepared[grammar] = matcher
            while len(self._prepared) > self.cache_size:
                self._prepared.popitem(last=False)
        return time.perf_counter() - started

    def _compile(self, grammar: str):
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def matcher(self, grammar: str):
        """A fresh matcher at the start of `grammar`: a copy of the prepared one, else prepared now (once, then
        cached: only when the LRU evicted it between the server's prepare and the request's admission)."""
        with self._lock:
            prepared = self._prepared.get(grammar)
        if prepared is None:
            self.prepare(grammar)
            with self._lock:
                prepared = self._prepared.get(grammar)
            if prepared is None:  # evicted again at once (a cache of size 0): use a fresh compile
                return self._compile(grammar)
        return prepared.deep_copy()


class GrammarMask:
    """Masks the constrained rows of a batch's logits.

    The engine calls `start` with the step's sampled rows before the forward: their matchers are final then (each
    consumed its last token at the end of the previous step), so their bitmask is filled in a worker thread while
    the model runs (llguidance releases the GIL), and the sampler only applies it. Filling took ~4 ms a step at 32
    rows of a JSON schema here, 7% of the step, when it ran after the forward. `seconds` accumulates the engine
    thread's own time on masks, waiting included (for metrics)."""

    def __init__(self) -> None:
        self._ll_executor = None
        self._worker: ThreadPoolExecutor | None = None
        self._pending: _PendingMask | None = None
        self.seconds = 0.0

    def start(self, matchers: list, vocab: int) -> None:
        """Begin filling the bitmask of the rows whose matcher is not None."""
        self.settle()
        live = [m for m in matchers if m is not None]
        if not live:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        bitmask = np.empty((len(live), (vocab + 31) // 32), dtype=np.int32)
        future = self._worker.submit(self._fill, live, bitmask)
        self._pending = _PendingMask({id(m): j for j, m in enumerate(live)}, bitmask, future)

    def settle(self) -> None:
        """Wait for a fill in flight: no matcher may consume a token while its mask is being computed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.future.result()

    def _fill(self, matchers: list, bitmask: np.ndarray) -> None:
        import llguidance

        if self._ll_executor is None:
            self._ll_executor = llguidance.LLExecutor(max(1, torch.get_num_threads()))
        self._ll_executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.ctypes.data,
                                                  bitmask.shape[1] * 4, len(matchers))

    def _bitmask(self, matchers: list, words: int) -> np.ndarray:
        """The rows of `matchers`, from the fill started for them, else filled now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.future.result()
            if pending.bitmask.shape[1] == words and all(id(m) in pending.rows for m in matchers):
                return pending.bitmask[[pending.rows[id(m)] for m in matchers]]
        bitmask = np.empty((len(matchers), words), dtype=np.int32)
        self._fill(matchers, bitmask)
        return bitmask

    def __call__(self, x: torch.Tensor, matchers: list) -> None:
        """x [B, V] float32, in place: rows whose matcher is not None keep only the tokens it allows.

        Each matcher writes its row of a bitmask (bit j of int32 word w: token 32 w + j), the rows filled in
        parallel by llguidance's executor, unpacked with numpy. Not llguidance.torch's helpers: importing that
        module took 1.3 s (torch.compile's machinery) and its apply is a torch.compile'd function whose first call
        compiled for 2.2 s, both on the engine thread."""
        started = time.perf_counter()
        rows = [i for i, m in enumerate(matchers) if m is not None]
        vocab = x.shape[1]
        bitmask = self._bitmask([matchers[i] for i in rows], (vocab + 31) // 32)
        # Little-endian words: byte 4 w + k holds tokens 32 w + 8 k .. + 7, lowest bit first. Inverting the words
        # first unpacks straight to the banned tokens, as 0/1 bytes that torch reads as bool without a copy.
        banned = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        banned_rows = torch.from_numpy(banned).view(torch.bool).to(x.device)
        if len(rows) == x.shape[0]:  # every row constrained: in place (0.45 vs 1.7 ms at 32 x 49152 here)
            x.masked_fill_(banned_rows, float("-inf"))
        else:
            index = torch.tensor(rows, device=x.device)
            x[index] = x[index].masked_fill_(banned_rows, float("-inf"))
        self.seconds += time.perf_counter() - started


@dataclass
class _PendingMask:
    rows: dict[int, int]  # id(matcher) -> its row of bitmask
    bitmask: np.ndarray
    future: Future
