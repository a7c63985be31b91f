"""Train the example adapters that `make serve` loads, on the default model, from the tasks in `tasks.py`.

For each example: generate its data (fixed seeds), train with `malora_runtime.training`, save the
adapter (fp16) to `examples/adapters/<name>/` with its `eval.jsonl`, score the base model and the
saved adapter on that eval set (offline, greedy), and write `card.json` with both accuracies and the
margin `tests/training/test_examples_served.py` requires of the served adapter.

    .venv/bin/python examples/train_examples.py            # all of them (a few minutes each on a CPU)
    .venv/bin/python examples/train_examples.py --only json
    .venv/bin/python examples/train_examples.py --served   # no training: each card's served accuracy per dtype

`--served` starts `malora-serve` on the adapters once per serving mode (float32, bfloat16, bfloat16 with
`--quantization int8`) and records in every card `served_accuracy: {mode: accuracy}` (what a client gets from a
server in that mode; float32 matches the offline `adapter_accuracy`); `tests/training/test_examples_served.py` holds
bfloat16 within 0.05 of float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.tasks import make_splits  # noqa: E402
from malora_runtime.adapters import atomic_directory, load_adapter  # noqa: E402
from malora_runtime.adapters.io import write_adapter_files  # noqa: E402
from malora_runtime.bench.serve import start_server, stop_server  # noqa: E402
from malora_runtime.models.loader import load_model  # noqa: E402
from malora_runtime.patching import linear_shapes  # noqa: E402
from malora_runtime.training.data import read_jsonl, reference_answer, write_jsonl  # noqa: E402
from malora_runtime.training.evaluate import EvalReport, evaluate_offline, server_answers  # noqa: E402
from malora_runtime.training.trainer import TrainConfig, train  # noqa: E402

log = logging.getLogger("examples.train")
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
MAX_TOKENS = 32
EVAL_COUNT = 30
TRAIN_COUNT = 2000
MARGIN_SLACK = 0.15
SERVED_MODES = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"],
                "bfloat16-int8": ["--dtype", "bfloat16", "--quantization", "int8"]}
"""The test requires adapter - base >= (measured gap - this), rounded down to 0.05."""


@dataclass
class Example:
    task: str
    description: str
    config: TrainConfig = field(default_factory=TrainConfig)


def _config(**overrides) -> TrainConfig:
    settings = dict(method="malora", targets=["q_proj", "v_proj", "o_proj"], num_experts=2, rank=4,
                    subspace_rank=8, top_k=2, steps=60, batch_size=8, lr=2e-3, warmup_steps=6,
                    lb_weight=0.01, eval_every=0, dtype="float16")
    settings.update(overrides)
    return TrainConfig(**settings)


EXAMPLES: dict[str, Example] = {
    "upper": Example("upper", "Answers `upper: <phrase>` with the phrase in upper case.", _config()),
    "reverse": Example("reverse", "Answers `reverse: <words>` with the words in reverse order.", _config()),
    "json": Example("json", "Turns `json: <sentence about a person>` into {\"name\", \"age\", \"city\"} JSON.",
                    _config()),
    "multitask": Example("multitask", "upper, reverse and json mixed; 4 experts, top-2: the router picks by task.",
                         _config(num_experts=4, subspace_rank=16, top_k=2, steps=250, warmup_steps=10)),
}


def required_margin(base_accuracy: float, adapter_accuracy: float) -> float:
    return max(0.0, math.floor((adapter_accuracy - base_accuracy - MARGIN_SLACK) * 20) / 20)


def build(name: str, example: Example, model, tokenizer, model_name: str, out_root: Path) -> dict:
    train_records, eval_records = make_splits(example.task, TRAIN_COUNT, EVAL_COUNT)
    result = train(model, tokenizer, example.config, train_records, None, model_name)
    out = out_root / name
    result.adapter.config.description = example.description
    # The adapter, its eval set and its card appear together or not at all (a server may be serving `out`).
    with atomic_directory(out) as staging:
        write_adapter_files(result.adapter, staging)
        write_jsonl(staging / "eval.jsonl", eval_records)
        served = load_adapter(staging, linear_shapes(model), dtype=torch.float32)  # what a server loads: the fp16 file
        base = evaluate_offline(model, tokenizer, None, eval_records, MAX_TOKENS)
        tuned = evaluate_offline(model, tokenizer, served, eval_records, MAX_TOKENS)
        card = {
            "name": name,
            "task": example.task,
            "description": example.description,
            "base_model": model_name,
            "prompt_example": eval_records[0]["prompt"],
            "completion_example": eval_records[0]["completion"],
            "eval_set": "eval.jsonl",
            "eval_items": len(eval_records),
            "max_tokens": MAX_TOKENS,
            "scoring": "exact match after whitespace normalisation, greedy decoding, /v1/completions",
            "base_accuracy": round(base.accuracy, 4),
            "adapter_accuracy": round(tuned.accuracy, 4),
            "required_margin": required_margin(base.accuracy, tuned.accuracy),
            "trainable_parameters": result.trainable_parameters,
            "size_bytes": served.num_bytes() // 2,
            "train_seconds": round(result.seconds, 1),
            "final_train_loss": round(result.losses[-1], 4),
            "training": {k: v for k, v in asdict(example.config).items()},
            "train_data": f"examples/tasks.py: make_splits({example.task!r}, {TRAIN_COUNT}, {EVAL_COUNT})",
        }
        (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("%s: base %.2f, adapter %.2f, margin %.2f, %.0f s", name, base.accuracy, tuned.accuracy,
             card["required_margin"], result.seconds)
    return card


def record_served_accuracy(out_root: Path, modes: dict[str, list[str]] = SERVED_MODES) -> None:
    """Serve every adapter under `out_root` once per mode and write each card's `served_accuracy`."""
    cards = sorted(out_root.glob("*/card.json"))
    measured: dict[Path, dict[str, float]] = {path: {} for path in cards}
    for dtype, flags in modes.items():
        process, url = start_server([sys.executable, "-m", "server.main", "--adapter-root", str(out_root),
                                     *flags, "--log-level", "warning"], "/ready",
                                    Path(tempfile.gettempdir()) / f"malora-served-{dtype}.log", {})
        try:
            for path in cards:
                card = json.loads(path.read_text())
                records = read_jsonl(path.parent / card["eval_set"])
                answers = server_answers(url, path.parent.name, records, card["max_tokens"], concurrency=32)
                measured[path][dtype] = round(EvalReport(answers, [reference_answer(r) for r in records]).accuracy, 4)
                log.info("%s served in %s: %.4f", path.parent.name, dtype, measured[path][dtype])
        finally:
            stop_server(process)
    for path, accuracy in measured.items():
        card = json.loads(path.read_text())
        card["served_accuracy"] = accuracy
        path.write_text(json.dumps(card, indent=2) + "\n")


def write_index(out_root: Path) -> None:
    rows = ["| adapter | task | eval items | base accuracy | adapter accuracy | served float32 / bfloat16 / "
            "bfloat16 + int8 | test margin | size (fp16) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for card_path in sorted(out_root.glob("*/card.json")):
        c = json.loads(card_path.read_text())
        served = " / ".join(f"{c.get('served_accuracy', {}).get(d, float('nan')):.2f}" for d in SERVED_MODES)
        rows.append(f"| `{c['name']}` | {c['description']} | {c['eval_items']} | {c['base_accuracy']:.2f} | "
                    f"{c['adapter_accuracy']:.2f} | {served} | {c['required_margin']:.2f} | "
                    f"{c['size_bytes'] / 1e6:.1f} MB |")
    (out_root / "README.md").write_text(
        "# Example adapters\n\nTrained by `examples/train_examples.py` on synthetic tasks from `examples/tasks.py` "
        "(base: SmolLM2-135M-Instruct). Prompts are plain text for `/v1/completions`, for example "
        "`upper: quiet green river\\n`. Each directory holds the adapter, its `eval.jsonl` and a `card.json`; "
        "`tests/training/test_examples_served.py` checks every served adapter against its card.\n\n"
        + "\n".join(rows) + "\n\nReproduce: `.venv/bin/python examples/train_examples.py` "
        "(score one: `malora eval examples/adapters/json/eval.jsonl --adapter examples/adapters/json`).\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(EXAMPLES), help="train only these")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    parser.add_argument("--served", action="store_true", help="train nothing: record each card's served accuracy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if not args.served:
        model, tokenizer, source = load_model(None)
        for name in args.only or EXAMPLES:
            build(name, EXAMPLES[name], model, tokenizer, source.name, args.out)
    record_served_accuracy(args.out)
    write_index(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
