"""bfloat16 against float32 on the default model, teacher-forced over real text (this repository's docs):
top-1 agreement and the mean absolute difference of the true next token's logprob. The bounds are set from
the measurement (docs/BENCHMARKS.md, "bfloat16"), a little below it: a regression guard for the bfloat16
path (packed bfloat16 linears, as the engine runs them), not a tautology."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from malora_runtime.models.loader import load_model
from malora_runtime.models.packed_linear import pack_linears
from malora_runtime.models.quantized_linear import quantize_linears
from tests.conftest import requires_bf16_packing

pytestmark = [pytest.mark.isa, pytest.mark.slow]  # run again at every lower instruction-set level (tests/isa_levels.py)

REPO = Path(__file__).resolve().parents[2]
TOKENS = 2048
CHUNK = 512  # tokens per forward (the model's context is longer; chunks keep the memory small)
MIN_TOP1_AGREEMENT = 0.95  # measured 0.965 (2026-12-02)
MAX_MEAN_ABS_LOGPROB_DIFF = 0.05  # measured 0.040


def text_tokens(tokenizer) -> torch.Tensor:
    text = "\n\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= TOKENS
    return torch.tensor(ids[:TOKENS])


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[TOKENS, vocab] float32 log-probabilities of each next token, chunk by chunk."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            logits = model(ids[start:start + CHUNK].unsqueeze(0)).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(out)


# `--quantization int8` on top of bfloat16: the packed products read the int8-rounded weights (the one-row int8
# product the same values; tests/engine/test_quantized_linear.py). Measured 2026-12-02: top-1 0.936, mean |d logprob|
# 0.090.
MIN_INT8_TOP1_AGREEMENT = 0.92
MAX_INT8_MEAN_ABS_LOGPROB_DIFF = 0.11


@pytest.fixture(scope="module")
def float32_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, float32 log-probabilities): the same for every case below, so computed once for the module."""
    model32, tokenizer, _ = load_model(None)
    pack_linears(model32)
    ids = text_tokens(tokenizer)
    return ids, logprobs(model32, ids)


@pytest.mark.parametrize("quantization,min_top1,max_difference", [
    (None, MIN_TOP1_AGREEMENT, MAX_MEAN_ABS_LOGPROB_DIFF),
    pytest.param("int8", MIN_INT8_TOP1_AGREEMENT, MAX_INT8_MEAN_ABS_LOGPROB_DIFF, marks=requires_bf16_packing),
])
def test_bfloat16_agrees_with_float32_on_real_text(float32_reference, quantization, min_top1, max_difference):
    ids, reference = float32_reference
    model16, _, _ = load_model(None, dtype=torch.bfloat16)
    pack_linears(model16)
    if quantization is not None:
        assert quantize_linears(model16, quantization) > 0
    measured = logprobs(model16, ids)
    # Within each chunk, position j predicts token j + 1 (the chunk's last position has no target here).
    positions = torch.tensor([j for j in range(TOKENS - 1) if (j + 1) % CHUNK != 0])
    targets = ids[positions + 1]
    agreement = float((reference[positions].argmax(-1) == measured[positions].argmax(-1)).float().mean())
    difference = float((reference[positions, targets] - measured[positions, targets]).abs().mean())
    figures = f"top-1 agreement {agreement:.4f}, mean |d logprob| {difference:.4f} over {len(positions)} tokens"
    assert agreement >= min_top1, figures
    assert difference <= max_difference, figures
