"""Serving a GGUF file from its quantized blocks (`--quantization gguf`, models/gguf_blocks.py): the model holds no
float copy of its linear layers, computes what transformers' own GGUF loading (de-quantized to float32) computes,
and the engine's decode path (fused products, parts in different formats) agrees with it. The real default model
(Q4_1 + Q8_0), and a small random Llama written here with every block format the kernels read, mixed the way
K-quant files mix them (q/k in Q4_K beside v in Q6_K)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from torch import nn

from malora_runtime.config import EngineConfig
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.kernels.native.block_ops import FORMATS, BlockWeight
from malora_runtime.models.block_linear import BlockEmbedding, BlockLinear, block_bytes
from malora_runtime.models.gguf_blocks import BlockModelError
from malora_runtime.models.loader import default_gguf_path, load_model
from malora_runtime.sampling_params import SamplingParams
from tests.kernels.test_block_kernels import random_blocks

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a robot", "2 + 2 ="]

# The small model's tensors and the format each is written in: every format the kernels read, q/k/v and gate/up
# mixed (the fused products' parts), an untied output head.
SMALL_FORMATS = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_0",
                 "ffn_up": "Q5_1", "ffn_down": "Q5_0", "token_embd": "Q8_0", "output": "Q4_1"}
SMALL = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)


def linears_and_embeddings(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding | BlockEmbedding)]


def greedy(engine: LLMEngine, prompt: str, tokens: int, adapter: str | None = None) -> list[int]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), adapter)
    out: list[int] = []
    while engine.has_unfinished():
        for result in engine.step():
            out += result.outputs[0].token_ids  # each step's new tokens
    return out


@pytest.fixture(scope="module")
def block_model():
    return load_model(None, quantization="gguf")


def test_the_default_model_keeps_its_blocks(block_model):
    model, _, _ = block_model
    modules = linears_and_embeddings(model)
    assert modules and all(isinstance(m, BlockLinear | BlockEmbedding) for m in modules), \
        {type(m).__name__ for m in modules}
    file_bytes = default_gguf_path().stat().st_size
    assert 0.95 * file_bytes < block_bytes(model) <= file_bytes
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert float_bytes < 1 << 20, f"{float_bytes} bytes of float parameters (the norms alone are ~140 KB)"


@pytest.mark.slow
def test_the_default_model_computes_the_dequantized_models_logits(block_model, default_model):
    model, tokenizer, _ = block_model
    reference = default_model[0]  # transformers' de-quantization, float32
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            got, want = model(ids).logits, reference(ids).logits
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_a_changed_block_changes_the_output(block_model):
    """The forward reads the blocks themselves: one block's scale doubled in a copy changes the logits (a path that
    bypassed the block kernels, e.g. a float copy made at load, would not see it)."""
    model, tokenizer, _ = block_model
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    q_proj = model.model.layers[0].self_attn.q_proj
    original = q_proj.block_weight
    with torch.no_grad():
        before = model(ids).logits
        changed = original.blocks.clone()  # the file's map is read-only: change a copy
        scale = changed[0, 0:2].view(torch.float16)
        scale.mul_(4)
        q_proj.use(BlockWeight(changed, original.format, original.in_features, original.bias))
        try:
            after = model(ids).logits
        finally:
            q_proj.use(original)
        restored = model(ids).logits
    assert not torch.equal(before, after)
    assert torch.equal(before, restored)


@pytest.mark.slow
def test_the_engine_serves_the_blocks_with_the_float_engines_tokens():
    """Greedy tokens through the engine (prefill through transformers' forward, decode through the fused block
    products) equal those of the float32 engine on the de-quantized weights, with and without an adapter. Both
    models loaded here: an engine wraps, packs and fuses its model's modules, so shared fixtures stay untouched."""
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    blocks = LLMEngine.from_config(EngineConfig(dtype="float32", quantization="gguf", kv_cache_memory=64 << 20))
    assert blocks.runner.fast_decoder is not None and blocks.runner.fast_decoder.block_weights
    assert blocks.runner.weights.startswith("gguf blocks (")
    float_model, float_tokenizer, source = load_model(None)
    floats = LLMEngine(float_model, float_tokenizer, EngineConfig(dtype="float32", kv_cache_memory=64 << 20),
                       source.name)
    adapter = random_adapter(linear_shapes(float_model), source.name, ["q_proj", "v_proj", "down_proj"], 4, 4, 8, 2,
                             seed=3)
    for engine in (blocks, floats):
        engine.add_adapter("a", adapter)
    agree = 0
    for prompt in PROMPTS[:3]:
        for name in (None, "a"):
            agree += greedy(blocks, prompt, 12, name) == greedy(floats, prompt, 12, name)
    assert agree >= 5, f"{agree} of 6 greedy continuations equal"


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip_prefix: str) -> None:
    """Every key-value of `reader` but the file's own bookkeeping and the architecture's hyperparameters."""
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", skip_prefix)) or key == "general.architecture":
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type)


def write_small_gguf(path: Path, rng: np.random.Generator) -> None:
    """A random 2-layer Llama with the default model's tokenizer, each tensor in its SMALL_FORMATS format."""
    source = GGUFReader(default_gguf_path())
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    h, inter = SMALL["hidden"], SMALL["intermediate"]
    writer = GGUFWriter(str(path), "llama")
    copy_metadata(source, writer, "llama.")
    writer.add_context_length(512)
    writer.add_embedding_length(h)
    writer.add_block_count(SMALL["layers"])
    writer.add_feed_forward_length(inter)
    writer.add_head_count(SMALL["heads"])
    writer.add_head_count_kv(SMALL["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    head_dim = h // SMALL["heads"]

    def blocks(name: str, out: int, in_features: int) -> None:
        fmt = FORMATS[SMALL_FORMATS[name.rsplit(".", 1)[-1]]]
        raw = random_blocks(fmt, out, in_features, rng)
        # Small positive scales keep a random network's activations finite (random bytes give up to 63 x 15 x d).
        scale_bytes = rng.uniform(1e-4, 4e-4, size=raw.shape[0] * (raw.shape[1] // fmt.bytes)).astype(np.float16)
        view = raw.reshape(out, -1, fmt.bytes)
        offset = 208 if fmt.name == "Q6_K" else 0
        view[:, :, offset:offset + 2] = scale_bytes.view(np.uint8).reshape(out, -1, 2)
        writer.add_tensor(f"{name}.weight", raw,  # the shape of its bytes; gguf-py derives the values
                          raw_dtype=GGMLQuantizationType[fmt.name])

    blocks("token_embd", vocab, h)
    for layer in range(SMALL["layers"]):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
        blocks(f"{prefix}.attn_q", h, h)
        blocks(f"{prefix}.attn_k", SMALL["kv_heads"] * head_dim, h)
        blocks(f"{prefix}.attn_v", SMALL["kv_heads"] * head_dim, h)
        blocks(f"{prefix}.attn_output", h, h)
        blocks(f"{prefix}.ffn_gate", inter, h)
        blocks(f"{prefix}.ffn_up", inter, h)
        blocks(f"{prefix}.ffn_down", h, inter)
    writer.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    blocks("output", vocab, h)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "small-mixed.gguf"
    write_small_gguf(path, np.random.default_rng())
    return path


@pytest.mark.slow
def test_every_format_mixed_as_k_quant_files_mix_them(small_gguf):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = load_model(small_gguf, quantization="gguf")
    assert all(isinstance(m, BlockLinear | BlockEmbedding) for m in linears_and_embeddings(model))
    formats = {m.block_weight.format.name for m in model.modules() if hasattr(m, "block_weight")}
    assert formats == set(FORMATS)
    reference = AutoModelForCausalLM.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name,
                                                     dtype=torch.float32).eval()
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    # The engine's decode step: q/k/v and gate/up are products of two parts each (formats side by side).
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype="float32", quantization="gguf",
                                                      kv_cache_memory=16 << 20), small_gguf.stem)
    decoder = engine.runner.fast_decoder
    assert decoder is not None and len(decoder.products[0].qkv.weight.segments) == 2
    tokens = greedy(engine, PROMPTS[2], 8)
    with torch.no_grad():
        want_tokens = reference.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tokens == want_tokens


def test_a_format_the_kernels_do_not_read_is_refused(tmp_path):
    """A Q2_K tensor: a clear error naming it and the way out, not a crash or a wrong model."""
    source = GGUFReader(default_gguf_path())
    writer = GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    copy_metadata(source, writer, "llama.")
    for key, value in (("add_context_length", 64), ("add_embedding_length", 256), ("add_block_count", 1),
                       ("add_feed_forward_length", 256), ("add_head_count", 4), ("add_head_count_kv", 4),
                       ("add_vocab_size", len(source.fields["tokenizer.ggml.tokens"].data))):
        getattr(writer, key)(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 84), dtype=np.uint8),
                      raw_dtype=GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BlockModelError, match=r"blk\.0\.attn_q\.weight is Q2_K.*--quantization none"):
        load_model(tmp_path / "q2k.gguf", quantization="gguf")


def test_a_hugging_face_directory_is_refused(tmp_path):
    from tests.conftest import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--quantization gguf serves a GGUF file's blocks"):
        load_model(tmp_path, quantization="gguf")
