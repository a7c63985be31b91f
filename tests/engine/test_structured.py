"""The grammar mask of constrained rows (engine/structured.py) against llguidance's own bitmask, bit by bit;
rows without a grammar untouched."""

from __future__ import annotations

import llguidance.torch as llt
import pytest
import torch

from malora_runtime.engine.structured import GrammarError, Grammars, json_schema_grammar


def test_the_mask_keeps_exactly_the_allowed_tokens(tokenizer):
    grammars = Grammars(tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = json_schema_grammar(schema)
    matchers = [None, grammars.matcher(grammar), None, grammars.matcher(grammar)]
    assert matchers[3].consume_token(tokenizer('{"n', add_special_tokens=False)["input_ids"][0])
    vocab = len(tokenizer)
    x = torch.randn(4, vocab)
    before = x.clone()
    Grammars.mask(x, matchers)
    assert torch.equal(x[0], before[0]) and torch.equal(x[2], before[2])
    for row in (1, 3):
        reference = llt.allocate_token_bitmask(1, vocab)
        llt.fill_next_token_bitmask(matchers[row], reference, 0)
        words = reference[0].tolist()
        allowed = torch.tensor([(words[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab)])
        assert 0 < int(allowed.sum()) < vocab
        assert torch.equal(torch.isinf(x[row]), ~allowed)
        assert torch.equal(x[row][allowed], before[row][allowed])


def test_a_schema_llguidance_cannot_compile_is_a_grammar_error():
    with pytest.raises(GrammarError, match="wat"):
        json_schema_grammar({"properties": {"a": {"type": "wat"}}})
