"""Base linears through oneDNN on packed weights: same results as nn.Linear (to float32 rounding),
row results independent of the batch, adapters still wrap them, and the engine switch works."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from malora_runtime.config import EngineConfig
from malora_runtime.cpu_features import cpu_features
from malora_runtime.engine.model_runner import ModelRunner
from malora_runtime.layers import MaloraLinear
from malora_runtime.models.packed_linear import PackedLinear, onednn_linear_available, pack_linears
from tests.conftest import make_tiny_llama

pytestmark = [pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN"),
              pytest.mark.isa]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 37), (5, 3, 37), (257, 37)])
def test_packed_equals_linear(bias: bool, shape: tuple[int, ...]) -> None:
    linear = nn.Linear(37, 45, bias=bias).requires_grad_(False)  # frozen, as the engine's model
    x = torch.randn(*shape)
    expected = linear(x).double()
    module = PackedLinear.convert(linear)
    assert module is linear and isinstance(module, nn.Linear)
    got = module(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got.double() - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_non_contiguous_input() -> None:
    linear = PackedLinear.convert(nn.Linear(16, 8))
    x = torch.randn(16, 10).t()  # [10, 16], not contiguous
    torch.testing.assert_close(linear(x), nn.functional.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)


X86_BELOW_AVX2 = cpu_features().architecture == "x86_64" and cpu_features().level == "scalar"


@pytest.mark.skipif(X86_BELOW_AVX2, reason="oneDNN's SSE4.1 products are not batch-invariant: the engine does not "
                                           "pack below AVX2 (test_no_packing_below_avx2)")
def test_rows_do_not_depend_on_the_batch() -> None:
    """A token's result must not change with what else is in the step (batch-invariant rows)."""
    linear = PackedLinear.convert(nn.Linear(576, 1536, bias=False))
    x = torch.randn(64, 576)
    full = linear(x)
    for rows in (1, 7, 33):
        assert torch.equal(linear(x[:rows]), full[:rows])


@pytest.mark.skipif(not X86_BELOW_AVX2, reason="packing is refused only on x86 below AVX2")
def test_no_packing_below_avx2() -> None:
    """Measured under MALORA_MAX_ISA=scalar: a packed product's first row differed between 1 and 64 rows."""
    model = make_tiny_llama()
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.skipif(X86_BELOW_AVX2, reason="the engine does not pack below AVX2 (test_no_packing_below_avx2)")
def test_pack_linears_converts_the_model_and_keeps_its_outputs() -> None:
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    count = pack_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert count == len(linears) == 2 * 7 + 1  # 7 per layer and the head
    assert all(isinstance(m, PackedLinear) for m in linears)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert pack_linears(model) == 0  # already packed: nothing to do


@pytest.mark.parametrize("pack", [True, False])
def test_engine_switch(pack: bool) -> None:
    model = make_tiny_llama()
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=8, pack_cpu_linears=pack))
    q_proj = model.model.layers[0].self_attn.q_proj
    base = q_proj.base if isinstance(q_proj, MaloraLinear) else q_proj
    assert isinstance(base, PackedLinear) is (pack and not X86_BELOW_AVX2)
    assert runner.model is model


def test_a_packing_failure_leaves_plain_linears_that_still_work(monkeypatch) -> None:
    from malora_runtime.models import packed_linear

    def refuse(weight):
        raise RuntimeError("no oneDNN kernel for this CPU")

    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
    monkeypatch.setattr(packed_linear, "pack_weight", refuse)
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
