"""Supervised fine-tuning data: JSONL records -> token ids with a completion-only loss mask.

Two record shapes are accepted, one per line:
  {"messages": [{"role": ..., "content": ...}, ...]}   the last turn (an assistant turn) is the completion;
                                                        the rest goes through the tokenizer's chat template
  {"prompt": "...", "completion": "..."}                plain text; the completion is followed by EOS
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenised record: the prompt ids (no loss) and the completion ids (loss)."""

    prompt_ids: list[int]
    completion_ids: list[int]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    records = []
    with Path(path).open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON: {exc}") from None
            if not is_chat(record) and not ("prompt" in record and "completion" in record):
                raise ValueError(f"{path}:{number}: a record needs 'messages' or 'prompt' and 'completion'")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def is_chat(record: dict[str, Any]) -> bool:
    return isinstance(record.get("messages"), list)


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_ids(tokenizer, record: dict[str, Any]) -> list[int]:
    """The ids a model is given to answer `record` (everything but the completion)."""
    if is_chat(record):
        history = record["messages"][:-1]
        return _ids(tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True))
    return _ids(tokenizer(record["prompt"]))


def reference_answer(record: dict[str, Any]) -> str:
    return record["messages"][-1]["content"] if is_chat(record) else record["completion"]


def tokenize(tokenizer, record: dict[str, Any], max_length: int) -> Example:
    """Prompt and completion ids; the prompt is cut from the left when the pair exceeds `max_length`."""
    prompt = prompt_ids(tokenizer, record)
    if is_chat(record):
        full = _ids(tokenizer.apply_chat_template(record["messages"], tokenize=True))
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not extend the prompt with the last turn")
        completion = full[len(prompt):]
    else:
        completion = _ids(tokenizer(record["completion"], add_special_tokens=False)) + [tokenizer.eos_token_id]
    completion = completion[:max_length]
    prompt = prompt[max(0, len(prompt) + len(completion) - max_length):]
    return Example(prompt, completion)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX outside completions

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded batch; labels are the input ids on completion tokens only."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(e.prompt_ids): len(ids)] = torch.tensor(e.completion_ids)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def batches_forever(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Shuffled batches, reshuffled each epoch, without end."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in order[start: start + batch_size]], pad_id)


def batches_once(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start: start + batch_size], pad_id)
