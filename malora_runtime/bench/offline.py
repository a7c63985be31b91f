"""Offline throughput: this engine against transformers `generate` (with and without PEFT adapters).

One process, one run, the default model in float32 (`--dtype bfloat16`: every path in bfloat16,
transformers and PEFT too), 64 prompt + 64 output tokens per request (ignore_eos), batch 32. Output tokens
per second of:
  a0  transformers generate, base model, static batch of 32
  a   transformers + PEFT mixed-adapter generate (adapter_names), 8 LoRA adapters r=16 on q/k/v/o
  b   this engine, the same 8 adapters converted to MALoRA
  c   this engine, no adapter
  d   this engine, 32 distinct MALoRA adapters (N=4, top_k=2, r=8, d=16 on q/k/v/o), one request each;
      `--mixed-shapes`: cycling through four different shapes (`bench/adapter_shapes.py`) instead
  c32 with --dtype bfloat16: this engine in float32, no adapter, in the same run (c / c32: what bfloat16 buys)
`--device cuda` runs all of them on the GPU (the engine's adapters through the Triton kernel).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from .adapter_shapes import MIXED_SHAPES, OFFLINE_SHAPE

log = logging.getLogger(__name__)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--skip", default="", help="comma-separated keys to skip (a0,a,b,c,d)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    parser.add_argument("--mixed-shapes", action="store_true", help="d: adapters of four different shapes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the model's dtype for every path (bfloat16 adds c32, the engine in float32)")
    parser.add_argument("--quantization", default="none", choices=("none", "gguf", "int8"),
                        help="the engine's --quantization (bfloat16 only; the c32 engine runs without)")
    parser.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="d: the adapters' dtype (`malora adapter init` writes float16)")


def _prompts(tokenizer, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(1000, 40000) if i not in special]
    picks = torch.randint(0, len(vocab), (batch, length), generator=generator)
    return [[vocab[j] for j in row] for row in picks.tolist()]


WARMUP_TOKENS = 4  # every path first runs once untimed on other prompts (first-touch allocations, oneDNN setup)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, warmup: list[list[int]] | None = None,
                 **kwargs) -> float:
    if warmup is not None:
        _hf_generate(model, warmup, WARMUP_TOKENS, **kwargs)
    ids = torch.tensor(prompts, device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    if out.is_cuda:
        torch.cuda.synchronize()  # the clock stops when the GPU is done
    elapsed = time.perf_counter() - started
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def _engine_run(engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
                warmup: list[list[int]] | None = None) -> float:
    from malora_runtime.sampling_params import SamplingParams

    if warmup is not None:  # other prompts: nothing the timed run could find in the prefix cache
        _engine_run(engine, warmup, adapters, WARMUP_TOKENS)

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params, adapter)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(c.token_ids) for o in engine.step() for c in o.outputs)
    elapsed = time.perf_counter() - started
    assert generated == len(prompts) * new_tokens, generated
    return generated / elapsed


def _peft_adapters(model, directory: Path, count: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        path = directory / f"lora{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from malora_runtime.adapters import load_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.config import EngineConfig
    from malora_runtime.engine.llm_engine import LLMEngine
    from malora_runtime.models.loader import load_model
    from malora_runtime.patching import linear_shapes

    skip = set(filter(None, args.skip.split(",")))
    if args.quantization == "gguf":
        skip.add("a")  # PEFT wraps float linear layers; the block-served model has none
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: torch sees no GPU here")
        return 1
    dtype = getattr(torch, args.dtype)
    model, tokenizer, source = load_model(None, dtype=dtype, device=args.device,
                                          quantization="gguf" if args.quantization == "gguf" else None)
    prompts = _prompts(tokenizer, args.batch, args.prompt_tokens)
    warmup = _prompts(tokenizer, args.batch, args.prompt_tokens, seed=1)
    n_new = args.output_tokens
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lora_dirs = _peft_adapters(model, Path(tmp), 8)
        if "a0" not in skip:
            results["a0"] = _hf_generate(model, prompts, n_new, warmup)
            log.info("a0 transformers generate: %.1f tok/s", results["a0"])
        if "a" not in skip:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), lora_dirs[0], adapter_name="lora0")
            for i, path in enumerate(lora_dirs[1:], start=1):
                peft_model.load_adapter(path, adapter_name=f"lora{i}")
            peft_model.eval()
            names = [f"lora{i // (args.batch // 8)}" for i in range(args.batch)]
            results["a"] = _hf_generate(peft_model, prompts, n_new, warmup, adapter_names=names)
            log.info("a  transformers + PEFT mixed adapters: %.1f tok/s", results["a"])
            del peft_model
        config = EngineConfig(device=args.device, dtype=args.dtype, max_loaded_adapters=max(32, args.batch),
                              quantization=None if args.quantization == "none" else args.quantization)
        engine = LLMEngine(model, tokenizer, config, source.name)
        shapes = linear_shapes(model)
        for i, path in enumerate(lora_dirs):
            engine.add_adapter(f"lora{i}", load_adapter(path, shapes))
        if "b" not in skip:
            names = [f"lora{i // (args.batch // 8)}" for i in range(args.batch)]
            results["b"] = _engine_run(engine, prompts, names, n_new, warmup)
            log.info("b  engine, 8 converted LoRA adapters: %.1f tok/s", results["b"])
        if "c" not in skip:
            results["c"] = _engine_run(engine, prompts, [None] * args.batch, n_new, warmup)
            log.info("c  engine, base model: %.1f tok/s", results["c"])
        if args.dtype != "float32" and "c32" not in skip:
            model32, _, _ = load_model(None, device=args.device)
            engine32 = LLMEngine(model32, tokenizer, EngineConfig(device=args.device), source.name)
            results["c32"] = _engine_run(engine32, prompts, [None] * args.batch, n_new, warmup)
            log.info("c32 engine in float32, base model: %.1f tok/s", results["c32"])
            del engine32, model32
        if "d" not in skip:
            for i in range(8):
                engine.remove_adapter(f"lora{i}")
            kinds = list(MIXED_SHAPES.values()) if args.mixed_shapes else [OFFLINE_SHAPE]
            for i in range(args.batch):
                targets, n, r, d, k = kinds[i % len(kinds)]
                engine.add_adapter(f"m{i}", random_adapter(shapes, source.name, targets, n, r, d, k, seed=i,
                                                           dtype=args.adapter_dtype))
            results["d"] = _engine_run(engine, prompts, [f"m{i}" for i in range(args.batch)], n_new, warmup)
            log.info("d  engine, %d distinct MALoRA adapters: %.1f tok/s", args.batch, results["d"])
    ratios = {}
    for name, (num, den) in {"c/a0": ("c", "a0"), "b/a": ("b", "a"), "d/c": ("d", "c"), "c/c32": ("c", "c32")}.items():
        if num in results and den in results:
            ratios[name] = results[num] / results[den]
    lines = [f"{'run':<6}{'output tok/s':>14}"] + [f"{k:<6}{v:>14.1f}" for k, v in results.items()]
    lines += [f"{k:<6}{v:>14.2f}x" for k, v in ratios.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        payload = {**results, "ratios": ratios, "machine": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype}
        if args.device == "cuda":
            payload["gpu"] = torch.cuda.get_device_name()
        args.json.write_text(json.dumps(payload, indent=2))
    return 0
