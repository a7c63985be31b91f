"""The fast decode path (models/fast_decode.py) against transformers' forward, the reference path:

- each family it runs (Llama, Qwen2 with q/k/v biases, Mistral with a sliding window shorter than the text), in
  float32: the same tokens and logprobs (to float error: 1e-4, or 3e-5 relative) as the reference engine, with two
  MALoRA adapters on all seven projections and the base in one batch (at few rows each layer one native call,
  each projection's delta added after its product by the native delta kernel; or op by op with the torch delta
  path), and without adapters, steps of 6 down to 1 rows (the native GEMV at <= 4 rows, the packed products above)
  and a request joining mid-decode (a step with a prefill runs the reference path);
- the real model in bfloat16 and with --quantization int8, teacher-forced token by token through the decode path:
  top-1 agreement and mean |d logprob| of the text's tokens against float32, as the bfloat16 quality test measures
  the whole-sequence forward;
- the start-up probe turns a fast path that computes something else off (the engine serves on, through the
  reference), and families it does not know never get it."""

from __future__ import annotations

import logging

import pytest
import torch

from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.engine.model_runner import Chunk, ModelRunner
from malora_runtime.kernels.token_slots import NO_SLOT
from malora_runtime.models import fast_decode
from malora_runtime.models.loader import load_model
from malora_runtime.patching import linear_shapes
from malora_runtime.sampling_params import SamplingParams
from tests.conftest import requires_bf16_packing, requires_native_bf16
from tests.engine.test_bfloat16_quality import text_tokens
from tests.engine.test_model_families import save_tiny_model

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)

FAST_FAMILIES = ["llama", "qwen2", "mistral"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Once upon a time", "The capital of France is a city with", "def f(n):", "Hello", "1, 2, 3,",
           "A long time ago in a galaxy far"]


@pytest.fixture(scope="module")
def fast_family_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-families")
    return {family: save_tiny_model(family, tokenizer, root / family) for family in [*FAST_FAMILIES, "phi3"]}


def serve(directory, fast: bool, adapters: bool) -> tuple[LLMEngine, dict[str, list[int]], dict]:
    engine = LLMEngine.from_config(EngineConfig(model=str(directory), num_kv_blocks=64, fast_decode=fast))
    shapes = linear_shapes(engine.runner.model)
    for seed, name in ((1, "a"), (2, "b")):
        engine.add_adapter(name, random_adapter(shapes, "tiny", PROJECTIONS, 4, 4, 8, 2, seed=seed,
                                                dtype="float32", output_scale=2.0))
    names = [None, "a", "b"] if adapters else [None]
    for i, prompt in enumerate(PROMPTS):  # 4 to 24 tokens: the batch shrinks from 6 rows to 1
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4 + 4 * i, temperature=0.0, ignore_eos=True,
                                                           logprobs=1), names[i % len(names)])
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if steps == 6:  # joins mid-decode: its prefill step runs the reference path for everyone
            engine.add_request("late", "Joining late", SamplingParams(max_tokens=8, temperature=0.0,
                                                                      ignore_eos=True, logprobs=1), names[-1])
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
            logprobs.setdefault(output.request_id, []).extend(t.logprob for t in output.outputs[0].logprobs or [])
    return engine, tokens, logprobs


@pytest.mark.parametrize(("adapters", "backend"), [(True, "native"), (True, "cpu"), (False, "native")],
                         ids=["adapters", "adapters-torch-delta", "base"])
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_decode_serves_what_the_reference_path_serves(fast_family_dirs, family, adapters, backend,
                                                          monkeypatch):
    # native: each layer one native call at few rows, deltas included; the torch delta path: op by op, each
    # projection's delta added into its columns of the fused product.
    monkeypatch.setenv("MALORA_KERNEL_BACKEND", backend)
    reference, want_tokens, want_logprobs = serve(fast_family_dirs[family], fast=False, adapters=adapters)
    engine, tokens, logprobs = serve(fast_family_dirs[family], fast=True, adapters=adapters)
    assert reference.runner.fast_decoder is None and engine.runner.fast_decoder is not None
    assert tokens == want_tokens
    for request, values in want_logprobs.items():
        assert logprobs[request] == pytest.approx(values, rel=3e-5, abs=1e-4), request


def test_families_the_fast_path_does_not_know_decode_through_transformers(fast_family_dirs, tokenizer):
    engine = LLMEngine.from_config(EngineConfig(model=str(fast_family_dirs["phi3"]), num_kv_blocks=16))
    assert engine.runner.fast_decoder is None
    assert "Phi3DecoderLayer" in fast_decode.unsupported_reason(engine.runner.model)


def test_the_probe_turns_off_a_fast_path_that_computes_something_else(fast_family_dirs, monkeypatch, caplog):
    real = fast_decode.add_rms_norm

    def without_residual(hidden, delta, weight, out, eps):  # forgets the residual add of every sublayer
        real(hidden, None, weight, out, eps)

    monkeypatch.setattr(fast_decode, "add_rms_norm", without_residual)
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine.from_config(EngineConfig(model=str(fast_family_dirs["llama"]), num_kv_blocks=16))
    assert engine.runner.fast_decoder is None
    assert "fast decode path off" in caplog.text
    engine.add_request("r", "Hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def teacher_forced_decode(runner: ModelRunner, ids: torch.Tensor) -> torch.Tensor:
    """[len(ids) - 1, vocab] log-probabilities of each next token, one decode step at a time after a first token."""
    blocks = list(range(-(-len(ids) // runner.block_size)))
    out = [torch.log_softmax(runner.run([Chunk(ids[:1].tolist(), 0, blocks, NO_SLOT, True)]), -1)]
    for position in range(1, len(ids) - 1):
        logits = runner.run([Chunk([int(ids[position])], position, blocks, NO_SLOT, True)])
        out.append(torch.log_softmax(logits, -1))
    runner.clear_kv_blocks(blocks)
    return torch.cat(out)


DECODED_TOKENS = 384
# Measured 2026-12-02 over these tokens (top-1, mean |d logprob|): bfloat16 0.969 / 0.043 through the fast path,
# 0.966 / 0.041 through transformers' forward; int8 0.914 / 0.093 through either (these first tokens are harder than
# the 2,048 of the whole-sequence test: 0.936 there).
BOUNDS = {None: (0.95, 0.06), "int8": (0.89, 0.12)}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, pytest.param("int8", marks=requires_bf16_packing)])
def test_the_decode_path_keeps_the_real_models_quality(default_model, quantization):
    model32, tokenizer, _ = default_model
    ids = text_tokens(tokenizer)[:DECODED_TOKENS]
    with torch.inference_mode():
        reference = torch.log_softmax(model32(ids[None]).logits[0, :-1].float(), -1)
    model16, _, _ = load_model(None, dtype=torch.bfloat16)
    runner = ModelRunner(model16, EngineConfig(dtype="bfloat16", quantization=quantization, num_kv_blocks=32))
    assert runner.fast_decoder is not None
    measured = teacher_forced_decode(runner, ids)
    targets = ids[1:]
    rows = torch.arange(len(targets))
    agreement = float((reference.argmax(-1) == measured.argmax(-1)).float().mean())
    difference = float((reference[rows, targets] - measured[rows, targets]).abs().mean())
    min_top1, max_difference = BOUNDS[quantization]
    figures = f"top-1 agreement {agreement:.4f}, mean |d logprob| {difference:.4f} over {len(targets)} tokens"
    assert agreement >= min_top1, figures
    assert difference <= max_difference, figures



@pytest.mark.slow
@requires_native_bf16
def test_a_prompt_the_prefix_cache_holds_but_one_token_gives_the_same_output():
    """The second run of a prompt finds all but its last token in the prefix cache: that one-token chunk is prompt,
    computed by transformers' forward as the first run's whole prefill was, so the outputs are identical (through
    the fast path its logprobs differed in bfloat16, and at a near-tie the token: a client test saw it).
    Only where bfloat16 is native: oneDNN's emulated bfloat16 product (AVX-512 without BF16) sums a one-row chunk
    in another order than the 33-row prefill (logprobs 3e-3 apart under MALORA_MAX_ISA=avx512)."""
    model, tokenizer, source = load_model(None, dtype=torch.bfloat16)
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype="bfloat16", num_kv_blocks=64, block_size=16), source.name)
    assert engine.runner.fast_decoder is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    assert len(prompt) == 33  # two whole blocks cached, one token left
    runs = []
    for attempt in range(2):
        engine.add_request(f"r{attempt}", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                                 logprobs=1))
        tokens, logprobs = [], []
        while engine.has_unfinished():
            for output in engine.step():
                tokens += output.outputs[0].token_ids
                logprobs += [t.logprob for t in output.outputs[0].logprobs or []]
        runs.append((tokens, logprobs))
    assert runs[0] == runs[1]
