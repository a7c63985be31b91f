"""Mask time per token of the two constrained-decoding libraries on this machine, with the default model's
tokenizer: compile a JSON schema, then walk a valid JSON document token by token, filling the next-token bitmask
before each token (what the sampler does per constrained sequence per step) and applying it to a [1, V] row.

    .venv/bin/python scripts/grammar-mask-time.py                   # llguidance (the project's dependency)
    PYTHONPATH=/path/to/xgrammar .venv/bin/python scripts/grammar-mask-time.py   # and xgrammar, if importable
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from malora_runtime.engine.structured import Grammars  # noqa: E402
from malora_runtime.models.loader import materialize, resolve_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                     "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["maths", "poetry", "engines"],
            "address": {"city": "London", "zip": "12345"}}


def llguidance_walk(tokenizer, ids: list[int], vocab: int) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - start
    row, times = torch.zeros(1, vocab), []
    for token in ids:
        start = time.perf_counter()
        Grammars.mask(row, [matcher])  # what the sampler runs: fill the bitmask, unpack it, mask the row
        times.append(time.perf_counter() - start)
        assert matcher.consume_token(token), matcher.get_error()
    return compile_s, times


def xgrammar_walk(tokenizer, ids: list[int], vocab: int) -> tuple[float, list[float]]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask, row, times = xgrammar.allocate_token_bitmask(1, vocab), torch.zeros(1, vocab), []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        xgrammar.apply_token_bitmask_inplace(row, bitmask)
        times.append(time.perf_counter() - start)
        assert matcher.accept_token(token)
    return compile_s, times


def main() -> int:
    tokenizer = AutoTokenizer.from_pretrained(materialize(resolve_model(None)))
    vocab = len(tokenizer)
    ids = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False)["input_ids"]
    walks = {"llguidance": llguidance_walk}
    try:
        import xgrammar  # noqa: F401

        walks["xgrammar"] = xgrammar_walk
    except ImportError:
        sys.stdout.write("xgrammar: not importable here, skipped\n")
    for name, walk in walks.items():
        for run in range(3):
            compile_s, times = walk(tokenizer, ids, vocab)
            us = sorted(t * 1e6 for t in times)
            sys.stdout.write(f"{name} run {run}: compile {compile_s * 1e3:.1f} ms, {len(ids)} tokens, mask+apply "
                             f"per token p50 {statistics.median(us):.0f} us, p90 {us[int(len(us) * 0.9)]:.0f} us, "
                             f"max {us[-1]:.0f} us\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
