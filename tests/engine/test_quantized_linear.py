"""`--quantization int8` (models/quantized_linear.py): one row through the int8 product, batches through the packed
bfloat16 product of the same rounded weights; the quantized model's quality on real text; the engine refuses
the combinations it does not serve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from malora_runtime.config import EngineConfig
from malora_runtime.engine.llm_engine import LLMEngine
from malora_runtime.models.packed_linear import PackedLinear, pack_linears
from malora_runtime.models.quantized_linear import Int8DecodeLinear, int8_per_channel, quantize_linears
from tests.conftest import BF16_PACKING_REFUSAL, make_tiny_llama, requires_bf16_packing

pytestmark = pytest.mark.isa  # run again at every lower instruction-set level (tests/isa_levels.py)


@requires_bf16_packing
@pytest.mark.parametrize("d_in,d_out,bias", [(576, 576, False), (64, 1024, True), (1536, 192, False)])
def test_one_row_and_a_batch_use_the_same_rounded_weights(d_in, d_out, bias):
    torch.manual_seed(d_in)
    linear = nn.Linear(d_in, d_out, bias=bias).to(torch.bfloat16).requires_grad_(False)
    original = linear.weight.detach().clone()
    q, scales = int8_per_channel(linear.weight)
    rounded = (q.double() * scales.double()[:, None])
    assert (rounded - original.double()).abs().max() <= scales.double().max() / 2 + 1e-6  # round to nearest
    layer = Int8DecodeLinear.quantize(PackedLinear.convert(linear))
    assert torch.equal(layer.weight, original)  # the parameter (a tied embedding's too) is untouched
    x = torch.randn(5, d_in).to(torch.bfloat16)
    reference = x.double() @ rounded.to(torch.bfloat16).double().T + (0 if not bias else layer.bias.double())
    batch = layer(x)
    rows = torch.cat([layer(x[i:i + 1]) for i in range(5)])
    scale = reference.abs().max()
    assert float((batch.double() - reference).abs().max() / scale) < 2e-2
    assert float((rows.double() - reference).abs().max() / scale) < 2e-2
    assert float((rows.double() - batch.double()).abs().max() / scale) < 2e-2


@requires_bf16_packing
def test_every_packed_linear_gets_an_int8_copy_and_odd_widths_skip_torchs_kernel():
    model = make_tiny_llama(dtype=torch.bfloat16, intermediate_size=100)  # the MLP's widths are not multiples of 64
    packed = pack_linears(model)
    quantized = quantize_linears(model, "int8")
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert quantized == packed and all(type(m) is Int8DecodeLinear for m in layers.values())
    assert layers["q_proj"].torch_kernel_fits and not layers["up_proj"].torch_kernel_fits
    # A one-row step of a layer torch's kernel does not take is the packed product of the same rounded weights.
    x = torch.randn(1, 64).to(torch.bfloat16)
    up = layers["up_proj"]
    rounded = (up.int8_weight.float() * up.int8_scales.float()[:, None]).to(torch.bfloat16)
    assert torch.allclose(up(x).float(), (x.double() @ rounded.double().T).float(), rtol=2e-2, atol=2e-2)


def test_unknown_quantizations_and_unpacked_linears_are_refused():
    with pytest.raises(ValueError, match="int4"):
        quantize_linears(make_tiny_llama(dtype=torch.bfloat16), "int4")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="packed"):
        EngineConfig(quantization="int8", pack_cpu_linears=False)


def test_the_engine_refuses_int8_in_float32_and_serves_it_in_bfloat16_where_packed(tokenizer):
    """On every CPU: float32 is refused. With bfloat16 packing (AVX-512, AMX): served. Without it (AVX2-only, or
    MALORA_MAX_ISA=avx2): refused, with oneDNN's reason and the way out."""
    from malora_runtime.sampling_params import SamplingParams

    with pytest.raises(ValueError, match="bfloat16"):
        LLMEngine(make_tiny_llama(vocab_size=len(tokenizer)), tokenizer,
                  EngineConfig(dtype="float32", quantization="int8", num_kv_blocks=16))

    def bfloat16_engine() -> LLMEngine:
        return LLMEngine(make_tiny_llama(vocab_size=len(tokenizer), dtype=torch.bfloat16), tokenizer,
                         EngineConfig(dtype="bfloat16", quantization="int8", num_kv_blocks=16))

    if BF16_PACKING_REFUSAL is not None:
        with pytest.raises(ValueError, match=r"oneDNN does not make on this CPU .*--quantization none"):
            bfloat16_engine()
        return
    engine = bfloat16_engine()
    engine.add_request("r", "hello there", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finished and outputs[-1].outputs[0].num_output_tokens == 6
