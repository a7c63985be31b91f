"""Engine throughput at 1 and 32 greedy streams (32 tokens each), base model and one fp16 adapter (N 4, r 8,
d 16 on q/v), in one dtype: run it once per dtype, alternating, and compare within the run pair.

    .venv/bin/python scripts/dtype-streams.py float32
    .venv/bin/python scripts/dtype-streams.py bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from malora_runtime.adapters.init import random_adapter  # noqa: E402
from malora_runtime.config import EngineConfig  # noqa: E402
from malora_runtime.engine.llm_engine import LLMEngine  # noqa: E402
from malora_runtime.models.loader import load_model  # noqa: E402
from malora_runtime.patching import linear_shapes  # noqa: E402
from malora_runtime.sampling_params import SamplingParams  # noqa: E402


def throughput(engine: LLMEngine, streams: int, adapter: str | None, tokens: int = 32) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", "The capital of France is", params, adapter)
    generated, started = 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(c.token_ids) for o in engine.step() for c in o.outputs)
    return generated / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dtype", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    model, tokenizer, source = load_model(None, dtype=getattr(torch, args.dtype))
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype=args.dtype), source.name)
    engine.add_adapter("a", random_adapter(linear_shapes(model), source.name, ["q_proj", "v_proj"], 4, 8, 16, 2,
                                           seed=0, dtype="float16"))
    throughput(engine, 2, None, 4)  # warm-up
    figures = {f"{name} {streams}": throughput(engine, streams, adapter)
               for name, adapter in (("base", None), ("adapter", "a")) for streams in (1, 32)}
    sys.stdout.write(f"{args.dtype}: " + ", ".join(f"{k} streams {v:.1f} tok/s" for k, v in figures.items()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
