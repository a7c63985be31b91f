"""The model runner's packed, paged forward equals transformers' own forward (tiny model, fast)."""

from __future__ import annotations

import torch

from malora_runtime.config import EngineConfig
from malora_runtime.engine.model_runner import Chunk, ModelRunner
from tests.conftest import make_tiny_llama


def reference_last_logits(tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return make_tiny_llama()(torch.tensor([tokens])).logits[0, -1]


def test_chunked_prefill_and_decode_across_scattered_blocks_match_transformers() -> None:
    runner = ModelRunner(make_tiny_llama(), EngineConfig(block_size=4, num_kv_blocks=16))
    first = [5, 9, 11, 3, 7, 8, 100, 42, 17, 250, 1]
    second = [1, 2, 3, 4, 5]
    # Blocks deliberately out of order and interleaved between the two sequences.
    table_a, table_b = [7, 2, 12], [5, 0]
    logits = runner.run([Chunk(first[:6], 0, table_a, -1, False), Chunk(second, 0, table_b, -1, True)])
    torch.testing.assert_close(logits[0], reference_last_logits(second), rtol=1e-5, atol=1e-5)
    # The rest of the long prompt as a chunk over cached context, plus a decode of the short one.
    logits = runner.run([Chunk(first[6:], 6, table_a, -1, True), Chunk([77], 5, table_b, -1, True)])
    torch.testing.assert_close(logits[0], reference_last_logits(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], reference_last_logits(second + [77]), rtol=1e-5, atol=1e-5)
    # Two decodes of different context lengths in one step.
    logits = runner.run([Chunk([33], 11, table_a, -1, True), Chunk([34], 6, table_b, -1, True)])
    torch.testing.assert_close(logits[0], reference_last_logits(first + [33]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], reference_last_logits(second + [77, 34]), rtol=1e-5, atol=1e-5)
