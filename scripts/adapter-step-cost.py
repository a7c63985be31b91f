"""The MALoRA delta's share of a one-row decode step (issue 17: below 15% of a quantized base step with one adapter
of the offline benchmark's shape): one greedy stream on the base model, then one on the adapter, alternately in one
process, `--rounds` times; the median step time of each run, and their ratio per round.

    .venv/bin/python scripts/adapter-step-cost.py [--quantization int8] [--rounds 6] [--tokens 64] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from malora_runtime.adapters.init import random_adapter  # noqa: E402
from malora_runtime.bench.adapter_shapes import OFFLINE_SHAPE  # noqa: E402
from malora_runtime.config import EngineConfig  # noqa: E402
from malora_runtime.engine.llm_engine import LLMEngine  # noqa: E402
from malora_runtime.models.loader import load_model  # noqa: E402
from malora_runtime.patching import linear_shapes  # noqa: E402
from malora_runtime.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint, with a twist ending and vivid colours."


def median_step_ms(engine: LLMEngine, adapter: str | None, tokens: int) -> float:
    engine.add_request(f"r-{time.monotonic_ns()}", PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                          ignore_eos=True), adapter)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3  # past the prefill and the first decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", choices=["gguf", "int8"], default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or auto (the CPU level's choice)")
    args = parser.parse_args()
    config = EngineConfig(dtype=args.dtype, quantization=args.quantization)
    model, tokenizer, source = load_model(None, dtype=config.torch_dtype, quantization=args.quantization)
    engine = LLMEngine(model, tokenizer, config, source.name)
    targets, n, r, d, k = OFFLINE_SHAPE
    engine.add_adapter("bench", random_adapter(linear_shapes(model), source.name, targets, n, r, d, k, seed=0))
    median_step_ms(engine, "bench", 8)  # warm both paths
    ratios = []
    for round_ in range(args.rounds):
        base, adapted = median_step_ms(engine, None, args.tokens), median_step_ms(engine, "bench", args.tokens)
        ratios.append(adapted / base)
        sys.stdout.write(f"round {round_}: base {base:.2f} ms, adapter {adapted:.2f} ms, ratio {ratios[-1]:.3f}\n")
    sys.stdout.write(f"median ratio {statistics.median(ratios):.3f} ({config.dtype} {args.quantization or ''}, "
                     f"fast decode {'on' if engine.runner.fast_decoder is not None else 'off'})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
