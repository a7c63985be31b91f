"""`malora train` on a tiny random Llama: the loss falls, and every method exports exactly to the MALoRA format."""

from __future__ import annotations

import random

import pytest
import torch

from malora_runtime.adapters import load_adapter, save_adapter
from malora_runtime.adapters.init import random_adapter
from malora_runtime.config import EngineConfig
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.layers import MaloraLinear
from malora_runtime.offline import greedy_generate
from malora_runtime.patching import linear_shapes, set_adapter
from malora_runtime.sampling_params import SamplingParams
from malora_runtime.training.data import IGNORE_INDEX, collate, read_jsonl, tokenize, write_jsonl
from malora_runtime.training.layers import attach, detach, load_balance_loss, make_spec
from malora_runtime.training.trainer import TrainConfig, export_adapter, train
from tests.conftest import make_tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from malora_runtime.models.loader import default_gguf_path

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_model():
    """The tiny random Llama with larger weights than the default 0.02, so its logits can move."""
    return make_tiny_llama(initializer_range=0.1)


class ByteTokenizer:
    """Bytes as token ids (the tiny model's vocabulary is 256); 1 is EOS."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i > 1).decode(errors="replace")


def reverse_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdef") for _ in range(3)) for _ in range(n)]
    return [{"prompt": f"{w}=", "completion": w[::-1]} for w in words]


def test_collate_masks_prompt_and_padding():
    tok = ByteTokenizer()
    batch = collate([tokenize(tok, {"prompt": "ab=", "completion": "ba"}, 64),
                     tokenize(tok, {"prompt": "abcd=", "completion": "x"}, 64)], tok.pad_token_id)
    assert batch.input_ids.shape == (2, 7)
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * 3 + [ord("b"), ord("a"), 1, IGNORE_INDEX]
    assert batch.labels[1].tolist() == [IGNORE_INDEX] * 5 + [ord("x"), 1]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0]


def test_jsonl_round_trip_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, reverse_records(3, 0))
    assert len(read_jsonl(path)) == 3
    path.write_text('{"text": "no completion"}\n')
    with pytest.raises(ValueError, match="data.jsonl:1"):
        read_jsonl(path)


@pytest.mark.parametrize("method", ["malora", "molora", "lora"])
def test_few_steps_reduce_the_loss(method):
    model = tiny_model()
    config = TrainConfig(method=method, targets=TARGETS, num_experts=4, rank=4, subspace_rank=8, top_k=2,
                         steps=30, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=15, lb_weight=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, ByteTokenizer(), config, reverse_records(64, 0), reverse_records(16, 1), "tiny",
                   progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert result.eval_losses[-1][1] < result.eval_losses[0][1] + 1e-6
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # base frozen
    assert result.adapter.config.metadata["trainable_parameters"] == result.trainable_parameters


def _perturbed_layers(model, method: str):
    spec = make_spec(method, num_experts=4, rank=4, subspace_rank=8, top_k=2, alpha=8.0)
    torch.manual_seed(1)
    layers = attach(model, method, TARGETS, spec)
    with torch.no_grad():
        for layer in layers.values():
            layer.B.normal_(0, 0.5)  # B starts at zero: make the delta visible
    return layers


@pytest.mark.parametrize("method", ["malora", "molora", "lora"])
def test_export_reloads_with_the_same_logits(method, tmp_path):
    model = make_tiny_llama()
    layers = _perturbed_layers(model, method)
    ids = torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained_logits = model(ids).logits
    config = TrainConfig(method=method, targets=TARGETS, num_experts=4, rank=4, subspace_rank=8, dtype="float32")
    adapter = export_adapter(layers, config, "tiny")
    detach(model, layers)
    with torch.no_grad():
        base_logits = model(ids).logits
    save_adapter(adapter, tmp_path / method)
    loaded = load_adapter(tmp_path / method, linear_shapes(model))
    expected_n = {"malora": 4, "molora": 4, "lora": 1}[method]
    assert all(w.spec.num_experts == expected_n for w in loaded.modules.values())
    if method == "molora":
        assert all(w.spec.d == 16 for w in loaded.modules.values())  # d = N r: the exact SVD conversion
    set_adapter(model, loaded)
    with torch.no_grad():
        served_logits = model(ids).logits
    set_adapter(model, None)
    assert (trained_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(served_logits, trained_logits, atol=1e-4, rtol=1e-4)


def test_load_balance_loss_is_one_when_balanced_and_higher_when_not():
    model = make_tiny_llama()
    spec = make_spec("malora", num_experts=4, rank=4, subspace_rank=8, top_k=1, alpha=None)
    layers = attach(model, "malora", ["q_proj"], spec)
    layer = next(iter(layers.values()))
    layer.record_router = True
    with torch.no_grad():
        layer.G.zero_()
        layer.G[0, :] = 1.0  # every token's logits favour expert 0 (inputs are not all negative)
    x = torch.rand(64, 64)
    layer.delta(x)
    skewed = float(load_balance_loss(layers, torch.ones(64)).detach())
    with torch.no_grad():
        layer.G.zero_()
    layer.delta(x)  # all logits tie: expert 0 chosen, uniform probabilities -> N * 1 * 1/N = 1
    assert abs(float(load_balance_loss(layers, torch.ones(64)).detach()) - 1.0) < 1e-6
    assert skewed > 1.5


def test_chat_records_train_on_the_last_assistant_turn(smol_tokenizer):
    messages = [{"role": "user", "content": "upper: the cat"}, {"role": "assistant", "content": "THE CAT"}]
    example = tokenize(smol_tokenizer, {"messages": messages}, 256)
    prompt = smol_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
    assert example.prompt_ids == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert smol_tokenizer.decode(example.completion_ids).startswith("THE CAT<|im_end|>")


def test_saved_adapter_reloads_and_serves(tmp_path, smol_tokenizer):
    """Train, save in fp16, reload, and serve it in the engine: the same greedy tokens as the offline path."""
    model = tiny_model()
    config = TrainConfig(method="malora", targets=TARGETS, num_experts=4, rank=4, subspace_rank=8, top_k=2,
                         steps=20, batch_size=8, lr=1e-2, warmup_steps=2, dtype="float16")
    result = train(model, ByteTokenizer(), config, reverse_records(64, 0), None, "tiny", progress=False)
    save_adapter(result.adapter, tmp_path / "rev")
    adapter = load_adapter(tmp_path / "rev", linear_shapes(model), dtype=torch.float32)
    prompt = list(b"abc=")
    offline = greedy_generate(model, ByteTokenizer(), prompt, adapter, 6, ignore_eos=True)
    base = greedy_generate(model, ByteTokenizer(), prompt, None, 6, ignore_eos=True)
    assert offline != base

    # A fresh copy of the same base: the engine wraps the model's linears itself.
    config = EngineConfig(num_kv_blocks=32, block_size=4, max_model_len=64)
    engine = LLMEngine(tiny_model(), smol_tokenizer, config, "tiny")
    engine.add_adapter("rev", adapter)
    engine.add_request("r0", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), adapter="rev")
    served: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            served.extend(t for c in output.outputs for t in c.token_ids)
    assert served == offline


def test_attach_unwraps_layers_wrapped_for_serving():
    """Training after offline generation (which wraps the linears) adapts the same base linears."""
    model = tiny_model()
    ids = torch.randint(2, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids).logits
    set_adapter(model, random_adapter(linear_shapes(model), "tiny", TARGETS, 2, 2, 4, 1, seed=0, dtype="float32"))
    set_adapter(model, None)  # leaves MaloraLinear wrappers behind, as offline generation does
    assert sum(isinstance(m, MaloraLinear) for m in model.modules()) == 3 * 2
    layers = attach(model, "lora", TARGETS, make_spec("lora", 1, 4, 4, 1, None))
    assert len(layers) == 3 * 2
    detach(model, layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits)
