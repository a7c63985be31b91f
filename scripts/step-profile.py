"""Time an engine decode step at N greedy streams of the default model in one dtype, then split 20 steps by
function with cProfile (the packed linears, attention, transformers' small ops, Python).

    .venv/bin/python scripts/step-profile.py bfloat16 --streams 32
    .venv/bin/python scripts/step-profile.py bfloat16 --streams 1 --quantization int8 [--adapter] [--no-fast-decode]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from malora_runtime.adapters.init import random_adapter  # noqa: E402
from malora_runtime.bench.adapter_shapes import OFFLINE_SHAPE  # noqa: E402
from malora_runtime.config import EngineConfig  # noqa: E402
from malora_runtime.engine.llm_engine import LLMEngine  # noqa: E402
from malora_runtime.models.loader import load_model  # noqa: E402
from malora_runtime.patching import linear_shapes  # noqa: E402
from malora_runtime.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint, with a twist ending and vivid colours."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", choices=["gguf", "int8"], default=None)
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode through transformers' forward (the reference path)")
    parser.add_argument("--adapter", action="store_true",
                        help="every stream on one random MALoRA adapter of the offline benchmark's shape (q/k/v/o, "
                             "N 4, r 8, d 16, top-2, fp16)")
    args = parser.parse_args()
    model, tokenizer, source = load_model(None, dtype=getattr(torch, args.dtype), quantization=args.quantization)
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype=args.dtype, quantization=args.quantization,
                                                            fast_decode=args.fast_decode), source.name)
    params = SamplingParams(max_tokens=12 + 2 * args.steps + 8, temperature=0.0, ignore_eos=True)
    adapter = None
    if args.adapter:
        targets, n, r, d, k = OFFLINE_SHAPE
        engine.add_adapter("bench", random_adapter(linear_shapes(model), source.name, targets, n, r, d, k, seed=0))
        adapter = "bench"
    for i in range(args.streams):
        engine.add_request(f"r{i}", f"{PROMPT} {i}", params, adapter)
    for _ in range(12):  # the prefills and first decodes
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(20)
    path = "fast decode" if engine.runner.fast_decoder is not None else "transformers' forward"
    sys.stdout.write(f"{args.dtype} {args.quantization or ''}, {path}, {args.streams} streams"
                     f"{' on an adapter' if adapter else ''}: "
                     f"{step_ms:.1f} ms a decode step (unprofiled); "
                     f"{args.steps} profiled steps by function:\n{report.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
