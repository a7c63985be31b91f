"""`malora eval`: exact-match accuracy of a model (plus an adapter) on a JSONL task file.

Two paths give the answers, and under greedy decoding they must agree:
- offline: `offline.greedy_generate` on the reference layer path, one record at a time;
- server: a running `malora-serve`, through `/v1/completions` (prompt/completion records) or
  `/v1/chat/completions` (chat records), temperature 0, `model` = the adapter's name.
An answer is correct when it equals the reference after whitespace is normalised.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import is_chat, prompt_ids, read_jsonl, reference_answer, write_jsonl

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 32


def normalize(text: str) -> str:
    return " ".join(text.split())


@dataclass
class EvalReport:
    answers: list[str]
    references: list[str]

    @property
    def correct(self) -> list[bool]:
        return [normalize(a) == normalize(r) for a, r in zip(self.answers, self.references)]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.references), 1)

    def predictions(self) -> list[dict[str, Any]]:
        return [{"answer": a, "reference": r, "correct": c}
                for a, r, c in zip(self.answers, self.references, self.correct)]


def offline_answers(model, tokenizer, adapter, records: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS) -> list[str]:
    """Greedy answers on the reference path; `adapter` is a `MaloraAdapter` or None (the base model)."""
    from ..offline import greedy_generate

    answers = []
    for record in records:
        new_ids = greedy_generate(model, tokenizer, prompt_ids(tokenizer, record), adapter, max_tokens)
        answers.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return answers


def server_answer(client, model_name: str, record: dict, max_tokens: int) -> str:
    """One greedy answer from a running server (`client`: an `httpx.Client` with the base URL set)."""
    body: dict[str, Any] = {"model": model_name, "max_tokens": max_tokens, "temperature": 0}
    if is_chat(record):
        body["messages"] = record["messages"][:-1]
        response = client.post("/v1/chat/completions", json=body)
    else:
        body["prompt"] = record["prompt"]
        response = client.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"server answered {response.status_code}: {response.text[:300]}")
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if is_chat(record) else choice["text"]


def server_answers(base_url: str, model_name: str, records: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS,
                   api_key: str | None = None, concurrency: int = 8, timeout: float = 300.0) -> list[str]:
    """Greedy answers from a running server, `concurrency` requests in flight (the engine batches them)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout) as client, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda r: server_answer(client, model_name, r, max_tokens), records))


def evaluate_offline(model, tokenizer, adapter, records: list[dict],
                     max_tokens: int = DEFAULT_MAX_TOKENS) -> EvalReport:
    return EvalReport(offline_answers(model, tokenizer, adapter, records, max_tokens),
                      [reference_answer(r) for r in records])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="JSONL task file (chat or prompt/completion records)")
    parser.add_argument("--adapter", default=None, help="adapter directory (offline; default: the base model)")
    parser.add_argument("--model", default=None, help="base model (offline; default: SmolLM2-135M-Instruct)")
    parser.add_argument("--server", default=None, help="base URL of a running malora-serve (instead of offline)")
    parser.add_argument("--name", default=None, help="with --server: the model id to ask for (adapter name); "
                        "default: the --adapter directory's name, else the server's base model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--predictions", default=None, help="write every answer to this JSONL file")
    parser.add_argument("--device", default="cpu")


def _server_base_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"]
    return next((m["id"] for m in models if not m.get("parent")), models[0]["id"])


def run(args: argparse.Namespace) -> int:
    records = read_jsonl(args.data)[: args.limit]
    references = [reference_answer(r) for r in records]
    if args.server:
        name = args.name or (Path(args.adapter).name if args.adapter else _server_base_model(args.server, args.api_key))
        report = EvalReport(server_answers(args.server, name, records, args.max_tokens, args.api_key), references)
        where = f"{args.server} model={name}"
    else:
        from ..adapters import load_adapter
        from ..models.loader import load_model
        from ..patching import linear_shapes

        model, tokenizer, source = load_model(args.model, device=args.device)
        adapter = load_adapter(args.adapter, linear_shapes(model)) if args.adapter else None
        report = evaluate_offline(model, tokenizer, adapter, records, args.max_tokens)
        where = f"offline {source.name}" + (f" + {args.adapter}" if args.adapter else "")
    if args.predictions:
        write_jsonl(args.predictions, report.predictions())
    summary = {"data": args.data, "path": where, "items": len(records), "correct": sum(report.correct),
               "accuracy": round(report.accuracy, 4)}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
