"""Weight-only quantization's quality on the default model (issue 17), measured as the bfloat16 issue measured
bfloat16: teacher-forced over this repository's docs (2,048 tokens), top-1 agreement with float32 and the mean
absolute difference of the true next token's logprob. Every nn.Linear (the output head included) is rounded to
the format and computed in float32, so the figure is the format's own loss, not a kernel's.

    .venv/bin/python scripts/quant-quality.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from malora_runtime.models.loader import load_model  # noqa: E402
from tests.engine.test_bfloat16_quality import CHUNK, TOKENS, logprobs, text_tokens  # noqa: E402


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def int4_groups(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Asymmetric 4-bit groups along the input dimension (as torch's int4pack kernels take them)."""
    n, k = w.shape
    groups = w.reshape(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).reshape(n, k)


FORMATS = {"int8 per channel": int8_per_channel, "int4 groups of 32": int4_groups}


def main() -> None:
    reference_model, tokenizer, _ = load_model(None)
    ids = text_tokens(tokenizer)
    reference = logprobs(reference_model, ids)
    del reference_model
    positions = torch.tensor([j for j in range(TOKENS - 1) if (j + 1) % CHUNK != 0])
    targets = ids[positions + 1]
    for label, rounding in FORMATS.items():
        model, _, _ = load_model(None)
        with torch.no_grad():
            for module in model.modules():
                if type(module) is nn.Linear:
                    module.weight.copy_(rounding(module.weight.float()))
        got = logprobs(model, ids)
        agreement = float((reference[positions].argmax(-1) == got[positions].argmax(-1)).float().mean())
        difference = float((reference[positions, targets] - got[positions, targets]).abs().mean())
        print(f"{label}: top-1 agreement {agreement:.4f}, mean |d logprob| {difference:.4f} over {len(positions)} "
              "tokens")


if __name__ == "__main__":
    main()
