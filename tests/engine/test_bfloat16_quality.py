"""bfloat16 against float32 on the default model, teacher-forced over real text (this repository's docs):
top-1 agreement and the mean absolute difference of the true next token's logprob. The bounds are set from
the measurement (docs/BENCHMARKS.md, "bfloat16"), a little below it: a regression guard for the bfloat16
path (packed bfloat16 linears, as the engine runs them), not a tautology."""

from __future__ import annotations

from pathlib import Path

import torch

from malora_runtime.models.loader import load_model
from malora_runtime.models.packed_linear import pack_linears

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


def test_bfloat16_agrees_with_float32_on_real_text():
    model32, tokenizer, _ = load_model(None)
    pack_linears(model32)
    ids = text_tokens(tokenizer)
    reference = logprobs(model32, ids)
    del model32
    model16, _, _ = load_model(None, dtype=torch.bfloat16)
    pack_linears(model16)
    measured = logprobs(model16, ids)
    # Within each chunk, position j predicts token j + 1 (the chunk's last position has no target here).
    positions = torch.tensor([j for j in range(TOKENS - 1) if (j + 1) % CHUNK != 0])
    targets = ids[positions + 1]
    agreement = float((reference[positions].argmax(-1) == measured[positions].argmax(-1)).float().mean())
    difference = float((reference[positions, targets] - measured[positions, targets]).abs().mean())
    figures = f"top-1 agreement {agreement:.4f}, mean |d logprob| {difference:.4f} over {len(positions)} tokens"
    assert agreement >= MIN_TOP1_AGREEMENT, figures
    assert difference <= MAX_MEAN_ABS_LOGPROB_DIFF, figures
