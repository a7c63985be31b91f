"""The grammar mask of constrained rows (engine/structured.py) against llguidance's own bitmask, bit by bit;
rows without a grammar untouched."""

from __future__ import annotations

import llguidance.torch as llt
import pytest
import torch

from malora_runtime.engine.structured import GrammarError, GrammarMask, Grammars, json_schema_grammar


def test_the_mask_keeps_exactly_the_allowed_tokens(tokenizer):
    grammars = Grammars(tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = json_schema_grammar(schema)
    matchers = [None, grammars.matcher(grammar), None, grammars.matcher(grammar)]
    assert matchers[3].consume_token(tokenizer('{"n', add_special_tokens=False)["input_ids"][0])
    vocab = len(tokenizer)
    x = torch.randn(4, vocab)
    before = x.clone()
    GrammarMask()(x, matchers)
    assert torch.equal(x[0], before[0]) and torch.equal(x[2], before[2])
    for row in (1, 3):
        reference = llt.allocate_token_bitmask(1, vocab)
        llt.fill_next_token_bitmask(matchers[row], reference, 0)
        words = reference[0].tolist()
        allowed = torch.tensor([(words[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab)])
        assert 0 < int(allowed.sum()) < vocab
        assert torch.equal(torch.isinf(x[row]), ~allowed)
        assert torch.equal(x[row][allowed], before[row][allowed])
    every = before[[1, 3]].clone()  # every row constrained: the in-place path
    GrammarMask()(every, [matchers[1], matchers[3]])
    assert torch.equal(every, x[[1, 3]])


def test_a_schema_llguidance_cannot_compile_is_a_grammar_error():
    with pytest.raises(GrammarError, match="wat"):
        json_schema_grammar({"properties": {"a": {"type": "wat"}}})


def test_a_prepared_grammar_is_compiled_once_and_each_sequence_gets_its_own_matcher(tokenizer):
    grammars = Grammars(tokenizer, cache_size=2)
    grammar = json_schema_grammar({"type": "array", "items": {"type": "integer"}})
    assert grammars.prepare(grammar) > 0 and grammars.prepare(grammar) == 0.0
    first, second = grammars.matcher(grammar), grammars.matcher(grammar)
    assert first.consume_token(tokenizer("[", add_special_tokens=False)["input_ids"][0])
    bracket = tokenizer("[", add_special_tokens=False)["input_ids"][0]
    assert second.consume_token(bracket)  # untouched by the first one's token
    others = [json_schema_grammar({"const": i}) for i in range(3)]
    for other in others:
        grammars.prepare(other)
    assert grammars.prepare(grammar) > 0  # evicted by the LRU bound, compiled again


def test_choice_regex_and_grammar_sources_compile_or_name_why():
    from malora_runtime.engine.structured import MAX_GRAMMAR_SOURCE_CHARS, choice_grammar, lark_grammar, regex_grammar

    assert choice_grammar(["a", 'b "quoted"', "ünïcode"]) and regex_grammar(r"\d+") and lark_grammar('root ::= "x"')
    for build, source, reason in ((regex_grammar, "((", "regex"), (lark_grammar, "start: nope", "nope"),
                                  (choice_grammar, [], "choices"), (choice_grammar, [""], "non-empty"),
                                  (regex_grammar, "a" * (MAX_GRAMMAR_SOURCE_CHARS + 1), "at most")):
        with pytest.raises(GrammarError, match=reason):
            build(source)


def test_a_mask_filled_during_the_forward_equals_one_filled_after(tokenizer):
    """`start` fills the rows' bitmask in a worker thread; the sampler's call then uses it, for all of the rows
    or (a request failed in the forward) some of them, and fills afresh for rows it was not started for."""
    grammars = Grammars(tokenizer)
    grammar = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    matchers = [grammars.matcher(grammar) for _ in range(3)]
    assert matchers[1].consume_token(tokenizer('{"n', add_special_tokens=False)["input_ids"][0])
    vocab = len(tokenizer)
    logits = torch.randn(3, vocab)
    reference = logits.clone()
    GrammarMask()(reference, matchers)
    for rows in ([0, 1, 2], [1, 2], [2]):
        mask = GrammarMask()
        mask.start(matchers, vocab)
        x = logits[rows].clone()
        mask(x, [matchers[i] for i in rows])
        assert torch.equal(x, reference[rows])
    late = GrammarMask()
    late.start(matchers[:1], vocab)
    x = logits.clone()
    late(x, matchers)  # rows it was not started for: filled now
    assert torch.equal(x, reference)
