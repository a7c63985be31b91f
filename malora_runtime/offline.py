"""Offline generation on the reference path: one adapter (or none), greedy, no engine."""

from __future__ import annotations

import torch
from torch import nn

from .adapters.format import MaloraAdapter
from .patching import set_adapter


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`; with `chat`, as a single user turn of the model's chat template."""
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompt_ids: list[int],
    adapter: MaloraAdapter | None,
    max_tokens: int,
    ignore_eos: bool = False,
    delta_dtype: torch.dtype | None = None,
) -> list[int]:
    """Greedy continuation of `prompt_ids` with `adapter` active (its delta in `delta_dtype`, default the
    model's); returns the new token ids."""
    set_adapter(model, adapter, delta_dtype)
    try:
        device = next(model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        eos = None if ignore_eos else tokenizer.eos_token_id
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens if ignore_eos else None,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        )
        return output[0, len(prompt_ids):].tolist()
    finally:
        set_adapter(model, None)
