"""`malora bench routing`: which experts an adapter's routers choose, task by task, from the engine's own counts.

The kernels count, per adapted layer and slot, the tokens routed to each expert (the counters behind /metrics'
`malora_expert_tokens`, which sums them over layers). Here one adapter serves its eval prompts one task at a time
(the task is the prompt's prefix before ':'), greedy, through the engine; the per-layer counts before and after
each task give its distribution of chosen experts in every layer. Two tasks' routing differs by the mean over
layers of the total variation distance (TVD, half the L1 distance) between their distributions; the noise floor is
the same statistic between two halves of one task's prompts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DEFAULT_ADAPTER = Path(__file__).resolve().parents[2] / "examples" / "adapters" / "multitask"


@dataclass
class TaskRouting:
    tokens: int  # prompt and generated tokens routed (per layer)
    per_layer: dict[str, torch.Tensor]  # layer path -> [N] distribution of chosen experts
    summed: list[float]  # over layers: what /metrics shows


def mean_tvd(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the total variation distance between two routing distributions."""
    values = [0.5 * float((a[p] - b[p]).abs().sum()) for p in a]
    return sum(values) / len(values)


def prompts_by_task(eval_file: Path) -> dict[str, list[str]]:
    tasks: dict[str, list[str]] = defaultdict(list)
    for line in eval_file.read_text().splitlines():
        if line.strip():
            prompt = json.loads(line)["prompt"]
            tasks[prompt.split(":", 1)[0]].append(prompt)
    return dict(tasks)


def routed(engine, name: str, prompts: list[str], max_tokens: int) -> TaskRouting:
    """Serve `prompts` on adapter `name` and return what its routers chose meanwhile."""
    from ..sampling_params import SamplingParams

    adapters = engine.runner.adapters
    slot = adapters.current[name]
    counts = adapters.routing.counts
    if not counts:
        raise RuntimeError("no per-layer routing counts: they come from the native (CPU) or Triton (GPU) kernel")
    before = {path: c[slot].clone() for path, c in counts.items()}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"routing-{name}-{i}-{id(prompts)}", prompt, params, name)
    while engine.has_unfinished():
        engine.step()
    per_layer, total, tokens = {}, None, 0
    for path, c in counts.items():
        delta = (c[slot] - before[path]).double()
        if delta.sum() > 0:
            per_layer[path] = delta / delta.sum()
            total = delta if total is None else total + delta
            tokens = max(tokens, int(delta.sum()))
    assert total is not None, "the adapter routed no tokens"
    return TaskRouting(tokens, per_layer, (total / total.sum()).tolist())


def measure(engine, name: str, tasks: dict[str, list[str]], max_tokens: int) -> dict:
    """Per task: its routing, and the noise floor (the two halves of its prompts against each other)."""
    result: dict = {"tasks": {}, "between": {}, "within": {}}
    whole: dict[str, TaskRouting] = {}
    for task, prompts in tasks.items():
        halves = [routed(engine, name, prompts[i::2], max_tokens) for i in range(2)]
        whole[task] = routed(engine, name, prompts, max_tokens)
        result["within"][task] = mean_tvd(halves[0].per_layer, halves[1].per_layer)
        result["tasks"][task] = {"prompts": len(prompts), "summed": whole[task].summed}
    for a, b in itertools.combinations(whole, 2):
        result["between"][f"{a}|{b}"] = mean_tvd(whole[a].per_layer, whole[b].per_layer)
    return result


def report(result: dict, name: str) -> str:
    tasks = result["tasks"]
    n = len(next(iter(tasks.values()))["summed"])
    lines = [f"adapter {name}: experts chosen, summed over layers (what /metrics shows)", "",
             "| task | prompts | " + " | ".join(f"expert {e}" for e in range(n)) + " | within-task TVD (halves) |",
             "| --- | --- | " + " | ".join("---" for _ in range(n)) + " | --- |"]
    for task, info in tasks.items():
        shares = " | ".join(f"{s:.1%}" for s in info["summed"])
        lines.append(f"| {task} | {info['prompts']} | {shares} | {result['within'][task]:.3f} |")
    lines += ["", "| task pair | mean per-layer TVD |", "| --- | --- |"]
    lines += [f"| {pair.replace('|', ' vs ')} | {value:.3f} |" for pair, value in result["between"].items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER, help="adapter directory with eval.jsonl")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, help="write the distributions and statistics here")


def run(args: argparse.Namespace) -> int:
    from ..adapters import load_adapter
    from ..config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..models.loader import load_model
    from ..patching import linear_shapes

    model, tokenizer, source = load_model(None)
    engine = LLMEngine(model, tokenizer, EngineConfig(count_expert_routing=True), source.name)
    name = args.adapter.name
    engine.add_adapter(name, load_adapter(args.adapter, linear_shapes(model)))
    result = measure(engine, name, prompts_by_task(args.adapter / "eval.jsonl"), args.max_tokens)
    sys.stdout.write(report(result, name))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
