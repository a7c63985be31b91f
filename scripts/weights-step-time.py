"""Decode step time of the default model's engine per weight format, alternately in one process (issue 29): float
weights (`--quantization none`, the default today) against the GGUF blocks (`--quantization gguf`), `--streams`
greedy streams of `--tokens` tokens each, `--rounds` times; the median step of each run and their ratio per round.

    .venv/bin/python scripts/weights-step-time.py [--dtype auto] [--streams 1] [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from malora_runtime.config import EngineConfig  # noqa: E402
from malora_runtime.cpu_features import cpu_features  # noqa: E402
from malora_runtime.engine.llm_engine import LLMEngine  # noqa: E402
from malora_runtime.models.loader import load_model  # noqa: E402
from malora_runtime.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint, with a twist ending and vivid colours."


def median_step_ms(engine: LLMEngine, streams: int, tokens: int) -> float:
    for i in range(streams):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", f"{PROMPT} ({i})",
                           SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3  # past the prefill and the first decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    engines = {}
    for quantization in (None, "gguf"):
        config = EngineConfig(dtype=args.dtype, quantization=quantization, max_num_seqs=max(64, args.streams))
        model, tokenizer, source = load_model(None, dtype=config.torch_dtype, quantization=quantization)
        engines[quantization or "none"] = LLMEngine(model, tokenizer, config, source.name)
    for engine in engines.values():
        median_step_ms(engine, args.streams, 8)  # warm
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            runs[name].append(median_step_ms(engine, args.streams, args.tokens))
        sys.stdout.write(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.2f} ms" for n, t in runs.items())
                         + f", gguf/none {runs['gguf'][-1] / runs['none'][-1]:.3f}\n")
    ratios = sorted(g / n for g, n in zip(runs["gguf"], runs["none"]))
    config = next(iter(engines.values())).config
    sys.stdout.write(f"{cpu_features().describe()}, {config.dtype}, {args.streams} stream(s): none median "
                     f"{statistics.median(runs['none']):.2f} ms [{min(runs['none']):.2f}-{max(runs['none']):.2f}], "
                     f"gguf {statistics.median(runs['gguf']):.2f} ms [{min(runs['gguf']):.2f}-"
                     f"{max(runs['gguf']):.2f}]; ratio median {statistics.median(ratios):.3f} "
                     f"[{ratios[0]:.3f}-{ratios[-1]:.3f}]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
